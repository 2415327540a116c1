"""Time one jitted training step of four small models, each with the norms swapped.

Usage::

    python benchmarks/training_steps.py                 # all four models
    python benchmarks/training_steps.py --quick         # tiny sizes: checks the script
    python benchmarks/training_steps.py --models unet cnn --eqx-norm-src /tmp/baseline
        # the same steps with another checkout of eqx_norm first on sys.path ("before")

Models (float32, ``optax.adam``, one step = loss, gradients and update, jitted):

* ``unet``: a GroupNorm U-Net as diffusion models use, channels-last ``(N, H, W, C)``,
  ``GroupNorm(32, C)`` before each 3x3 convolution of two residual blocks per level.
* ``cnn``: a BatchNorm CNN in training mode, channels-last, BatchNorm after each
  convolution, running statistics threaded through ``eqx.nn.State``.
* ``bert``: a post-norm BERT encoder written as equinox's BERT example writes it (one
  example, ``jax.vmap`` over the batch, ``eqx.nn.LayerNorm(hidden)`` per token).
* ``mixer``: the MLP-Mixer of equinox's score-based-diffusion example
  (``eqx.nn.LayerNorm((hidden, patches))`` per example).

Rows per model: the eqx_norm layers with the default implementation (the compiled kernel on
CPU), with ``implementation="xla"`` (the portable path), and, for ``bert`` and ``mixer``,
equinox's own layers (the models are built with equinox's layers and converted with
``eqx_norm.from_equinox``). The rows of a model are interleaved round by round in one
process; each time is the median over rounds, with the interquartile range. All rows of a
model compute the same loss (printed). Runs under the fault-free allocator of
``benchmarks/run.py`` unless ``--default-allocator``. It asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import inspect
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from residual import FAULT_FREE, interleaved, stats

MODELS = ("unet", "cnn", "bert", "mixer")


def _takes(fn, argument: str) -> bool:
    return argument in inspect.signature(fn).parameters


def _conv_params(key, shapes):
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(key, len(shapes))
    return [
        jax.random.normal(k, s, jnp.float32) * (2.0 / (s[0] * s[1] * s[2])) ** 0.5
        for k, s in zip(keys, shapes)
    ]


def _conv(x, w):
    import jax

    return jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def unet(implementation, quick: bool):
    """``(step, carry, loss)``: a two-level GroupNorm U-Net regressing noise."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import eqx_norm

    widths, size, batch = ((32, 64), 8, 2) if quick else ((64, 128), 32, 16)
    extra = {} if implementation is None else {"implementation": implementation}

    class Block(eqx.Module):
        norm1: eqx.Module
        norm2: eqx.Module
        convs: list
        skip: jax.Array | None

        def __init__(self, cin, cout, key):
            k1, k2 = jax.random.split(key)
            self.norm1 = eqx_norm.GroupNorm(min(32, cin), cin, **extra)
            self.norm2 = eqx_norm.GroupNorm(32, cout, **extra)
            self.convs = _conv_params(k1, [(3, 3, cin, cout), (3, 3, cout, cout)])
            self.skip = None if cin == cout else _conv_params(k2, [(1, 1, cin, cout)])[0]

        def __call__(self, x):
            h = _conv(jax.nn.silu(self.norm1(x)), self.convs[0])
            h = _conv(jax.nn.silu(self.norm2(h)), self.convs[1])
            return h + (x if self.skip is None else _conv(x, self.skip))

    class UNet(eqx.Module):
        stem: jax.Array
        down: list
        mid: Block
        up: list
        head: jax.Array

        def __init__(self, key):
            keys = jax.random.split(key, 8)
            c0, c1 = widths
            self.stem = _conv_params(keys[0], [(3, 3, 3, c0)])[0]
            self.down = [Block(c0, c0, keys[1]), Block(c0, c1, keys[2])]
            self.mid = Block(c1, c1, keys[3])
            self.up = [Block(2 * c1, c1, keys[4]), Block(c1 + c0, c0, keys[5])]
            self.head = _conv_params(keys[6], [(3, 3, c0, 3)])[0]

        def __call__(self, x):
            h = _conv(x, self.stem)
            h0 = self.down[0](h)
            h1 = self.down[1](h0[:, ::2, ::2])  # half resolution
            h = self.mid(h1)
            h = self.up[0](jnp.concatenate([h, h1], -1))
            h = jnp.repeat(jnp.repeat(h, 2, 1), 2, 2)
            h = self.up[1](jnp.concatenate([h, h0], -1))
            return _conv(h, self.head)

    model = UNet(jax.random.key(0))
    kx, kn = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (batch, size, size, 3), jnp.float32)
    noise = jax.random.normal(kn, x.shape, jnp.float32)

    def loss(model, state):
        return jnp.mean((model(x + noise) - noise) ** 2), state

    return model, None, loss


