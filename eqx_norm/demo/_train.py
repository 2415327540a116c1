"""The training demo's parts: data, model, one jitted step, and the loop that runs it."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int, PyTree

from .._layer_norm import LayerNorm

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {"relu": jax.nn.relu, "tanh": jnp.tanh}

# What the default eqx.nn.Linear init does to the signal without normalization: its weights
# are U(-1/sqrt(fan_in), 1/sqrt(fan_in)), i.e. std 1/sqrt(3 fan_in), so a layer multiplies the
# root-mean-square of the signal by sqrt(fan_in * Var(w) * E[act(z)^2] / E[z^2]).
_SIGNAL_GAIN = {"relu": math.sqrt(1 / 6), "tanh": math.sqrt(1 / 3)}
_IDEAL_INIT = {"relu": "sqrt(2/fan_in) (He)", "tanh": "sqrt(1/fan_in) (LeCun)"}


@dataclasses.dataclass(frozen=True)
class Data:
    """The digits data set, split and standardised: float32 features, int32 labels."""

    x_train: Float[np.ndarray, "n_train 64"]
    y_train: Int[np.ndarray, " n_train"]
    x_test: Float[np.ndarray, "n_test 64"]
    y_test: Int[np.ndarray, " n_test"]


def load_data(test_fraction: float = 0.2, split_seed: int = 0) -> Data:
    """The 8x8 handwritten digits bundled with scikit-learn (no download), ready to train on.

    The split is stratified and fixed by ``split_seed`` (1437 train / 360 test by default).
    Each of the 64 pixels is standardised with the training set's mean and standard
    deviation; pixels that are constant in the training set are only centred.

    Args:
        test_fraction: share of the 1797 examples held out for testing, in (0, 1).
        split_seed: seed of the train/test split.

    Returns:
        A :class:`Data` of NumPy arrays.

    Example:
        >>> data = load_data()
        >>> data.x_train.shape, data.x_test.shape
        ((1437, 64), (360, 64))
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0 < test_fraction < 1:
        raise ValueError(f"`test_fraction` must be in (0, 1), got {test_fraction!r}.")
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=split_seed, stratify=y
    )
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return Data(
        x_train=((x_train - mean) / std).astype(np.float32),
        y_train=y_train.astype(np.int32),
        x_test=((x_test - mean) / std).astype(np.float32),
        y_test=y_test.astype(np.int32),
    )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a run. Two runs with equal configs give identical results.

    Args:
        depth: number of hidden layers.
        width: units per hidden layer.
        steps: optimizer steps.
        batch_size: global batch size, divisible by ``devices``.
        learning_rate: of ``optax.adamw``.
        weight_decay: of ``optax.adamw``.
        seed: initialises the weights and orders the batches.
        norm: put an ``eqx_norm.LayerNorm`` after each hidden ``Linear``.
        activation: ``"relu"`` or ``"tanh"``.
        devices: devices the batch is sharded over (a mesh with axis ``"batch"``).
        eval_every: steps between two evaluations on the test set.
    """

    depth: int = 12
    width: int = 64
    steps: int = 500
    batch_size: int = 128
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    norm: bool = True
    activation: Literal["relu", "tanh"] = "relu"
    devices: int = 1
    eval_every: int = 50

    def __post_init__(self) -> None:
        for name in ("depth", "width", "steps", "batch_size", "devices", "eval_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"TrainConfig: `{name}` must be a positive int, got {value!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"TrainConfig: `seed` must be a non-negative int, got {self.seed!r}.")
        for name in ("learning_rate", "weight_decay"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(
                    f"TrainConfig: `{name}` must be a finite non-negative number, got {value!r}."
                )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"TrainConfig: `activation` must be one of {sorted(ACTIVATIONS)}, "
                f"got {self.activation!r}."
            )
        if self.batch_size % self.devices:
            raise ValueError(
                f"TrainConfig: `batch_size` ({self.batch_size}) must be divisible by `devices` "
                f"({self.devices}), so that every device gets the same share of the batch. "
                f"Try batch_size={self.batch_size // self.devices * self.devices or self.devices}."
            )

    @property
    def label(self) -> str:
        """``"LayerNorm"`` or ``"no norm"``."""
        return "LayerNorm" if self.norm else "no norm"


def describe_init(activation: str) -> str:
    """One honest sentence on the initialisation the demo uses and what it does."""
    return (
        "eqx.nn.Linear's default init: weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), "
        f"std 1/sqrt(3 fan_in), below the {_IDEAL_INIT[activation]} that {activation} needs; "
        "without normalization the signal's scale shrinks by about "
        f"{_SIGNAL_GAIN[activation]:.2f}x per layer."
    )


class MLP(eqx.Module):
    """``depth`` x [Linear -> LayerNorm (optional) -> activation], then a Linear head.

    Takes one example of shape ``(in_features,)`` and returns ``(classes,)`` logits; use
    ``jax.vmap`` for a batch.
    """

    hidden: tuple[eqx.nn.Linear, ...]
    norms: tuple[LayerNorm, ...]  # empty without normalization
    head: eqx.nn.Linear
    activation: Callable[[Array], Array] = eqx.field(static=True)

    def __call__(self, x: Float[Array, " in_features"]) -> Float[Array, " classes"]:
        for i, linear in enumerate(self.hidden):
            x = linear(x)
            if self.norms:
                x = self.norms[i](x)
            x = self.activation(x)
        return self.head(x)


def make_model(config: TrainConfig, in_features: int = 64, classes: int = 10) -> MLP:
    """The MLP of ``config``, initialised from ``config.seed``.

    The Linear layers get the same weights with and without normalization, so the two runs
    of the demo differ only by the LayerNorms (``gamma = 1``, ``beta = 0`` at the start).

    Example:
        >>> model = make_model(TrainConfig(depth=2, width=8))
        >>> len(model.hidden), len(model.norms), model.head.weight.shape
        (2, 2, (10, 8))
    """
    keys = jax.random.split(jax.random.key(config.seed), config.depth + 1)
    sizes = [in_features] + [config.width] * config.depth
    hidden = tuple(eqx.nn.Linear(sizes[i], sizes[i + 1], key=keys[i]) for i in range(config.depth))
    norms = tuple(LayerNorm(config.width) for _ in range(config.depth)) if config.norm else ()
    head = eqx.nn.Linear(config.width, classes, key=keys[-1])
    return MLP(hidden, norms, head, ACTIVATIONS[config.activation])


def loss_fn(
    model: MLP, x: Float[Array, "batch in_features"], y: Int[Array, " batch"]
) -> Float[Array, ""]:
    """Mean softmax cross-entropy of the model on a batch."""
    logits = jax.vmap(model)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def gradient_norms(grads: MLP) -> dict[str, Float[Array, " layers"]]:
    """Per-layer Frobenius norms of a gradient with the structure of :class:`MLP`.

    Returns:
        ``{"weight": (depth + 1,)}`` (the hidden Linear weights, then the head's), plus
        ``"gamma"`` and ``"beta"`` of shape ``(depth,)`` when the model has LayerNorms.
    """
    weights = [linear.weight for linear in grads.hidden] + [grads.head.weight]
    norms = {"weight": jnp.stack([jnp.linalg.norm(w) for w in weights])}
    if grads.norms:
        norms["gamma"] = jnp.stack([jnp.linalg.norm(n.gamma) for n in grads.norms])
        norms["beta"] = jnp.stack([jnp.linalg.norm(n.beta) for n in grads.norms])
    return norms


@functools.cache
def make_optimizer(learning_rate: float, weight_decay: float) -> optax.GradientTransformation:
    """``optax.adamw``; cached, so that equal configs reuse one compiled step."""
    return optax.adamw(learning_rate, weight_decay=weight_decay)


@eqx.filter_jit
def train_step(
    model: MLP,
    opt_state: PyTree,
    x: Float[Array, "batch in_features"],
    y: Int[Array, " batch"],
    optimizer: optax.GradientTransformation,
    replicated: NamedSharding,
) -> tuple[MLP, PyTree, Float[Array, ""], dict[str, Array]]:
    """One adamw step: ``(model, opt_state) -> (model, opt_state, loss, gradient norms)``.

    ``x`` and ``y`` may be sharded along the batch; the model, the optimizer state and the
    metrics come back replicated (the gradient is reduced across devices by XLA).
    """
    model, opt_state = eqx.filter_shard((model, opt_state), replicated)
    loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y)
    # optax's adam computes `b1 ** count` (Python float ** int32), which JAX's strict
    # dtype promotion rejects; everything else here runs under either setting.
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    model = eqx.apply_updates(model, updates)
    outputs = (model, opt_state, loss, gradient_norms(grads))
    return eqx.filter_shard(outputs, replicated)


@eqx.filter_jit
def evaluate(
    model: MLP, x: Float[Array, "n in_features"], y: Int[Array, " n"], replicated: NamedSharding
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """``(mean cross-entropy, accuracy)`` of the model on ``(x, y)``, replicated."""
    logits = jax.vmap(model)(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == y).astype(jnp.float32))
    return eqx.filter_shard((loss, accuracy), replicated)


def batch_order(seed: int, num_examples: int, batch_size: int, steps: int) -> np.ndarray:
    """The training examples of every step, ``(steps, batch_size)`` indices.

    Epochs are seeded permutations of the training set cut into whole batches (the
    remainder of each epoch is dropped), so every process computes the same order.
    """
    if batch_size > num_examples:
        raise ValueError(
            f"`batch_size` ({batch_size}) must not exceed the training set ({num_examples})."
        )
    rng = np.random.default_rng(seed)
    per_epoch = num_examples // batch_size
    epochs = -(-steps // per_epoch)
    order = [rng.permutation(num_examples)[: per_epoch * batch_size] for _ in range(epochs)]
    return np.concatenate(order).reshape(-1, batch_size)[:steps]


def make_mesh(devices: int) -> Mesh:
    """A 1-D mesh with axis ``"batch"`` over ``devices`` devices, equally from each process.

    Raises a ValueError that says how to get more CPU devices when there are too few.
    """
    processes = jax.process_count()
    if devices % processes:
        raise ValueError(
            f"`devices` ({devices}) must be a multiple of the number of processes ({processes})."
        )
    per_process = devices // processes
    chosen = []
    for process in range(processes):
        available = jax.local_devices(process_index=process)
        if len(available) < per_process:
            raise ValueError(
                f"`devices`={devices} needs {per_process} device(s) in each of {processes} "
                f"process(es), but process {process} has {len(available)} "
                f"({available[0].platform}). On the CPU, set "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={per_process} before JAX "
                "starts; `python -m eqx_norm.demo --devices N` does this for you."
            )
        chosen.extend(available[:per_process])
    return Mesh(np.array(chosen), ("batch",))


def global_array(host_array: np.ndarray, sharding: NamedSharding) -> Array:
    """A global array from an array every process holds in full: each device takes its slice."""
    return jax.make_array_from_callback(host_array.shape, sharding, lambda index: host_array[index])


def fetch(x: Array) -> np.ndarray:
    """The value of a replicated array, read from this process's first copy."""
    if not x.is_fully_replicated:
        raise ValueError(f"Only replicated arrays are fetched, got sharding {x.sharding}.")
    return np.asarray(x.addressable_data(0))


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What one training run produced. Arrays are NumPy; ``model`` is the trained MLP.

    ``grad_norms_first``/``grad_norms_last`` are :func:`gradient_norms` of the gradient of
    the first and of the last step. ``final_loss`` and ``test_loss`` are over the full
    training and test sets after the last step.
    """

    config: TrainConfig
    model: MLP
    losses: Float[np.ndarray, " steps"]
    eval_steps: Int[np.ndarray, " evals"]
    test_accuracies: Float[np.ndarray, " evals"]
    grad_norms_first: dict[str, np.ndarray]
    grad_norms_last: dict[str, np.ndarray]
    final_loss: float
    test_loss: float
    test_accuracy: float

    @property
    def ratio_first(self) -> float:
        """Largest over smallest gradient norm of the hidden Linear weights, first step."""
        return depth_ratio(self.grad_norms_first)

    @property
    def ratio_last(self) -> float:
        """Largest over smallest gradient norm of the hidden Linear weights, last step."""
        return depth_ratio(self.grad_norms_last)


def depth_ratio(norms: dict[str, np.ndarray]) -> float:
    """How uneven the gradient is through depth: max over min of the hidden layers' weights.

    1 means every hidden layer gets a gradient of the same size. The output head is left
    out: it has another shape (10 outputs) and no LayerNorm after it in either run.
    """
    hidden = norms["weight"][:-1]
    return float(hidden.max() / hidden.min())


def train(
    config: TrainConfig,
    data: Data | None = None,
    *,
    progress: bool = False,
) -> RunResult:
    """Train the MLP of ``config`` on the digits with adamw, data-parallel over a mesh.

    The loop is the functional one users write: the model and the optimizer state go into
    the jitted :func:`train_step` and come back out. The batch of each step is a global
    array sharded along ``"batch"`` over ``config.devices`` devices; the parameters are
    replicated.

    Args:
        config: the run.
        data: the data set; :func:`load_data` by default.
        progress: show a tqdm progress bar and print the loss and test accuracy every
            ``config.eval_every`` steps.

    Returns:
        A :class:`RunResult`.

    Example:
        >>> result = train(TrainConfig(depth=2, width=16, steps=20))
        >>> result.losses.shape, result.grad_norms_first["gamma"].shape
        ((20,), (2,))
    """
    data = load_data() if data is None else data
    mesh = make_mesh(config.devices)
    replicated = NamedSharding(mesh, P())
    batch_sharded = NamedSharding(mesh, P("batch"))
    optimizer = make_optimizer(config.learning_rate, config.weight_decay)

    model = make_model(config, in_features=data.x_train.shape[1])
    params, static = eqx.partition(model, eqx.is_array)
    opt_state = optimizer.init(params)
    params, opt_state = jax.tree.map(
        lambda a: global_array(np.asarray(a), replicated), (params, opt_state)
    )
    model = eqx.combine(params, static)
    x_test, y_test = (global_array(a, replicated) for a in (data.x_test, data.y_test))
    x_all, y_all = (global_array(a, replicated) for a in (data.x_train, data.y_train))

    order = batch_order(config.seed, len(data.x_train), config.batch_size, config.steps)
    losses, eval_steps, accuracies = [], [], []
    first = last = None
    bar = None
    if progress and jax.process_index() == 0:
        from tqdm import tqdm

        bar = tqdm(total=config.steps, desc=f"{config.label:>9}", unit="step", leave=True)
    for step, indices in enumerate(order, start=1):
        x = global_array(data.x_train[indices], batch_sharded)
        y = global_array(data.y_train[indices], batch_sharded)
        model, opt_state, loss, norms = train_step(model, opt_state, x, y, optimizer, replicated)
        losses.append(loss)
        if step == 1:
            first = norms
        last = norms
        if step % config.eval_every == 0 or step == config.steps:
            _, accuracy = evaluate(model, x_test, y_test, replicated)
            eval_steps.append(step)
            accuracies.append(float(fetch(accuracy)))
            if bar is not None:
                bar.set_postfix(loss=f"{float(fetch(loss)):.4f}", test_acc=f"{accuracies[-1]:.3f}")
                bar.write(
                    f"[{config.label:>9}] step {step:4d}/{config.steps}  "
                    f"batch loss {float(fetch(loss)):.4f}  test accuracy {accuracies[-1]:.3f}"
                )
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

    final_loss, _ = evaluate(model, x_all, y_all, replicated)
    test_loss, test_accuracy = evaluate(model, x_test, y_test, replicated)
    return RunResult(
        config=config,
        model=model,
        losses=np.array([fetch(loss) for loss in losses]),
        eval_steps=np.array(eval_steps),
        test_accuracies=np.array(accuracies),
        grad_norms_first={name: fetch(value) for name, value in first.items()},
        grad_norms_last={name: fetch(value) for name, value in last.items()},
        final_loss=float(fetch(final_loss)),
        test_loss=float(fetch(test_loss)),
        test_accuracy=float(fetch(test_accuracy)),
    )
