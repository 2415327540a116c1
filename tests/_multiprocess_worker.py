"""A few data-parallel optax steps of a LayerNorm model on a global mesh; one process of many.

Started by tests/test_multiprocess.py through ``eqx_norm.demo._cli.launch``, which appends
``--coordinator --num-processes --process-id``; without them it runs alone (the reference).
``--fail-process K --fail-how start|kill|raise`` makes process K exit before joining, SIGKILL
itself after joining, or raise during training. Every process builds the same global batch
and model from fixed seeds; process 0 writes the losses and final parameters to ``--out``.
"""

import argparse
import json
import os
import signal
import sys
import traceback

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import eqx_norm


def main(args):
    def fail_here(how):
        if args.fail_how == how and args.fail_process == (args.process_id or 0):
            print(f"process {args.process_id}: failing on purpose ({how})", file=sys.stderr)
            if how == "start":
                sys.exit(3)
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("failing on purpose")

    fail_here("start")  # before joining: the process never starts
    if args.coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    fail_here("kill")

    mesh = Mesh(np.array(jax.devices()), ("batch",))
    batch, replicated = (
        NamedSharding(mesh, PartitionSpec("batch")),
        NamedSharding(mesh, PartitionSpec()),
    )
    rng = np.random.default_rng(0)
    x_np = rng.normal(2.0, 3.0, (16, 8)).astype(np.float32)
    y_np = np.sin(x_np.sum(axis=1, keepdims=True)).astype(np.float32)
    x, y = (jax.make_array_from_callback(a.shape, batch, lambda i, a=a: a[i]) for a in (x_np, y_np))
    keys = jax.random.split(jax.random.key(0), 2)
    layers = [eqx.nn.Linear(8, 16, key=keys[0]), eqx_norm.LayerNorm(16), eqx.nn.Lambda(jax.nn.relu)]
    params, static = eqx.partition(
        eqx.nn.Sequential([*layers, eqx.nn.Linear(16, 1, key=keys[1])]), eqx.is_array
    )
    params = jax.tree.map(
        lambda p: jax.make_array_from_callback(p.shape, replicated, lambda i: np.asarray(p)[i]),
        params,
    )
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            return jnp.mean((jax.vmap(eqx.combine(p, static))(x) - y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(args.steps):
        fail_here("raise")
        params, opt_state, loss = step(params, opt_state, x, y)
        losses.append(float(loss.addressable_data(0)))
    result = {
        "distributed": args.coordinator is not None,
        "counts": [jax.process_count(), jax.device_count(), jax.local_device_count()],
        "x_sharding": str(x.sharding.spec),
        "loss_sharding_replicated": loss.sharding.is_fully_replicated,
        "losses": losses,
        "params": [np.asarray(p.addressable_data(0)).tolist() for p in jax.tree.leaves(params)],
    }
    if jax.process_index() == 0:
        with open(args.out, "w") as f:
            json.dump(result, f)
    print(f"process {jax.process_index()}: done, loss {losses[-1]:.6f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--fail-how", choices=["start", "kill", "raise"])
    for flag in ("--fail-process", "--num-processes", "--process-id"):
        parser.add_argument(flag, type=int)
    parser.add_argument("--coordinator")
    try:
        main(parser.parse_args())
    except Exception:  # exit at once: the other processes would wait for this one
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
