"""The training demo's parts: data, model, one jitted step, and the loop that runs it."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from .. import LayerNorm, RMSNorm
from . import _checkpoint

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {"relu": jax.nn.relu, "tanh": jnp.tanh}
NORMS = {"none": None, "layer": LayerNorm, "rms": RMSNorm}
INITS = ("default", "he")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# The gain that keeps the signal's scale through a layer: He (Kaiming) for ReLU, LeCun for
# tanh. eqx.nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), has standard
# deviation 1/sqrt(3 fan_in), so its weights are this factor times the ideal ones:
# sqrt(1/6) = 0.41 for ReLU, sqrt(1/3) = 0.58 for tanh.
_IDEAL_GAIN = {"relu": math.sqrt(2.0), "tanh": 1.0}
_IDEAL_NAME = {"relu": "He (Kaiming)", "tanh": "LeCun"}


def default_init_scale(activation: str) -> float:
    """The default init's weight scale as a multiple of the ideal one (0.41 for ReLU)."""
    return math.sqrt(1 / 3) / _IDEAL_GAIN[activation]


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
    """Everything that decides a run. Equal configs give identical results on one machine.

    Args:
        depth: number of hidden layers.
        width: units per hidden layer.
        steps: optimizer steps.
        batch_size: global batch size, divisible by ``devices``.
        learning_rate: of ``optax.adamw``.
        weight_decay: of ``optax.adamw``.
        seed: initialises the weights and orders the batches.
        norm: after each hidden ``Linear``: ``"none"``, ``"layer"`` (``eqx_norm.LayerNorm``)
            or ``"rms"`` (``eqx_norm.RMSNorm``).
        init: the hidden ``Linear`` weights: ``"default"`` (``eqx.nn.Linear``'s
            U(-1/sqrt(fan_in), 1/sqrt(fan_in)), too small for ReLU) or ``"he"`` (normal with
            standard deviation ``gain / sqrt(fan_in)``, gain sqrt(2) for ReLU and 1 for tanh,
            zero biases).
        init_scale: multiplies the initial hidden weights (1 = as ``init`` says).
        activation: ``"relu"`` or ``"tanh"``.
        dtype: of the activations, ``"float32"`` or ``"bfloat16"``; the parameters, the
            optimizer state and the loss stay float32.
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
    norm: Literal["none", "layer", "rms"] = "layer"
    init: Literal["default", "he"] = "he"
    init_scale: float = 1.0
    activation: Literal["relu", "tanh"] = "relu"
    dtype: Literal["float32", "bfloat16"] = "float32"
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
        scale = self.init_scale
        if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(
                f"TrainConfig: `init_scale` must be a finite positive number, got {scale!r}."
            )
        if isinstance(self.norm, bool):
            raise ValueError(
                f"TrainConfig: `norm` is a string now: 'layer' for norm=True, 'none' for "
                f"norm=False; got {self.norm!r}."
            )
        for name, allowed in (
            ("norm", NORMS),
            ("init", INITS),
            ("activation", ACTIVATIONS),
            ("dtype", DTYPES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"TrainConfig: `{name}` must be one of {sorted(allowed)}, "
                    f"got {getattr(self, name)!r}."
                )
        if self.batch_size % self.devices:
            raise ValueError(
                f"TrainConfig: `batch_size` ({self.batch_size}) must be divisible by `devices` "
                f"({self.devices}), so that every device gets the same share of the batch. "
                f"Try batch_size={self.batch_size // self.devices * self.devices or self.devices}."
            )

    @property
    def label(self) -> str:
        """The run's name in tables, e.g. ``"no norm, He init"`` or ``"LayerNorm x0.25"``."""
        init = {"default": "default init", "he": _IDEAL_NAME[self.activation].split()[0] + " init"}
        if self.norm == "none":
            label = f"no norm, {init[self.init]}"
        else:
            label = {"layer": "LayerNorm", "rms": "RMSNorm"}[self.norm]
            if self.init != "he":
                label += f", {init[self.init]}"
        return label if self.init_scale == 1 else f"{label} x{self.init_scale:g}"


def describe_init(activation: str) -> str:
    """One sentence on the two initialisations the demo compares and what they do."""
    return (
        f"'default' is eqx.nn.Linear's U(-1/sqrt(fan_in), 1/sqrt(fan_in)), whose weights are "
        f"{default_init_scale(activation):.2f}x the {_IDEAL_NAME[activation]} init that "
        f"{activation} needs, so without normalization the signal shrinks by about that "
        f"much per layer; 'He' draws N(0, {_IDEAL_GAIN[activation] ** 2:g}/fan_in) with zero "
        "biases and keeps its scale."
    )