def cnn(implementation, quick: bool):
    """A three-stage BatchNorm CNN classifying random images into 10 classes."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import eqx_norm

    widths, size, batch = ((16, 32, 64), 8, 8) if quick else ((64, 128, 256), 32, 64)
    extra = {} if implementation is None else {"implementation": implementation}

    class CNN(eqx.Module):
        convs: list
        norms: list
        head: jax.Array

        def __init__(self, key):
            keys = jax.random.split(key, 2)
            shapes = [(3, 3, cin, cout) for cin, cout in zip((3, *widths), widths)]
            self.convs = _conv_params(keys[0], shapes)
            self.norms = [eqx_norm.BatchNorm(c, momentum=0.9, **extra) for c in widths]
            self.head = jax.random.normal(keys[1], (widths[-1], 10)) / widths[-1] ** 0.5

        def __call__(self, x, state):
            for i, (w, norm) in enumerate(zip(self.convs, self.norms)):
                x, state = norm(_conv(x, w), state)
                x = jax.nn.relu(x)
                if i:
                    x = x[:, ::2, ::2]
            return x.mean((1, 2)) @ self.head, state

    model, state = eqx.nn.make_with_state(CNN)(jax.random.key(0))
    kx, ky = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (batch, size, size, 3), jnp.float32)
    labels = jax.random.randint(ky, (batch,), 0, 10)

    def loss(model, state):
        logits, state = model(x, state)
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp, labels[:, None], 1).mean(), state

    return model, state, loss


def bert(quick: bool):
    """A post-norm BERT encoder in equinox's one-example style, classifying sequences."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    hidden, layers, heads, ff, seq, batch, vocab = (
        (32, 1, 2, 64, 16, 2, 100) if quick else (128, 2, 2, 512, 128, 32, 30522)
    )

    class Layer(eqx.Module):
        attention: eqx.nn.MultiheadAttention
        norm1: eqx.Module
        mlp: eqx.nn.Linear
        out: eqx.nn.Linear
        norm2: eqx.Module

        def __init__(self, key):
            ka, km, ko = jax.random.split(key, 3)
            self.attention = eqx.nn.MultiheadAttention(heads, hidden, key=ka)
            self.norm1 = eqx.nn.LayerNorm(hidden)
            self.mlp = eqx.nn.Linear(hidden, ff, key=km)
            self.out = eqx.nn.Linear(ff, hidden, key=ko)
            self.norm2 = eqx.nn.LayerNorm(hidden)

        def __call__(self, h):
            h = jax.vmap(self.norm1)(h + self.attention(h, h, h))
            f = jax.vmap(lambda t: self.out(jax.nn.gelu(self.mlp(t))))(h)
            return jax.vmap(self.norm2)(h + f)

    class Bert(eqx.Module):
        tokens: eqx.nn.Embedding
        positions: eqx.nn.Embedding
        norm: eqx.Module
        layers: list
        head: eqx.nn.Linear

        def __init__(self, key):
            keys = jax.random.split(key, layers + 3)
            self.tokens = eqx.nn.Embedding(vocab, hidden, key=keys[0])
            self.positions = eqx.nn.Embedding(512, hidden, key=keys[1])
            self.norm = eqx.nn.LayerNorm(hidden)
            self.layers = [Layer(k) for k in keys[3:]]
            self.head = eqx.nn.Linear(hidden, 2, key=keys[2])

        def __call__(self, ids):
            h = jax.vmap(self.tokens)(ids) + jax.vmap(self.positions)(jnp.arange(ids.shape[0]))
            h = jax.vmap(self.norm)(h)
            for layer in self.layers:
                h = layer(h)
            return self.head(h[0])

    model = Bert(jax.random.key(0))
    kx, ky = jax.random.split(jax.random.key(1))
    ids = jax.random.randint(kx, (batch, seq), 0, vocab)
    labels = jax.random.randint(ky, (batch,), 0, 2)

    def loss(model, state):
        logp = jax.nn.log_softmax(jax.vmap(model)(ids))
        return -jnp.take_along_axis(logp, labels[:, None], 1).mean(), state

    return model, None, loss


