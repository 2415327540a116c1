"""eqx_norm: normalization layers for JAX, as immutable Equinox modules."""

from . import functional as functional
from . import initializers as initializers
from ._batch_norm import BatchNorm as BatchNorm
from ._from_equinox import from_equinox as from_equinox
from ._group_norm import GroupNorm as GroupNorm
from ._group_norm import InstanceNorm as InstanceNorm
from ._layer_norm import LayerNorm as LayerNorm
from ._rms_norm import RMSNorm as RMSNorm
from .initializers import Constant as Constant
from .initializers import Initializer as Initializer
from .initializers import Normal as Normal
from .initializers import OneInit as OneInit
from .initializers import TruncatedNormal as TruncatedNormal
from .initializers import Uniform as Uniform
from .initializers import ZeroInit as ZeroInit
from .serialization import load_leaves as load_leaves

__version__ = "0.1.0"