def _linear(linear: eqx.nn.Linear, x: Array, dtype: jnp.dtype) -> Array:
    # float32 parameters, cast to the compute dtype where they are used (no-op in float32)
    return linear.weight.astype(dtype) @ x + linear.bias.astype(dtype)


class MLP(eqx.Module):
    """``depth`` x [Linear -> norm (optional) -> activation], then a Linear head.

    Takes one example of shape ``(in_features,)`` and returns float32 ``(classes,)``
    logits; use ``jax.vmap`` for a batch. The activations are computed in ``dtype``, the
    parameters are stored in float32.
    """

    hidden: tuple[eqx.nn.Linear, ...]
    norms: tuple[LayerNorm | RMSNorm, ...]  # empty without normalization
    head: eqx.nn.Linear
    activation: Callable[[Array], Array] = eqx.field(static=True)
    dtype: jnp.dtype = eqx.field(static=True)

    def __call__(self, x: Float[Array, " in_features"]) -> Float[Array, " classes"]:
        x = x.astype(self.dtype)
        for i, linear in enumerate(self.hidden):
            x = _linear(linear, x, self.dtype)
            if self.norms:
                x = self.norms[i](x)  # bf16 in, float32 statistics, bf16 out
            x = self.activation(x)
        return _linear(self.head, x, self.dtype).astype(jnp.float32)


def _hidden_linear(
    config: TrainConfig, in_features: int, out_features: int, key: PRNGKeyArray
) -> eqx.nn.Linear:
    linear = eqx.nn.Linear(in_features, out_features, key=key)
    if config.init == "he":
        std = _IDEAL_GAIN[config.activation] / math.sqrt(in_features)
        weight = std * jax.random.normal(key, linear.weight.shape)
        linear = eqx.tree_at(
            lambda l: (l.weight, l.bias), linear, (weight, jnp.zeros_like(linear.bias))
        )
    if config.init_scale != 1:
        linear = eqx.tree_at(lambda l: l.weight, linear, config.init_scale * linear.weight)
    return linear


def make_model(config: TrainConfig, in_features: int = 64, classes: int = 10) -> MLP:
    """The MLP of ``config``, initialised from ``config.seed``.

    The hidden weights depend on ``config.init`` and ``config.init_scale`` only, never on
    ``config.norm``: runs that differ by their normalization start from the same weights.
    The norms start as the identity affine map (``gamma = 1``, ``beta = 0``), and the head
    is ``eqx.nn.Linear``'s default in every run.

    Example:
        >>> model = make_model(TrainConfig(depth=2, width=8))
        >>> len(model.hidden), len(model.norms), model.head.weight.shape
        (2, 2, (10, 8))
    """
    keys = jax.random.split(jax.random.key(config.seed), config.depth + 1)
    sizes = [in_features] + [config.width] * config.depth
    hidden = tuple(
        _hidden_linear(config, sizes[i], sizes[i + 1], keys[i]) for i in range(config.depth)
    )
    norm = NORMS[config.norm]
    norms = () if norm is None else tuple(norm(config.width) for _ in range(config.depth))
    head = eqx.nn.Linear(config.width, classes, key=keys[-1])
    return MLP(hidden, norms, head, ACTIVATIONS[config.activation], DTYPES[config.dtype])