def mixer(quick: bool):
    """The MLP-Mixer of equinox's score-based-diffusion example on 28x28 images."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    patch, hidden, mix, blocks, batch = (4, 16, 32, 1, 4) if quick else (4, 64, 512, 4, 256)
    patches = (28 // patch) ** 2

    class Block(eqx.Module):
        patch_mlp: eqx.nn.MLP
        hidden_mlp: eqx.nn.MLP
        norm1: eqx.Module
        norm2: eqx.Module

        def __init__(self, key):
            kp, kh = jax.random.split(key)
            self.patch_mlp = eqx.nn.MLP(patches, patches, mix, depth=1, key=kp)
            self.hidden_mlp = eqx.nn.MLP(hidden, hidden, mix, depth=1, key=kh)
            self.norm1 = eqx.nn.LayerNorm((hidden, patches))
            self.norm2 = eqx.nn.LayerNorm((patches, hidden))

        def __call__(self, y):
            y = y + jax.vmap(self.patch_mlp)(self.norm1(y))
            y = y.T
            y = y + jax.vmap(self.hidden_mlp)(self.norm2(y))
            return y.T

    class Mixer(eqx.Module):
        conv_in: eqx.nn.Conv2d
        conv_out: eqx.nn.ConvTranspose2d
        blocks: list
        norm: eqx.Module

        def __init__(self, key):
            ki, ko, *kb = jax.random.split(key, 2 + blocks)
            self.conv_in = eqx.nn.Conv2d(2, hidden, patch, stride=patch, key=ki)
            self.conv_out = eqx.nn.ConvTranspose2d(hidden, 1, patch, stride=patch, key=ko)
            self.blocks = [Block(k) for k in kb]
            self.norm = eqx.nn.LayerNorm((hidden, patches))

        def __call__(self, t, y):
            y = jnp.concatenate([y, jnp.broadcast_to(t, y.shape)])
            y = self.conv_in(y)
            side = y.shape[1]
            y = y.reshape(hidden, patches)
            for block in self.blocks:
                y = block(y)
            return self.conv_out(self.norm(y).reshape(hidden, side, side))

    model = Mixer(jax.random.key(0))
    kx, kt, kn = jax.random.split(jax.random.key(1), 3)
    data = jax.random.uniform(kx, (batch, 1, 28, 28), jnp.float32)
    t = jax.random.uniform(kt, (batch,), jnp.float32)
    noise = jax.random.normal(kn, data.shape, jnp.float32)

    def loss(model, state):
        std = jnp.sqrt(1 - jnp.exp(-t))[:, None, None, None]
        y = data * jnp.exp(-0.5 * t)[:, None, None, None] + std * noise
        pred = jax.vmap(model)(t, y)
        return jnp.mean((pred + noise / std) ** 2), state

    return model, None, loss


def variants(name: str, quick: bool) -> dict:
    """``{row label: (model, state, loss)}`` for one model."""
    import eqx_norm

    if name in ("unet", "cnn"):
        build = unet if name == "unet" else cnn
        rows = {"eqx_norm": build(None, quick)}
        cls = eqx_norm.GroupNorm if name == "unet" else eqx_norm.BatchNorm
        if _takes(cls, "implementation"):
            rows['eqx_norm implementation="xla"'] = build("xla", quick)
        return rows
    model, state, loss = (bert if name == "bert" else mixer)(quick)
    rows = {"equinox": (model, state, loss)}
    rows["eqx_norm (from_equinox)"] = (eqx_norm.from_equinox(model), state, loss)
    if _takes(eqx_norm.from_equinox, "implementation"):
        converted = eqx_norm.from_equinox(model, implementation="xla")
        rows['eqx_norm (from_equinox) implementation="xla"'] = (converted, state, loss)
    return rows


def step_timer(model, state, loss):
    """A zero-argument timer of one jitted adam step, and the loss of the first step."""
    import equinox as eqx
    import jax
    import optax

    optimizer = optax.adam(1e-3)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, state):
        def objective(params, state):
            return loss(eqx.combine(params, static), state)

        (value, state), grads = jax.value_and_grad(objective, has_aux=True)(params, state)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, state, value

    first = float(step(params, opt_state, state)[3])
    # The same inputs every call: a step's time, not a training run.
    return (lambda: jax.block_until_ready(step(params, opt_state, state))), first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few rounds")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--eqx-norm-src", type=Path, help="a checkout to import eqx_norm from")
    parser.add_argument("--default-allocator", action="store_true", help="glibc's default malloc")
    args = parser.parse_args()
    if not args.default_allocator and os.environ.get("GLIBC_TUNABLES") != FAULT_FREE:
        env = dict(os.environ, GLIBC_TUNABLES=FAULT_FREE)
        sys.exit(subprocess.call([sys.executable, *sys.argv], env=env))
    if args.eqx_norm_src:
        sys.path.insert(0, str(args.eqx_norm_src.resolve()))
        # An editable install's import hook would still find the installed checkout.
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__]

    import jax

    import eqx_norm

    warmup, rounds = (1, 3) if args.quick else (2, args.rounds)
    source = Path(eqx_norm.__file__).resolve().parent.parent
    print(f"jax {jax.__version__}, eqx_norm from {source}, {rounds} interleaved rounds")
    print("\n| model | norms | step ms (IQR) | x first row | first loss |")
    print("|---|---|---:|---:|---:|")
    for name in args.models:
        timers, losses = {}, {}
        for label, built in variants(name, args.quick).items():
            timers[label], losses[label] = step_timer(*built)
        samples = interleaved(timers, warmup, rounds)
        first = stats(samples[next(iter(samples))])[0]
        for label, seconds in samples.items():
            median, p25, p75 = stats(seconds)
            print(
                f"| {name} | {label} | {median:.2f} ({p25:.2f}-{p75:.2f}) | "
                f"{median / first:.2f} | {losses[label]:.6f} |"
            )


if __name__ == "__main__":
    main()
