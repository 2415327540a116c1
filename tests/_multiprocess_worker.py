"""A few data-parallel optax steps on a global mesh; one process of a multi-process run.

Run by tests/test_multiprocess.py through ``eqx_norm.demo.distributed.launch_local_processes``
(``python -m _multiprocess_worker --out PATH [--steps N]``), or alone for the single-process
reference. ``--fail-process K --fail-how start|kill|raise`` makes process K exit before
joining, SIGKILL itself after joining, or raise during training. Every process builds the
same global batch and model from fixed seeds; ``jax.make_array_from_callback`` gives each
device its slice of the batch, the parameters are replicated, and process 0 writes the
loss history and the final parameters to ``--out`` as JSON.
"""

import argparse
import json
import os
import signal
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import eqx_norm
from eqx_norm.demo.distributed import exit_on_error, initialize_from_args

GLOBAL_BATCH = 16


def make_model():
    keys = jax.random.split(jax.random.key(0), 2)
    return eqx.nn.Sequential(
        [
            eqx.nn.Linear(8, 16, key=keys[0]),
            eqx_norm.LayerNorm(16),
            eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.Linear(16, 1, key=keys[1]),
        ]
    )


def make_data():
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, (GLOBAL_BATCH, 8)).astype(np.float32)
    y = np.sin(x.sum(axis=1, keepdims=True)).astype(np.float32)
    return x, y


def loss_fn(model, x, y):
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--fail-process", type=int, default=None)
    parser.add_argument("--fail-how", choices=["start", "kill", "raise"], default="start")
    args = parser.parse_args()

    rank = int(os.environ.get("EQX_NORM_PROCESS_ID", "0"))  # read before jax starts

    def fail_here(how):
        if args.fail_how == how and args.fail_process == rank:
            print(f"process {rank}: failing on purpose ({how})", file=sys.stderr)
            if how == "start":
                sys.exit(3)
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("failing on purpose")

    fail_here("start")  # before joining: the process never starts
    distributed = initialize_from_args(None, None, None, initialization_timeout=30)
    fail_here("kill")

    mesh = Mesh(np.array(jax.devices()), ("batch",))
    batch_sharding = NamedSharding(mesh, PartitionSpec("batch"))
    replicated = NamedSharding(mesh, PartitionSpec())
    x_np, y_np = make_data()
    x = jax.make_array_from_callback(x_np.shape, batch_sharding, lambda index: x_np[index])
    y = jax.make_array_from_callback(y_np.shape, batch_sharding, lambda index: y_np[index])

    model = make_model()
    params, static = eqx.partition(model, eqx.is_array)
    params = jax.tree.map(
        lambda p: jax.make_array_from_callback(p.shape, replicated, lambda i: np.asarray(p)[i]),
        params,
    )
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(eqx.combine(p, static), x, y))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(args.steps):
        fail_here("raise")
        params, opt_state, loss = step(params, opt_state, x, y)
        losses.append(float(loss.addressable_data(0)))

    def local(p):
        return np.asarray(p.addressable_data(0)).tolist()

    result = {
        "distributed": distributed,
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "x_sharding": str(x.sharding.spec),
        "loss_sharding_replicated": loss.sharding.is_fully_replicated,
        "losses": losses,
        "params": [local(p) for p in jax.tree.leaves(params)],
    }
    if jax.process_index() == 0:
        with open(args.out, "w") as f:
            json.dump(result, f)
    print(f"process {jax.process_index()}: done, loss {losses[-1]:.6f}")


if __name__ == "__main__":
    with exit_on_error():
        main()
