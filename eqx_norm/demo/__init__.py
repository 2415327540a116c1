"""The training demo: a deep MLP on scikit-learn's digits, without and with normalization.

``python -m eqx_norm.demo`` trains the same MLP on the same batches without normalization
(with ``eqx.nn.Linear``'s default init, and with He init, the fair baseline) and with an
:class:`eqx_norm.LayerNorm` after each hidden Linear (optionally :class:`eqx_norm.RMSNorm`),
then repeats the runs without and with LayerNorm from initial weights scaled up and down.
It prints the gradient norm of every layer at the first step and a summary, and writes
``summary.json`` and a figure. Its parts are importable, so that tests and notebooks call
them directly; it needs the ``demo`` extra (``pip install ".[demo]"``).

Example:
    >>> from eqx_norm.demo import TrainConfig, load_data, train
    >>> data = load_data()
    >>> result = train(TrainConfig(depth=4, width=32, steps=50), data)
    >>> result.grad_norms_first["weight"].shape
    (5,)

References:
    Ba, Kiros and Hinton, "Layer Normalization", 2016. arXiv:1607.06450.
    He, Zhang, Ren and Sun, "Delving Deep into Rectifiers", 2015. arXiv:1502.01852 (the
    initialisation ReLU needs).
"""

from ._checkpoint import CheckpointError as CheckpointError
from ._cli import build_parser as build_parser
from ._cli import main as main
from ._cli import parse_args as parse_args
from ._plot import plot_results as plot_results
from ._train import MLP as MLP
from ._train import Checkpointing as Checkpointing
from ._train import Data as Data
from ._train import RunResult as RunResult
from ._train import TrainConfig as TrainConfig
from ._train import batch_order as batch_order
from ._train import default_init_scale as default_init_scale
from ._train import describe_init as describe_init
from ._train import evaluate as evaluate
from ._train import gradient_norms as gradient_norms
from ._train import load_data as load_data
from ._train import loss_fn as loss_fn
from ._train import make_mesh as make_mesh
from ._train import make_model as make_model
from ._train import train as train
from ._train import train_step as train_step
