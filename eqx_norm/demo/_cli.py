"""The command line of ``python -m eqx_norm.demo``.

The arguments are parsed and the CPU device count requested before JAX's backend starts
(XLA reads ``XLA_FLAGS`` when the first device is asked for, not at ``import jax``), so
``python -m eqx_norm.demo --devices 8`` works on a laptop without setting anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
_PROCESS_ENV = "EQX_NORM_NUM_PROCESSES"
_MULTI_PROCESS_ENV = ("EQX_NORM_COORDINATOR", _PROCESS_ENV, "EQX_NORM_PROCESS_ID")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The demo's argument parser (abbreviated options are off, so argv can be rewritten)."""
    parser = argparse.ArgumentParser(
        prog="python -m eqx_norm.demo",
        description="Train a deep MLP on scikit-learn's digits with and without "
        "eqx_norm.LayerNorm, and show how the gradient flows through its layers.",
        allow_abbrev=False,
    )
    parser.add_argument("--steps", type=_positive_int, default=500, help="optimizer steps")
    parser.add_argument("--depth", type=_positive_int, default=12, help="hidden layers")
    parser.add_argument("--width", type=_positive_int, default=64, help="units per hidden layer")
    parser.add_argument("--seed", type=_non_negative_int, default=0, help="seed (init, batches)")
    parser.add_argument("--batch-size", type=_positive_int, default=128, help="global batch")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="of optax.adamw")
    parser.add_argument("--activation", choices=("relu", "tanh"), default="relu")
    parser.add_argument(
        "--out", type=Path, default=Path("demo_output"), help="folder for the figure and summary"
    )
    parser.add_argument("--no-plot", action="store_true", help="do not write the figure")
    parser.add_argument(
        "--devices",
        type=_positive_int,
        default=None,
        help="shard each batch over N devices (in all processes together; default: one per "
        "process). On the CPU, N devices are simulated.",
    )
    multi = parser.add_argument_group(
        "multi-process", "data parallel across processes (JAX's distributed runtime)"
    )
    multi.add_argument(
        "--processes", type=_positive_int, default=None, help="start N local processes"
    )
    multi.add_argument(
        "--timeout", type=float, default=600.0, help="seconds before --processes gives up"
    )
    multi.add_argument(
        "--coordinator", default=None, help="host:port of process 0 (or EQX_NORM_COORDINATOR)"
    )
    multi.add_argument(
        "--num-processes",
        type=_positive_int,
        default=None,
        help="processes in all (or EQX_NORM_NUM_PROCESSES)",
    )
    multi.add_argument(
        "--process-id",
        type=_non_negative_int,
        default=None,
        help="this process, 0 to N-1 (or EQX_NORM_PROCESS_ID)",
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and cross-check the arguments; errors exit with status 2 and say what to fix."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.processes and any(
        v is not None for v in (args.coordinator, args.num_processes, args.process_id)
    ):
        parser.error(
            "--processes starts the local processes itself: do not combine it with "
            "--coordinator, --num-processes or --process-id"
        )
    processes = args.processes or args.num_processes
    if processes is None:
        try:
            processes = _positive_int(os.environ.get(_PROCESS_ENV, "1"))
        except argparse.ArgumentTypeError as error:
            parser.error(f"${_PROCESS_ENV}: {error}")
    if args.devices is None:
        args.devices = processes
    if args.devices % processes:
        parser.error(
            f"--devices {args.devices} must be a multiple of the number of processes "
            f"({processes}): each process holds the same number of devices"
        )
    if args.batch_size % args.devices:
        parser.error(
            f"--batch-size {args.batch_size} must be divisible by --devices {args.devices}, "
            "so that every device gets the same share of the batch"
        )
    if not args.learning_rate >= 0:
        parser.error(f"--learning-rate must be non-negative, got {args.learning_rate}")
    args.local_devices = args.devices // processes
    return args


def request_cpu_devices(count: int) -> None:
    """Ask XLA for ``count`` CPU devices, unless ``XLA_FLAGS`` already sets a count.

    Has an effect only before JAX's backend starts (the first device query).
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if count > 1 and _DEVICE_COUNT_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {_DEVICE_COUNT_FLAG}={count}".strip()


def without_processes(argv: Sequence[str]) -> list[str]:
    """``argv`` with its ``--processes N`` (or ``--processes=N``) removed, for the children."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--processes":
            skip = True
        elif not arg.startswith("--processes="):
            out.append(arg)
    return out


def _format_gradient_table(results) -> str:
    no_norm, layer_norm = results
    heads = ("no norm: weight", "LayerNorm: weight", "LayerNorm: gamma", "LayerNorm: beta")
    lines = [
        "Gradient norm per layer (Frobenius norm of the gradient, at the first and the last step)",
        f"{'layer':<10}| " + " | ".join(f"{head:^20}" for head in heads),
        f"{'':<10}| " + " | ".join([f"{'first':>9}  {'last':>9}"] * 4),
    ]
    lines.append("-" * len(lines[-1]))
    depth = len(no_norm.grad_norms_first["weight"]) - 1
    for i in range(depth + 1):
        name = f"{i + 1}" if i < depth else f"{i + 1} (head)"
        cells = []
        for result, kind in (
            (no_norm, "weight"),
            (layer_norm, "weight"),
            (layer_norm, "gamma"),
            (layer_norm, "beta"),
        ):
            first = result.grad_norms_first.get(kind)
            if first is None or i >= len(first):
                cells.append(f"{'-':>9}  {'-':>9}")
            else:
                cells.append(f"{first[i]:9.2e}  {result.grad_norms_last[kind][i]:9.2e}")
        lines.append(f"{name:<10}| " + " | ".join(cells))
    return "\n".join(line.rstrip() for line in lines)


