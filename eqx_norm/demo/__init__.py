"""The training demo: a deep MLP on scikit-learn's digits, without and with normalization.

``python -m eqx_norm.demo`` trains the same MLP on the same batches without normalization
(``eqx.nn.Linear``'s default init, and He init, the fair baseline) and with each norm of
:data:`NORMS` after every hidden Linear, then again from initial weights scaled up and down;
it prints per-layer gradient norms and a summary, and writes ``summary.json`` and a figure.
It needs the ``demo`` extra; ``import eqx_norm`` never imports it.

References:
    Ba, Kiros and Hinton, "Layer Normalization", 2016. arXiv:1607.06450.
    He, Zhang, Ren and Sun, "Delving Deep into Rectifiers", 2015. arXiv:1502.01852.
"""

try:  # the demo extra
    import optax  # noqa: F401
    import orbax.checkpoint  # noqa: F401
    import sklearn  # noqa: F401
    import tqdm  # noqa: F401
except ImportError as error:
    _PIP = {"sklearn": "scikit-learn", "orbax": "orbax-checkpoint"}
    raise ImportError(
        f"eqx_norm.demo needs {_PIP.get(error.name, error.name)}, which is not installed. "
        "Install the demo extra: "
        'pip install "eqx_norm[demo]" (pip install ".[demo]" in a checkout).'
    ) from error

from ._cli import main as main
from ._plot import plot_results as plot_results
from ._train import MLP as MLP
from ._train import NORMS as NORMS
from ._train import RunResult as RunResult
from ._train import TrainConfig as TrainConfig
from ._train import batch_order as batch_order
from ._train import load_data as load_data
from ._train import loss_fn as loss_fn
from ._train import make_model as make_model
from ._train import train as train
