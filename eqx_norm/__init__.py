"""eqx_norm: normalization layers for JAX, as immutable Equinox modules."""

from importlib import metadata as _metadata

from . import functional as functional
from . import initializers as initializers
from ._batch_norm import BatchNorm as BatchNorm
from ._batch_norm import estimate_running_statistics as estimate_running_statistics
from ._dyt import Derf as Derf
from ._dyt import DyT as DyT
from ._from_equinox import from_equinox as from_equinox
from ._gated_rms_norm import GatedRMSNorm as GatedRMSNorm
from ._group_norm import GroupNorm as GroupNorm
from ._group_norm import InstanceNorm as InstanceNorm
from ._layer_norm import LayerNorm as LayerNorm
from ._layer_norm import RMSNorm as RMSNorm
from .initializers import Constant as Constant
from .initializers import Initializer as Initializer
from .initializers import Normal as Normal
from .initializers import OneInit as OneInit
from .initializers import TruncatedNormal as TruncatedNormal
from .initializers import Uniform as Uniform
from .initializers import ZeroInit as ZeroInit
from .serialization import load_leaves as load_leaves

try:  # one source for the version: pyproject.toml, as installed
    __version__ = _metadata.version("eqx_norm")
except _metadata.PackageNotFoundError:  # imported from a source tree that is not installed
    __version__ = "0+unknown"
