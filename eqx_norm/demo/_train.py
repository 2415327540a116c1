"""The training demo's parts: data, model, one jitted step, and the loop that runs it."""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from collections.abc import Callable
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int, PRNGKeyArray
from tqdm import tqdm

from .. import DyT, LayerNorm, RMSNorm

# The normalizations the demo compares, by their --norms name. Adding one is one line here.
NORMS: dict[str, Callable[[int], eqx.Module]] = {"layer": LayerNorm, "rms": RMSNorm, "dyt": DyT}
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {"relu": jax.nn.relu, "tanh": jnp.tanh}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
INITS = ("default", "he")
# The gain that keeps the signal's scale through a layer: He (Kaiming) for ReLU, LeCun for
# tanh. eqx.nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), has standard
# deviation 1/sqrt(3 fan_in): sqrt(1/6) = 0.41 times He's, sqrt(1/3) = 0.58 times LeCun's.
_GAIN = {"relu": math.sqrt(2.0), "tanh": 1.0}
_IDEAL = {"relu": "He", "tanh": "LeCun"}


def default_init_scale(activation: str) -> float:
    """The default init's weight scale as a multiple of the ideal one (0.41 for ReLU)."""
    return math.sqrt(1 / 3) / _GAIN[activation]


@dataclasses.dataclass(frozen=True)
class Data:
    """The digits data set, split and standardised: float32 features, int32 labels."""

    x_train: Float[np.ndarray, "n_train 64"]
    y_train: Int[np.ndarray, " n_train"]
    x_test: Float[np.ndarray, "n_test 64"]
    y_test: Int[np.ndarray, " n_test"]


def load_data() -> Data:
    """The 8x8 digits bundled with scikit-learn (no download), split and standardised.

    A fixed stratified split (1437 train / 360 test); each pixel is standardised with the
    training set's mean and standard deviation (pixels constant there are only centred).

    Example:
        >>> data = load_data()
        >>> data.x_train.shape, data.x_test.shape
        ((1437, 64), (360, 64))
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=0, stratify=y
    )
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    x_train, x_test = (((x - mean) / std).astype(np.float32) for x in (x_train, x_test))
    return Data(x_train, y_train.astype(np.int32), x_test, y_test.astype(np.int32))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a run; equal configs give identical results on one machine.

    ``norm`` is ``"none"`` or a key of :data:`NORMS`, placed after each hidden ``Linear``;
    ``init`` is ``"default"`` (``eqx.nn.Linear``'s) or ``"he"`` (N(0, gain^2/fan_in), gain
    sqrt(2) for ReLU and 1 for tanh, zero biases), scaled by ``init_scale``; ``dtype`` is
    the activations' (parameters, optimizer state and loss stay float32); the batch is
    sharded over ``devices`` devices; ``learning_rate`` and ``weight_decay`` are adamw's.
    """

    depth: int = 12
    width: int = 64
    steps: int = 500
    batch_size: int = 128
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    norm: str = "layer"
    init: str = "he"
    init_scale: float = 1.0
    activation: str = "relu"
    dtype: str = "float32"
    devices: int = 1
    eval_every: int = 50

    def __post_init__(self) -> None:
        allowed = {"norm": ("none", *NORMS), "init": INITS, "activation": tuple(ACTIVATIONS)}
        allowed["dtype"] = tuple(DTYPES)
        for name, choices in allowed.items():
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"TrainConfig: `{name}` must be one of {choices}, got {getattr(self, name)!r}."
                )
        if self.batch_size % self.devices:
            raise ValueError(
                f"TrainConfig: `batch_size` ({self.batch_size}) must be divisible by `devices` "
                f"({self.devices}), so that every device gets the same share of the batch."
            )

    @property
    def label(self) -> str:
        """The run's name in tables, e.g. ``"no norm, He init"`` or ``"LayerNorm x0.25"``."""
        init = "default init" if self.init == "default" else f"{_IDEAL[self.activation]} init"
        if self.norm == "none":
            label = f"no norm, {init}"
        else:
            label = NORMS[self.norm].__name__ + ("" if self.init == "he" else f", {init}")
        return label if self.init_scale == 1 else f"{label} x{self.init_scale:g}"