def loss_fn(
    model: MLP, x: Float[Array, "batch in_features"], y: Int[Array, " batch"]
) -> Float[Array, ""]:
    """Mean softmax cross-entropy of the model on a batch, in float32."""
    logits = jax.vmap(model)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def gradient_norms(grads: MLP) -> dict[str, Float[Array, " layers"]]:
    """Per-layer Frobenius norms of a gradient with the structure of :class:`MLP`.

    Returns:
        ``{"weight": (depth + 1,)}`` (the hidden Linear weights, then the head's), plus
        ``"gamma"`` (and ``"beta"`` where the norm has one) of shape ``(depth,)``.
    """
    weights = [linear.weight for linear in grads.hidden] + [grads.head.weight]
    norms = {"weight": jnp.stack([jnp.linalg.norm(w) for w in weights])}
    for name in ("gamma", "beta"):
        if grads.norms and getattr(grads.norms[0], name) is not None:
            norms[name] = jnp.stack([jnp.linalg.norm(getattr(n, name)) for n in grads.norms])
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

    Epochs are permutations of the training set drawn one after another from
    ``numpy.random.default_rng(seed)`` and cut into whole batches (the remainder of each
    epoch is dropped), so every process computes the same order, and the order of the
    first ``k`` steps does not depend on ``steps``: a run resumed at step ``k`` regenerates
    it and goes on from row ``k``.
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
    training and test sets after the last step. ``resumed_at`` is the step of the
    checkpoint the run went on from (0 for a run from scratch).
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
    resumed_at: int = 0

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
    out: it has another shape (10 outputs) and no norm after it in any run.
    """
    hidden = norms["weight"][:-1]
    return float(hidden.max() / hidden.min())


@dataclasses.dataclass(frozen=True)
class Checkpointing:
    """Where and how often :func:`train` saves its state, and whether it resumes.

    Args:
        directory: the run's own folder (created if missing); see ``docs/training_demo.md``
            for the files it holds.
        every: save after every ``every`` steps, and always after the last one.
        resume: go on from the checkpoint in ``directory`` if there is one; without it, a
            checkpoint already there is an error rather than overwritten.
    """

    directory: Path
    every: int = 100
    resume: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every <= 0:
            raise ValueError(f"Checkpointing: `every` must be a positive int, got {self.every!r}.")


def train(
    config: TrainConfig,
    data: Data | None = None,
    *,
    progress: bool = False,
    checkpointing: Checkpointing | None = None,
) -> RunResult:
    """Train the MLP of ``config`` on the digits with adamw, data-parallel over a mesh.

    The loop is the functional one users write: the model and the optimizer state go into
    the jitted :func:`train_step` and come back out. The batch of each step is a global
    array sharded along ``"batch"`` over ``config.devices`` devices; the parameters are
    replicated.

    Args:
        config: the run.
        data: the data set; :func:`load_data` by default.
        progress: show a tqdm progress bar with the batch loss and the test accuracy.
        checkpointing: save the model, the optimizer state, the step and the history
            every so many steps, and go on from a saved state (see :class:`Checkpointing`).
            A resumed run ends with the same parameters, bit for bit, as a run that was
            never stopped, on the same machine and device layout.

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
    order = batch_order(config.seed, len(data.x_train), config.batch_size, config.steps)

    model = make_model(config, in_features=data.x_train.shape[1])
    params, static = eqx.partition(model, eqx.is_array)
    state = jax.tree.map(np.asarray, (params, optimizer.init(params)))
    history = _checkpoint.History.empty()
    if checkpointing is not None:
        saved = _checkpoint.find(checkpointing.directory)
        if saved is not None and not checkpointing.resume:
            raise ValueError(
                f"{saved} already holds a checkpoint of a run: pass --resume (resume=True) to "
                "go on from it, or choose an empty checkpoint folder."
            )
        if saved is not None:
            state, history = _checkpoint.load(
                checkpointing.directory, state, dataclasses.asdict(config), order
            )
    params, opt_state = jax.tree.map(lambda a: global_array(a, replicated), state)
    model = eqx.combine(params, static)
    x_test, y_test = (global_array(a, replicated) for a in (data.x_test, data.y_test))
    x_all, y_all = (global_array(a, replicated) for a in (data.x_train, data.y_train))

    start = history.step
    bar = None
    if progress and jax.process_index() == 0:
        from tqdm import tqdm

        bar = tqdm(
            total=config.steps, initial=start, desc=f"{config.label:>18}", unit="step", leave=True
        )
    losses, norms = [], None  # device arrays, fetched when needed: dispatch stays asynchronous
    for step in range(start + 1, config.steps + 1):
        x = global_array(data.x_train[order[step - 1]], batch_sharded)
        y = global_array(data.y_train[order[step - 1]], batch_sharded)
        model, opt_state, loss, norms = train_step(model, opt_state, x, y, optimizer, replicated)
        losses.append(loss)
        if step == 1:
            history.grad_norms_first = {k: fetch(v) for k, v in norms.items()}
        if step % config.eval_every == 0 or step == config.steps:
            _, accuracy = evaluate(model, x_test, y_test, replicated)
            history.eval_steps.append(step)
            history.accuracies.append(float(fetch(accuracy)))
            if bar is not None:
                bar.set_postfix(
                    loss=f"{float(fetch(loss)):.4f}", test_acc=f"{history.accuracies[-1]:.3f}"
                )
        if step == config.steps or (checkpointing and step % checkpointing.every == 0):
            history.advance(
                step,
                [float(fetch(value)) for value in losses],
                {name: fetch(value) for name, value in norms.items()},
            )
            losses = []
            if checkpointing is not None:
                state = jax.tree.map(fetch, (eqx.filter(model, eqx.is_array), opt_state))
                if jax.process_index() == 0:
                    _checkpoint.save(
                        checkpointing.directory, state, dataclasses.asdict(config), order, history
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
        losses=np.array(history.losses, dtype=np.float32),
        eval_steps=np.array(history.eval_steps, dtype=np.int64),
        test_accuracies=np.array(history.accuracies, dtype=np.float32),
        grad_norms_first=history.grad_norms_first,
        grad_norms_last=history.grad_norms_last,
        final_loss=float(fetch(final_loss)),
        test_loss=float(fetch(test_loss)),
        test_accuracy=float(fetch(test_accuracy)),
        resumed_at=start,
    )