def _format_summary(results) -> str:
    header = (
        f"{'run':<10} {'test accuracy':>13} {'final loss':>11} "
        f"{'grad ratio, first step':>23} {'grad ratio, last step':>22}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r.config.label:<10} {r.test_accuracy:13.3f} {r.final_loss:11.4f} "
            f"{r.ratio_first:23.3g} {r.ratio_last:22.3g}"
        )
    lines.append(
        "final loss: cross-entropy on the whole training set after the last step.\n"
        "grad ratio: largest over smallest gradient norm of the hidden layers' Linear weights "
        "(1 = even through depth; the head is left out)."
    )
    return "\n".join(lines)


def _summary_json(results) -> dict:
    def run(r):
        return {
            "test_accuracy": r.test_accuracy,
            "test_loss": r.test_loss,
            "final_loss": r.final_loss,
            "ratio_first": r.ratio_first,
            "ratio_last": r.ratio_last,
            "losses": r.losses.tolist(),
            "eval_steps": r.eval_steps.tolist(),
            "test_accuracies": r.test_accuracies.tolist(),
            "grad_norms_first": {k: v.tolist() for k, v in r.grad_norms_first.items()},
            "grad_norms_last": {k: v.tolist() for k, v in r.grad_norms_last.items()},
        }

    config = dataclasses.asdict(results[0].config)
    del config["norm"]
    return {"config": config, "runs": {r.config.label: run(r) for r in results}}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the exit status.

    With ``--processes N`` this process only launches N copies of the command (without
    that flag) through :func:`eqx_norm.distributed.launch_local_processes`. A copy started
    that way, or on a real host with ``--coordinator`` etc., joins JAX's distributed runtime
    through :func:`eqx_norm.distributed.initialize_from_args` before JAX starts, and then
    trains on the global mesh; only process 0 prints and writes files.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.processes:
        from .. import distributed  # lazy: only multi-process runs need it

        return distributed.launch_local_processes(
            without_processes(argv),
            args.processes,
            timeout=args.timeout,
            devices_per_process=args.local_devices,
        )
    request_cpu_devices(args.local_devices)
    flags = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in flags) or any(name in os.environ for name in _MULTI_PROCESS_ENV):
        from .. import distributed

        try:
            joined = distributed.initialize_from_args(*flags)
        except ValueError as error:
            print(f"python -m eqx_norm.demo: error: {error}", file=sys.stderr)
            return 2
        if joined:
            with distributed.exit_on_error():  # a failing process must not hang the others
                return _run(args)
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    import jax

    from ._train import TrainConfig, describe_init, load_data, train

    start = time.perf_counter()
    is_main = jax.process_index() == 0
    say = print if is_main else (lambda *a, **k: None)
    try:
        config = TrainConfig(
            depth=args.depth,
            width=args.width,
            steps=args.steps,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            seed=args.seed,
            activation=args.activation,
            devices=args.devices,
        )
        data = load_data()
        say(
            f"eqx_norm training demo: scikit-learn digits, {len(data.x_train)} train / "
            f"{len(data.x_test)} test examples, 64 standardised pixels, 10 classes"
        )
        say(
            f"model: {config.depth} x [Linear({config.width}) -> LayerNorm (or not) -> "
            f"{config.activation}] -> Linear(10)"
        )
        say(f"init: {describe_init(config.activation)}")
        say(
            f"training: optax.adamw(learning_rate={config.learning_rate:g}, weight_decay="
            f"{config.weight_decay:g}), batch {config.batch_size}, {config.steps} steps, "
            f"seed {config.seed}, batch sharded over {config.devices} {jax.devices()[0].platform}"
            f" device(s) in {jax.process_count()} process(es)"
        )
        results = [
            train(dataclasses.replace(config, norm=norm), data, progress=is_main)
            for norm in (False, True)
        ]
    except ValueError as error:
        print(f"python -m eqx_norm.demo: error: {error}", file=sys.stderr)
        return 2
    if not is_main:
        return 0
    print()
    print(_format_gradient_table(results))
    print()
    print(_format_summary(results))
    args.out.mkdir(parents=True, exist_ok=True)
    summary = args.out / "summary.json"
    summary.write_text(json.dumps(_summary_json(results), indent=1))
    print(f"\nsummary written to {summary}")
    if not args.no_plot:
        import matplotlib

        matplotlib.use("Agg")
        from ._plot import plot_results

        figure = args.out / "gradient_flow.png"
        plot_results(results, figure)
        print(f"figure written to {figure}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0