class MLP(eqx.Module):
    """``depth`` x [Linear -> norm (optional) -> activation], then a Linear head.

    Takes one example ``(in_features,)`` and returns float32 ``(classes,)`` logits; the
    activations are computed in ``dtype``, the parameters are stored in float32.
    """

    hidden: tuple[eqx.nn.Linear, ...]
    norms: tuple[eqx.Module, ...]  # empty without normalization
    head: eqx.nn.Linear
    activation: Callable[[Array], Array] = eqx.field(static=True)
    dtype: jnp.dtype = eqx.field(static=True)

    def __call__(self, x: Float[Array, " in_features"]) -> Float[Array, " classes"]:
        def linear(layer, x):  # float32 parameters, cast where they are used
            return layer.weight.astype(self.dtype) @ x + layer.bias.astype(self.dtype)

        x = x.astype(self.dtype)
        for i, layer in enumerate(self.hidden):
            x = linear(layer, x)
            if self.norms:
                x = self.norms[i](x)  # bf16 in, float32 statistics, bf16 out
            x = self.activation(x)
        return linear(self.head, x).astype(jnp.float32)


def _hidden(config: TrainConfig, fan_in: int, fan_out: int, key: PRNGKeyArray) -> eqx.nn.Linear:
    layer = eqx.nn.Linear(fan_in, fan_out, key=key)
    weight, bias = layer.weight, layer.bias
    if config.init == "he":
        weight = _GAIN[config.activation] / math.sqrt(fan_in) * jax.random.normal(key, weight.shape)
        bias = jnp.zeros_like(bias)
    return eqx.tree_at(lambda l: (l.weight, l.bias), layer, (config.init_scale * weight, bias))


def make_model(config: TrainConfig, in_features: int = 64, classes: int = 10) -> MLP:
    """The MLP of ``config``, initialised from ``config.seed``.

    The hidden weights depend on ``init`` and ``init_scale`` only, not on ``norm``: runs
    that differ by their normalization start from the same weights. The norms start as the
    identity; the head is ``eqx.nn.Linear``'s default in every run.

    Example:
        >>> model = make_model(TrainConfig(depth=2, width=8))
        >>> len(model.hidden), len(model.norms), model.head.weight.shape
        (2, 2, (10, 8))
    """
    keys = jax.random.split(jax.random.key(config.seed), config.depth + 1)
    sizes = [in_features] + [config.width] * config.depth
    hidden = tuple(_hidden(config, sizes[i], sizes[i + 1], keys[i]) for i in range(config.depth))
    norms = () if config.norm == "none" else tuple(NORMS[config.norm](config.width) for _ in hidden)
    head = eqx.nn.Linear(config.width, classes, key=keys[-1])
    return MLP(hidden, norms, head, ACTIVATIONS[config.activation], DTYPES[config.dtype])


def loss_fn(model: MLP, x: Float[Array, "b f"], y: Int[Array, " b"]) -> Float[Array, ""]:
    """Mean softmax cross-entropy of the model on a batch, in float32."""
    return optax.softmax_cross_entropy_with_integer_labels(jax.vmap(model)(x), y).mean()


def gradient_norms(grads: MLP) -> dict[str, Float[Array, " layers"]]:
    """Per-layer Frobenius norms of a gradient: ``"weight"`` ``(depth + 1,)`` (the hidden
    Linear weights, then the head's), and the norms' ``"gamma"``/``"beta"`` ``(depth,)``."""
    weights = [layer.weight for layer in (*grads.hidden, grads.head)]
    out = {"weight": jnp.stack([jnp.linalg.norm(w) for w in weights])}
    for name in ("gamma", "beta"):
        if grads.norms and getattr(grads.norms[0], name, None) is not None:
            out[name] = jnp.stack([jnp.linalg.norm(getattr(n, name)) for n in grads.norms])
    return out


@functools.cache
def make_optimizer(learning_rate: float, weight_decay: float) -> optax.GradientTransformation:
    """``optax.adamw``; cached, so that equal configs reuse one compiled step."""
    return optax.adamw(learning_rate, weight_decay=weight_decay)


@eqx.filter_jit
def train_step(model, opt_state, x, y, optimizer, replicated):
    """One adamw step: ``(model, opt_state) -> (model, opt_state, loss, gradient norms)``.

    ``x`` and ``y`` may be sharded along the batch; everything that comes out is replicated
    (XLA all-reduces the gradient across devices).
    """
    model, opt_state = eqx.filter_shard((model, opt_state), replicated)
    loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y)
    with jax.numpy_dtype_promotion("standard"):  # optax's adam: Python float ** int32
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    model = eqx.apply_updates(model, updates)
    return eqx.filter_shard((model, opt_state, loss, gradient_norms(grads)), replicated)


