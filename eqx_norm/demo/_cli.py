"""The command line of ``python -m eqx_norm.demo``.

The arguments are parsed and the CPU device count requested before JAX's backend starts
(XLA reads ``XLA_FLAGS`` when the first device is asked for, not at ``import jax``), so
``python -m eqx_norm.demo --devices 8`` works on a laptop without setting anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
_PROCESS_ENV = "EQX_NORM_NUM_PROCESSES"
_MULTI_PROCESS_ENV = ("EQX_NORM_COORDINATOR", _PROCESS_ENV, "EQX_NORM_PROCESS_ID")
# (module, pip name) of what the demo needs beyond the library: the `demo` extra
_DEMO_EXTRA = (("sklearn", "scikit-learn"), ("tqdm", "tqdm"), ("matplotlib", "matplotlib"))
_NORM_NAMES = {"layer": "LayerNorm", "rms": "RMSNorm"}

REPRODUCIBILITY = (
    "Bit for bit, a run repeats only on the same machine (CPU model), the same jax/jaxlib "
    "and eqx_norm, and the same device layout (--devices, --processes). Another layout "
    "splits each batch's sums over other devices and reorders float32 additions: the "
    "losses then agree to about 1e-7 relative at the first steps, and the runs drift apart "
    "over hundreds of steps (test accuracy moved by up to 0.016 between 1 and 4 devices). "
    "The data split, the batch order (NumPy, seeded) and the initial weights (JAX's "
    "threefry) are the same everywhere; the seed spread (--seeds) is the yardstick for any "
    "one difference."
)


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


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {text!r}")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's formatter that appends each option's default, except to flags and to
    options whose default is None (their help says in words what happens without them)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The demo's argument parser (abbreviated options are off, so argv can be rewritten)."""
    parser = argparse.ArgumentParser(
        prog="python -m eqx_norm.demo",
        description="Train a deep MLP on scikit-learn's digits on the same batches without "
        "normalization (eqx.nn.Linear's default init, then He init: the fair baseline) and "
        "with eqx_norm.LayerNorm (optionally RMSNorm); then retrain without and with "
        "LayerNorm from initial weights scaled up and down. Prints per-layer gradient norms "
        "and a summary, writes summary.json and a figure.",
        formatter_class=_HelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--steps", type=_positive_int, default=500, metavar="N", help="optimizer steps per run"
    )
    parser.add_argument(
        "--depth", type=_positive_int, default=12, metavar="N", help="hidden layers"
    )
    parser.add_argument(
        "--width", type=_positive_int, default=64, metavar="N", help="units per hidden layer"
    )
    parser.add_argument(
        "--seeds",
        "--seed",
        type=_non_negative_int,
        nargs="+",
        default=[0],
        metavar="SEED",
        help="seeds (each sets the initial weights and the batch order); with several, every "
        "run is repeated per seed and the summary gives mean, standard deviation and range",
    )
    parser.add_argument(
        "--batch-size", type=_positive_int, default=128, metavar="N", help="global batch size"
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=1e-3,
        metavar="LR",
        help="learning rate of optax.adamw",
    )
    parser.add_argument(
        "--weight-decay", type=float, default=1e-4, metavar="WD", help="weight decay of optax.adamw"
    )
    parser.add_argument(
        "--activation",
        choices=("relu", "tanh"),
        default="relu",
        help="activation after each hidden layer (He init means LeCun's for tanh)",
    )
    parser.add_argument(
        "--norms",
        nargs="+",
        choices=tuple(_NORM_NAMES),
        default=["layer"],
        help="normalized runs beside the two without normalization: layer = "
        "eqx_norm.LayerNorm, rms = eqx_norm.RMSNorm (He init, the same weights as the "
        "baseline's)",
    )
    parser.add_argument(
        "--init-scales",
        type=_positive_float,
        nargs="*",
        default=[0.25, 0.5, 1.0, 2.0, 4.0],
        metavar="SCALE",
        help="initial weight scales (multiples of He init) at which the runs without and "
        "with normalization are repeated, to show how much the scale matters; give none "
        "(--init-scales with no value) to skip",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="dtype of the activations; parameters, optimizer state and loss stay float32",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("demo_output"),
        metavar="DIR",
        help="folder for the figure and summary.json",
    )
    parser.add_argument("--no-plot", action="store_true", help="do not write the figure")
    parser.add_argument(
        "--devices",
        type=_positive_int,
        default=None,
        metavar="N",
        help="shard each batch over N devices, in all processes together; on the CPU, N "
        "devices are simulated (default: one per process)",
    )
    saving = parser.add_argument_group(
        "checkpoints", "save every run's state, and go on from it after a crash or a kill"
    )
    saving.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="save checkpoints here, one folder per run; the format is described in "
        "docs/training_demo.md (default: no checkpoints)",
    )
    saving.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        default=100,
        metavar="N",
        help="steps between checkpoints",
    )
    saving.add_argument(
        "--resume",
        action="store_true",
        help="go on from the checkpoints in --checkpoint-dir (finished runs are read back, "
        "not retrained); the other options must be those of the interrupted command",
    )
    multi = parser.add_argument_group(
        "multi-process", "data parallel across processes (JAX's distributed runtime)"
    )
    multi.add_argument(
        "--processes",
        type=_positive_int,
        default=None,
        metavar="N",
        help="start N local processes that train together (default: this process alone)",
    )
    multi.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="how long --processes waits for its processes before it stops them",
    )
    multi.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help="address of process 0's coordinator on a multi-host run (default: "
        "$EQX_NORM_COORDINATOR; with none of the three multi-host settings, one process)",
    )
    multi.add_argument(
        "--num-processes",
        type=_positive_int,
        default=None,
        metavar="N",
        help="processes in all (default: $EQX_NORM_NUM_PROCESSES)",
    )
    multi.add_argument(
        "--process-id",
        type=_non_negative_int,
        default=None,
        metavar="ID",
        help="this process's id, 0 to N-1 (default: $EQX_NORM_PROCESS_ID)",
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
    for name in ("learning_rate", "weight_decay"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            parser.error(f"--{name.replace('_', '-')} must be finite and >= 0, got {value}")
    if args.resume and args.checkpoint_dir is None:
        parser.error("--resume needs --checkpoint-dir: the folder to resume from")
    args.seeds = list(dict.fromkeys(args.seeds))  # each seed once, in the order given
    args.norms = list(dict.fromkeys(args.norms))
    args.init_scales = sorted(set(args.init_scales))
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


def missing_demo_packages(plot: bool = True) -> list[str]:
    """The pip names of the demo extra's packages that cannot be imported."""
    import importlib

    missing = []
    for module, name in _DEMO_EXTRA:
        if module == "matplotlib" and not plot:
            continue
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(name)
    return missing


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the exit status.

    With ``--processes N`` this process only launches N copies of the command (without
    that flag) through :func:`eqx_norm.demo.distributed.launch_local_processes`. A copy
    started that way, or on a real host with ``--coordinator`` etc., joins JAX's
    distributed runtime through :func:`eqx_norm.demo.distributed.initialize_from_args`
    before JAX starts, and then trains on the global mesh; only process 0 prints and
    writes files.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    missing = missing_demo_packages(plot=not args.no_plot)
    if missing:
        print(
            f"python -m eqx_norm.demo: error: the demo needs {', '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed. Install the demo extra: "
            'pip install ".[demo]" in a checkout of eqx_norm, or pip install "eqx_norm[demo]".',
            file=sys.stderr,
        )
        return 2
    if args.processes:
        from . import distributed

        return distributed.launch_local_processes(
            without_processes(argv),
            args.processes,
            timeout=args.timeout,
            devices_per_process=args.local_devices,
        )
    request_cpu_devices(args.local_devices)
    flags = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in flags) or any(name in os.environ for name in _MULTI_PROCESS_ENV):
        from . import distributed

        try:
            joined = distributed.initialize_from_args(*flags)
        except ValueError as error:
            print(f"python -m eqx_norm.demo: error: {error}", file=sys.stderr)
            return 2
        if joined:
            with distributed.exit_on_error():  # a failing process must not hang the others
                return _run(args)
    return _run(args)


# ---------------------------------------------------------------------------- the runs


def run_configs(args: argparse.Namespace, seed: int):
    """The main runs and the init-scale runs of one seed, as TrainConfigs.

    Main runs: no norm with the default init, no norm with He init, and each of
    ``args.norms`` with He init. Scale runs: no norm and each norm, He init times each of
    ``args.init_scales`` (scale 1 is the main runs themselves).
    """
    from ._train import TrainConfig

    base = TrainConfig(
        depth=args.depth,
        width=args.width,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        seed=seed,
        activation=args.activation,
        dtype=args.dtype,
        devices=args.devices,
    )
    main_runs = [dataclasses.replace(base, norm="none", init="default")]
    main_runs += [dataclasses.replace(base, norm=n, init="he") for n in ("none", *args.norms)]
    scale_runs = [
        dataclasses.replace(base, norm=n, init="he", init_scale=float(s))
        for s in args.init_scales
        for n in ("none", *args.norms)
    ]
    return main_runs, scale_runs


def run_folder(config) -> str:
    """The checkpoint sub-folder of a run, e.g. ``seed0-layer-he-x1``."""
    return f"seed{config.seed}-{config.norm}-{config.init}-x{config.init_scale:g}"


def _stats(values: Sequence[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(a.mean()),
        "std": float(a.std()),
        "min": float(a.min()),
        "max": float(a.max()),
    }


def _number(value: float, fmt: str) -> str:
    if fmt == "ratio":  # 2 decimals below 100 (1.59), 3 significant digits above (835)
        return f"{value:.2f}" if abs(value) < 100 else f"{value:.3g}"
    return format(value, fmt)


def _cell(values: Sequence[float], fmt: str) -> str:
    if len(values) == 1:
        return _number(values[0], fmt)
    s = _stats(values)
    return (
        f"{_number(s['mean'], fmt)} ± {_number(s['std'], fmt)} "
        f"[{_number(s['min'], fmt)}, {_number(s['max'], fmt)}]"
    )


def _format_gradient_table(results) -> str:
    """Per-layer Linear weight gradient norms at the first step, one column per run."""
    depth = len(results[0].grad_norms_first["weight"]) - 1
    labels = [r.config.label for r in results]
    width = max(12, *(len(label) for label in labels))
    lines = [
        f"Gradient norm of each Linear weight at the first step (seed {results[0].config.seed})",
        f"{'layer':<9}| " + " | ".join(f"{label:>{width}}" for label in labels),
    ]
    lines.append("-" * len(lines[-1]))
    for i in range(depth + 1):
        name = f"{i + 1}" if i < depth else f"{i + 1} (head)"
        cells = [f"{r.grad_norms_first['weight'][i]:>{width}.2e}" for r in results]
        lines.append(f"{name:<9}| " + " | ".join(cells))
    return "\n".join(lines)


def _format_summary(runs: dict[str, list], labels: Sequence[str], seeds: Sequence[int]) -> str:
    several = len(seeds) > 1
    acc_w, ratio_w, loss_w = (30, 28, 11) if several else (13, 22, 11)
    header = (
        f"{'run':<22} {'test accuracy':>{acc_w}} {'grad ratio, first step':>{ratio_w}} "
        f"{'final loss':>{loss_w}}"
    )
    lines = [header, "-" * len(header)]
    for label in labels:
        results = runs[label]
        acc = _cell([r.test_accuracy for r in results], ".3f")
        ratio = _cell([r.ratio_first for r in results], "ratio")
        loss = np.mean([r.final_loss for r in results])
        lines.append(f"{label:<22} {acc:>{acc_w}} {ratio:>{ratio_w}} {loss:>{loss_w}.3g}")
    seeds_text = ", ".join(map(str, seeds))
    lines.append(
        f"seeds {seeds_text}"
        + (": mean ± standard deviation [min, max]." if several else ".")
        + " final loss: cross-entropy on the whole training set after the last step"
        + (" (mean over seeds)." if several else ".")
        + "\ngrad ratio: largest over smallest gradient norm of the hidden layers' Linear "
        "weights (1 = even through depth; the head is left out)."
    )
    return "\n".join(lines)


def _format_scales(runs: dict[str, list], args: argparse.Namespace) -> str:
    from ._train import TrainConfig, default_init_scale

    norms = ("none", *args.norms)
    names = {"none": "no norm", **_NORM_NAMES}
    several = len(args.seeds) > 1
    width = 30 if several else 13
    lines = [
        f"Test accuracy after {args.steps} steps against the initial weight scale (x He init"
        f"; the default init is {default_init_scale(args.activation):.2f}x)",
        f"{'scale':>6} | " + " | ".join(f"{names[n]:>{width}}" for n in norms),
    ]
    lines.append("-" * len(lines[-1]))
    for scale in args.init_scales:
        cells = []
        for norm in norms:
            label = TrainConfig(
                norm=norm, init="he", init_scale=scale, activation=args.activation
            ).label
            cells.append(f"{_cell([r.test_accuracy for r in runs[label]], '.3f'):>{width}}")
        lines.append(f"{scale:>6g} | " + " | ".join(cells))
    return "\n".join(lines)


def _verdict(runs: dict[str, list], labels: Sequence[str], args: argparse.Namespace) -> str:
    """What the numbers say, in words, computed from them."""
    from ._train import TrainConfig

    baseline = TrainConfig(norm="none", init="he", activation=args.activation).label
    base = [r.test_accuracy for r in runs[baseline]]
    lines = []
    for norm in args.norms:
        label = TrainConfig(norm=norm, activation=args.activation).label
        acc = [r.test_accuracy for r in runs[label]]
        diff = float(np.mean(acc) - np.mean(base))
        if len(args.seeds) == 1:
            where = "one seed, no spread to compare with: run with --seeds 0 1 2 3 4"
        elif max(acc) < min(base) or min(acc) > max(base):
            where = "beyond the spread over seeds: the seed ranges do not overlap"
        else:
            where = "within the spread over seeds: the seed ranges overlap"
        lines.append(f"{label} against {baseline}: {diff:+.3f} test accuracy ({where}).")
    if len(args.init_scales) > 1:
        for norm in ("none", *args.norms):
            means = [
                np.mean(
                    [
                        r.test_accuracy
                        for r in runs[
                            TrainConfig(
                                norm=norm, init="he", init_scale=s, activation=args.activation
                            ).label
                        ]
                    ]
                )
                for s in args.init_scales
            ]
            name = {"none": "no norm", **_NORM_NAMES}[norm]
            lines.append(
                f"{name}: test accuracy {min(means):.3f} to {max(means):.3f} over init scales "
                f"{args.init_scales[0]:g} to {args.init_scales[-1]:g}."
            )
    return "\n".join(lines)


def _environment(args: argparse.Namespace) -> dict:
    import jax
    import jaxlib

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from .. import __version__

    return {
        "cpu": cpu,
        "platform": jax.devices()[0].platform,
        "devices": args.devices,
        "processes": jax.process_count(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "numpy": np.__version__,
        "eqx_norm": __version__,
        "python": platform.python_version(),
    }


def _run_json(r) -> dict:
    return {
        "seed": r.config.seed,
        "test_accuracy": r.test_accuracy,
        "test_loss": r.test_loss,
        "final_loss": r.final_loss,
        "ratio_first": r.ratio_first,
        "ratio_last": r.ratio_last,
        "resumed_at": r.resumed_at,
        "losses": r.losses.tolist(),
        "eval_steps": r.eval_steps.tolist(),
        "test_accuracies": r.test_accuracies.tolist(),
        "grad_norms_first": {k: v.tolist() for k, v in r.grad_norms_first.items()},
        "grad_norms_last": {k: v.tolist() for k, v in r.grad_norms_last.items()},
    }


def _summary_json(runs, main_labels, args, environment, seconds) -> dict:
    config = dataclasses.asdict(next(iter(runs.values()))[0].config)
    for name in ("seed", "norm", "init", "init_scale"):
        del config[name]
    return {
        "config": config,
        "seeds": args.seeds,
        "main_runs": list(main_labels),
        "init_scales": args.init_scales,
        "aggregate": {
            label: {
                "test_accuracy": _stats([r.test_accuracy for r in results]),
                "ratio_first": _stats([r.ratio_first for r in results]),
                "final_loss": _stats([r.final_loss for r in results]),
            }
            for label, results in runs.items()
        },
        "runs": {label: [_run_json(r) for r in results] for label, results in runs.items()},
        "environment": environment,
        "reproducibility": REPRODUCIBILITY,
        "seconds": seconds,
    }


def _run(args: argparse.Namespace) -> int:
    import jax

    from ._train import Checkpointing, describe_init, load_data, train

    start = time.perf_counter()
    is_main = jax.process_index() == 0
    say = print if is_main else (lambda *a, **k: None)
    runs: dict[str, list] = {}
    main_labels: list[str] = []
    try:
        data = load_data()
        say(
            f"eqx_norm training demo: scikit-learn digits, {len(data.x_train)} train / "
            f"{len(data.x_test)} test examples, 64 standardised pixels, 10 classes"
        )
        say(
            f"model: {args.depth} x [Linear({args.width}) -> norm (or not) -> "
            f"{args.activation}] -> Linear(10), {args.dtype} activations, float32 parameters"
        )
        say(f"init: {describe_init(args.activation)}")
        say(
            f"training: optax.adamw(learning_rate={args.learning_rate:g}, weight_decay="
            f"{args.weight_decay:g}), batch {args.batch_size}, {args.steps} steps, seeds "
            f"{' '.join(map(str, args.seeds))}, batch sharded over {args.devices} "
            f"{jax.devices()[0].platform} device(s) in {jax.process_count()} process(es)"
        )
        for seed in args.seeds:
            main_runs, scale_runs = run_configs(args, seed)
            done = set()
            for config in main_runs + scale_runs:
                if config in done:  # the scale-1 runs are main runs
                    continue
                done.add(config)
                checkpointing = None
                if args.checkpoint_dir is not None:
                    checkpointing = Checkpointing(
                        args.checkpoint_dir / run_folder(config),
                        every=args.checkpoint_every,
                        resume=args.resume,
                    )
                t = time.perf_counter()
                result = train(config, data, progress=is_main, checkpointing=checkpointing)
                runs.setdefault(config.label, []).append(result)
                resumed = f", resumed at step {result.resumed_at}" if result.resumed_at else ""
                say(
                    f"[{config.label}] seed {seed}: test accuracy {result.test_accuracy:.3f}, "
                    f"final loss {result.final_loss:.3g}, first-step grad ratio "
                    f"{result.ratio_first:.3g} ({time.perf_counter() - t:.1f} s{resumed})",
                    flush=True,
                )
            main_labels = [c.label for c in main_runs]
    except ValueError as error:  # CheckpointError is a ValueError too
        print(f"python -m eqx_norm.demo: error: {error}", file=sys.stderr)
        return 2
    if not is_main:
        return 0
    first_seed = [runs[label][0] for label in main_labels]
    print()
    print(_format_gradient_table(first_seed))
    print()
    print(_format_summary(runs, main_labels, args.seeds))
    if args.init_scales:
        print()
        print(_format_scales(runs, args))
    print()
    print(_verdict(runs, main_labels, args))
    print()
    print(f"Reproducibility: {REPRODUCIBILITY}")
    environment = _environment(args)
    print(
        f"This run: {environment['cpu']}, {args.devices} {environment['platform']} device(s) in "
        f"{environment['processes']} process(es), jax {environment['jaxlib']}."
    )
    args.out.mkdir(parents=True, exist_ok=True)
    summary = args.out / "summary.json"
    seconds = time.perf_counter() - start
    summary.write_text(
        json.dumps(_summary_json(runs, main_labels, args, environment, seconds), indent=1)
    )
    print(f"\nsummary written to {summary}")
    if not args.no_plot:
        from ._plot import plot_results

        figure = args.out / "gradient_flow.png"
        plot_results(
            [r for label in main_labels for r in runs[label]],
            figure,
            scale_runs=[r for results in runs.values() for r in results]
            if args.init_scales
            else (),
        )
        print(f"figure written to {figure}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0