@eqx.filter_jit
def evaluate(model: MLP, x: Array, y: Array, replicated: NamedSharding) -> tuple[Array, Array]:
    """``(mean cross-entropy, accuracy)`` of the model on ``(x, y)``, replicated."""
    logits = jax.vmap(model)(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == y).astype(jnp.float32))
    return eqx.filter_shard((loss, accuracy), replicated)


def batch_order(seed: int, num_examples: int, batch_size: int, steps: int) -> np.ndarray:
    """The training examples of every step, ``(steps, batch_size)`` indices.

    Epochs are permutations drawn one after another from ``numpy.random.default_rng(seed)``
    and cut into whole batches, so every process computes the same order, and the first
    ``k`` steps do not depend on ``steps``: a run resumed at step ``k`` goes on from row ``k``.
    """
    rng, per_epoch = np.random.default_rng(seed), num_examples // batch_size
    if per_epoch == 0:
        raise ValueError(f"`batch_size` ({batch_size}) exceeds the training set ({num_examples}).")
    epochs = [rng.permutation(num_examples) for _ in range(-(-steps // per_epoch))]
    return np.stack([e[: per_epoch * batch_size] for e in epochs]).reshape(-1, batch_size)[:steps]


def make_mesh(devices: int) -> Mesh:
    """A 1-D mesh with axis ``"batch"`` over ``devices`` devices, equally from each process."""
    per_process, processes = devices // jax.process_count(), jax.process_count()
    chosen = [jax.local_devices(process_index=p)[:per_process] for p in range(processes)]
    if per_process * processes != devices or any(len(c) < per_process for c in chosen):
        raise ValueError(
            f"`devices`={devices} needs {devices / processes:g} device(s) in each of "
            f"{processes} process(es), but there are {jax.local_device_count()}. On the CPU, "
            f"set jax.config.update('jax_num_cpu_devices', {devices // processes or 1}) before "
            "JAX starts; `python -m eqx_norm.demo --devices N` does this for you."
        )
    return Mesh(np.array([d for c in chosen for d in c]), ("batch",))


def _global(host_array: np.ndarray, sharding: NamedSharding) -> Array:
    """A global array from one every process holds in full: each device takes its slice."""
    return jax.make_array_from_callback(host_array.shape, sharding, lambda i: host_array[i])


def _fetch(x: Array) -> np.ndarray:
    """The value of a replicated array, from this process's first copy."""
    return np.asarray(x.addressable_data(0))


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What one run produced: NumPy arrays, the trained ``model``, and ``resumed_at``, the
    step of the checkpoint it went on from (0 for a run from scratch). ``final_loss`` and
    ``test_loss`` are over the full training and test sets after the last step."""

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
        """How uneven the first step's gradient is through depth: max over min norm of the
        hidden Linear weights (1 = even; the head, of another shape, is left out)."""
        hidden = self.grad_norms_first["weight"][:-1]
        return float(hidden.max() / hidden.min())


def train(
    config: TrainConfig,
    data: Data | None = None,
    *,
    progress: bool = False,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 100,
    resume: bool = False,
) -> RunResult:
    """Train the MLP of ``config`` on the digits with adamw, data-parallel over a mesh.

    The loop is the functional one: the model and the optimizer state go into the jitted
    :func:`train_step` and come back out. Each batch is a global array sharded along
    ``"batch"`` over ``config.devices`` devices; the parameters are replicated.

    Args:
        config: the run.
        data: the data set; :func:`load_data` by default.
        progress: show a tqdm progress bar (process 0 only, and only where stderr is a
            terminal: piped to a file, the demo writes no progress lines).
        checkpoint_dir: save the state and the history there with orbax every
            ``checkpoint_every`` steps and after the last one, keeping the latest.
        resume: go on from the latest checkpoint in ``checkpoint_dir``; without it, a
            checkpoint already there is an error. A resumed run ends with the same
            parameters, bit for bit, as one never stopped (same machine and device layout).

    Returns:
        A :class:`RunResult`.

    Example:
        >>> result = train(TrainConfig(depth=2, width=16, steps=20))
        >>> result.losses.shape, result.grad_norms_first["gamma"].shape
        ((20,), (2,))
    """
    data = load_data() if data is None else data
    mesh = make_mesh(config.devices)
    replicated, batch_sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("batch"))
    optimizer = make_optimizer(config.learning_rate, config.weight_decay)
    order = batch_order(config.seed, len(data.x_train), config.batch_size, config.steps)
    params, static = eqx.partition(make_model(config, data.x_train.shape[1]), eqx.is_array)
    state = (params, optimizer.init(params))
    state = jax.tree.map(lambda a: _global(np.asarray(a), replicated), state)
    settings = dataclasses.asdict(config)
    history = {"losses": [], "eval_steps": [], "test_accuracies": [], "config": settings}
    manager = None
    if checkpoint_dir is not None:
        options = ocp.CheckpointManagerOptions(max_to_keep=1, cleanup_tmp_directories=True)
        manager = ocp.CheckpointManager(Path(checkpoint_dir).absolute(), options=options)
        saved = manager.latest_step()
        if saved is not None and not resume:
            raise ValueError(
                f"{checkpoint_dir} already holds a checkpoint of a run (step {saved}): pass "
                "--resume (resume=True) to go on from it, or choose an empty checkpoint folder."
            )
        if saved is not None:
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
            restored = manager.restore(
                saved,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), history=ocp.args.JsonRestore()
                ),
            )
            changed = [
                f"{k}: saved {restored.history['config'].get(k)!r}, now {v!r}"
                for k, v in settings.items()
                if restored.history["config"].get(k) != v
            ]
            if changed:
                raise ValueError(
                    f"The checkpoint in {checkpoint_dir} is of another run ({'; '.join(changed)})"
                    ". Resume with the same options, or choose another checkpoint folder."
                )
            state, history = restored.state, restored.history
    model, opt_state = eqx.combine(state[0], static), state[1]
    x_test, y_test = _global(data.x_test, replicated), _global(data.y_test, replicated)
    x_all, y_all = _global(data.x_train, replicated), _global(data.y_train, replicated)

    start = len(history["losses"])
    show = progress and jax.process_index() == 0
    # disable=None: no bar where stderr is not a terminal (a log file gets no \r lines)
    bar = tqdm(
        total=config.steps,
        initial=start,
        desc=f"{config.label:>18}",
        disable=None if show else True,
    )
    losses = []  # device arrays, fetched at checkpoints: dispatch stays asynchronous
    try:
        for step in range(start + 1, config.steps + 1):
            x = _global(data.x_train[order[step - 1]], batch_sharded)
            y = _global(data.y_train[order[step - 1]], batch_sharded)
            model, opt_state, loss, norms = train_step(
                model, opt_state, x, y, optimizer, replicated
            )
            losses.append(loss)
            if step == 1:
                history["grad_norms_first"] = {k: _fetch(v).tolist() for k, v in norms.items()}
            if step % config.eval_every == 0 or step == config.steps:
                accuracy = float(_fetch(evaluate(model, x_test, y_test, replicated)[1]))
                history["eval_steps"].append(step)
                history["test_accuracies"].append(accuracy)
                if show:
                    bar.set_postfix(loss=f"{float(_fetch(loss)):.4f}", test_acc=f"{accuracy:.3f}")
            if step == config.steps or (manager and step % checkpoint_every == 0):
                history["losses"] += [float(_fetch(value)) for value in losses]
                history["grad_norms_last"] = {k: _fetch(v).tolist() for k, v in norms.items()}
                losses = []
                if manager is not None:
                    state = ocp.args.StandardSave((eqx.filter(model, eqx.is_array), opt_state))
                    saved = ocp.args.JsonSave(copy.deepcopy(history))  # saved asynchronously
                    manager.save(step, args=ocp.args.Composite(state=state, history=saved))
            bar.update(1)
        bar.close()
    finally:
        if manager is not None:
            manager.close()  # waits for the last asynchronous save

    final_loss, _ = evaluate(model, x_all, y_all, replicated)
    test_loss, test_accuracy = evaluate(model, x_test, y_test, replicated)

    def arrays(norms):
        return {name: np.array(values, dtype=np.float32) for name, values in norms.items()}

    return RunResult(
        config=config,
        model=model,
        losses=np.array(history["losses"], dtype=np.float32),
        eval_steps=np.array(history["eval_steps"], dtype=np.int64),
        test_accuracies=np.array(history["test_accuracies"], dtype=np.float32),
        grad_norms_first=arrays(history["grad_norms_first"]),
        grad_norms_last=arrays(history["grad_norms_last"]),
        final_loss=float(_fetch(final_loss)),
        test_loss=float(_fetch(test_loss)),
        test_accuracy=float(_fetch(test_accuracy)),
        resumed_at=start,
    )
