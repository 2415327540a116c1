"""The command line of ``python -m eqx_norm.demo``: options, processes, the runs, the report.

The options are parsed, and the CPU device count and the distributed runtime set up,
before JAX's backend starts, so ``python -m eqx_norm.demo --devices 8`` works on a laptop.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from . import _train
from ._train import NORMS, TrainConfig

REPRODUCIBILITY = (
    "Bit for bit, a run repeats only on the same machine (CPU model), jax/jaxlib and eqx_norm "
    "and device layout (--devices, --processes): another layout reorders float32 sums, and the "
    "runs drift apart over hundreds of steps. The data split, the batch order and the initial "
    "weights are the same everywhere; the seed spread (--seeds) is the yardstick."
)


def _checked(kind: type, ok, what: str):
    """An argparse ``type=``: ``kind(text)``, rejected unless ``ok(value)``."""

    def parse(text: str):
        value = kind(text)  # a ValueError here is argparse's "invalid int value" message
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


COUNT = _checked(int, lambda v: v > 0, "a positive integer")
INDEX = _checked(int, lambda v: v >= 0, "an integer >= 0")
SCALE = _checked(float, lambda v: v > 0, "a finite positive number")
RATE = _checked(float, lambda v: v >= 0, "a finite number >= 0")


DESCRIPTION = (
    "Train a deep MLP on scikit-learn's digits, on the same batches, without normalization "
    "(eqx.nn.Linear's default init, then He init: the fair baseline) and with each of --norms; "
    "then again from initial weights scaled up and down. Prints per-layer gradient norms and a "
    "summary, writes summary.json and a figure."
)
SCALES = [0.25, 0.5, 1.0, 2.0, 4.0]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends each option's default, except where it is None or False (the help says it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False):
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The demo's argument parser."""
    parser = argparse.ArgumentParser(
        "python -m eqx_norm.demo", description=DESCRIPTION, formatter_class=_HelpFormatter
    )
    add = parser.add_argument
    add("--steps", type=COUNT, default=500, metavar="N", help="optimizer steps per run")
    add("--depth", type=COUNT, default=12, metavar="N", help="hidden layers")
    add("--width", type=COUNT, default=64, metavar="N", help="units per hidden layer")
    add("--batch-size", type=COUNT, default=128, metavar="N", help="global batch size")
    add("--learning-rate", type=RATE, default=1e-3, metavar="LR", help="of optax.adamw")
    add("--weight-decay", type=RATE, default=1e-4, metavar="WD", help="of optax.adamw")
    seeds = "seeds of the weights and the batch order: several give mean, std and range"
    add("--seeds", "--seed", type=INDEX, nargs="+", default=[0], metavar="SEED", help=seeds)
    norms = ", ".join(f"{k} = eqx_norm.{v.__name__}" for k, v in NORMS.items())
    add("--norms", nargs="+", choices=NORMS, default=["layer"], help=f"normalized runs: {norms}")
    scales = "initial weight scales (x He init) of the sweep; --init-scales alone skips it"
    add("--init-scales", type=SCALE, nargs="*", default=SCALES, metavar="X", help=scales)
    act = "after each hidden layer (He init means LeCun's for tanh)"
    add("--activation", choices=_train.ACTIVATIONS, default="relu", help=act)
    dtype = "of the activations; parameters, optimizer state and loss stay float32"
    add("--dtype", choices=_train.DTYPES, default="float32", help=dtype)
    out = "folder for the figure and summary.json"
    add("--out", type=Path, default=Path("demo_output"), metavar="DIR", help=out)
    add("--no-plot", action="store_true", help="do not write the figure")
    devices = "shard each batch over N devices in all (on the CPU, simulated; default: 1 each)"
    add("--devices", type=COUNT, metavar="N", help=devices)
    group = parser.add_argument_group("checkpoints (orbax), to go on after a kill").add_argument
    group("--checkpoint-dir", type=Path, metavar="DIR", help="one folder per run (default: none)")
    group("--checkpoint-every", type=COUNT, default=100, metavar="N", help="steps between saves")
    resume = "go on from --checkpoint-dir (finished runs are read back); same other options"
    group("--resume", action="store_true", help=resume)
    group = parser.add_argument_group("processes (jax.distributed), data parallel").add_argument
    group("--processes", type=COUNT, metavar="N", help="start N local processes to train together")
    group("--timeout", type=SCALE, default=600.0, metavar="S", help="stop --processes after S s")
    group("--coordinator", metavar="HOST:PORT", help="process 0's address, on several hosts")
    group("--num-processes", type=COUNT, metavar="N", help="processes in all, with --coordinator")
    group("--process-id", type=INDEX, metavar="ID", help="this one's, 0 to N-1, with --coordinator")
    join = "with --coordinator: fail, naming it, unless all processes have joined within S s"
    group("--join-timeout", type=SCALE, default=300.0, metavar="S", help=join)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and cross-check the arguments; errors exit with status 2 and say what to fix."""
    parser = build_parser()
    args = parser.parse_args(argv)
    joined = (args.coordinator, args.num_processes, args.process_id)
    if args.processes and any(v is not None for v in joined):
        parser.error("--processes starts its processes itself: drop --coordinator etc.")
    if any(v is not None for v in joined) and None in joined:
        parser.error("a multi-host run needs --coordinator, --num-processes and --process-id")
    processes = args.processes or args.num_processes or 1
    args.devices = args.devices or processes
    if args.devices % processes:
        parser.error(f"--devices {args.devices} must be a multiple of the processes ({processes})")
    if args.batch_size % args.devices:
        parser.error(
            f"--batch-size {args.batch_size} must be a multiple of --devices {args.devices}"
        )
    if args.resume and args.checkpoint_dir is None:
        parser.error("--resume needs --checkpoint-dir: the folder to resume from")
    args.seeds, args.norms = list(dict.fromkeys(args.seeds)), list(dict.fromkeys(args.norms))
    args.init_scales = sorted(set(args.init_scales))
    args.local_devices = args.devices // processes
    return args


def launch(argv: Sequence[str], processes: int, timeout: float, module="eqx_norm.demo") -> int:
    """Run ``python -m module *argv`` as ``processes`` local processes joined by
    ``jax.distributed`` (``--coordinator``, ``--num-processes``, ``--process-id`` appended).

    Process 0's output is shown; the others' stderr is kept for the report. If one fails,
    or ``timeout`` seconds pass, the others are killed and the failure is reported.
    Returns 0, the failed process's exit code (1 after a signal), or 124 on a timeout.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
    children, logs = [], [None] + [tempfile.TemporaryFile() for _ in range(processes - 1)]
    for rank in range(processes):
        flags = f"--coordinator {address} --num-processes {processes} --process-id {rank}".split()
        out = None if rank == 0 else subprocess.DEVNULL
        command = [sys.executable, "-m", module, *argv, *flags]
        children.append(subprocess.Popen(command, stdout=out, stderr=logs[rank]))
    deadline = time.monotonic() + timeout
    while (codes := [p.poll() for p in children]).count(0) < processes:
        failed = [rank for rank, code in enumerate(codes) if code not in (None, 0)]
        if failed or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    else:
        return 0
    for child in children:
        child.kill()
        child.wait()
    what = f"python -m {module}"
    if failed:
        rank, code = failed[0], codes[failed[0]]
        how = f"exited with code {code}"
        if code < 0:
            how = f"was killed by signal {signal.Signals(-code).name}"
        report = [f"eqx_norm: process {rank} of {processes} ({what}) {how}; stopped the others."]
        status = code if code > 0 else 1
    else:
        rank = [r for r, code in enumerate(codes) if code is None][-1]
        running = [r for r, code in enumerate(codes) if code is None]
        report = [
            f"eqx_norm: timed out after {timeout:g} s; process(es) {running} of {processes} "
            f"({what}) were still running and were killed."
        ]
        status = 124
    if logs[rank] is not None:
        logs[rank].seek(0)
        tail = logs[rank].read().decode(errors="replace").splitlines()[-20:]
        report += [f"Last lines of process {rank}'s stderr:", *(f"  | {line}" for line in tail)]
    print("\n".join(report), file=sys.stderr, flush=True)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo (``--processes N``: :func:`launch` N copies); returns the exit status.

    A process given ``--coordinator`` etc. joins ``jax.distributed`` before JAX starts and
    trains on the global mesh; only process 0 prints and writes files."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if not args.no_plot and importlib.util.find_spec("matplotlib") is None:
        print('error: the figure needs matplotlib: pip install "eqx_norm[demo]"', file=sys.stderr)
        return 2
    if args.processes:
        flag = {i + j for i, a in enumerate(argv) if a == "--processes" for j in (0, 1)}
        child = [a for i, a in enumerate(argv) if i not in flag and "--processes=" not in a]
        return launch(child, args.processes, args.timeout)
    with contextlib.suppress(RuntimeError):  # JAX has started: make_mesh says what to do
        jax.config.update("jax_num_cpu_devices", args.local_devices)
    if args.coordinator is None:
        return _run(args)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    _join(args)
    try:
        return _run(args)
    except BaseException:  # exit now: the others would wait in a collective, and we for them
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


def _join(args: argparse.Namespace) -> None:
    """``jax.distributed.initialize``, or exit 1 after ``--join-timeout`` seconds with an
    error that names the coordinator.

    Past its own ``initialization_timeout``, JAX aborts the process from C++ with a check
    failure that names no address; so JAX is given a few seconds more and a timer thread
    (``initialize`` waits without the GIL) reports first."""

    def give_up():
        n = args.num_processes
        print(
            f"python -m eqx_norm.demo: error: process {args.process_id} of {n} could not join "
            f"the coordinator at {args.coordinator} within {args.join_timeout:g} s "
            f"(--join-timeout): start each of the {n} processes with --coordinator "
            f"{args.coordinator} --num-processes {n} and its own --process-id (0 to {n - 1}), "
            "and check that process 0's host is reachable at that address",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)

    timer = threading.Timer(args.join_timeout, give_up)
    timer.daemon = True
    timer.start()
    jax.distributed.initialize(
        args.coordinator,
        args.num_processes,
        args.process_id,
        initialization_timeout=math.ceil(args.join_timeout) + 10,
    )
    timer.cancel()


# ---------------------------------------------------------------------------- the runs


def run_configs(args: argparse.Namespace, seed: int) -> tuple[list[TrainConfig], list[TrainConfig]]:
    """The main runs (no norm with the default init and with He init, then each norm) and
    the init-scale runs (no norm and each norm at each other scale) of one seed."""
    names = [f.name for f in dataclasses.fields(TrainConfig) if f.name in vars(args)]
    base = TrainConfig(seed=seed, **{name: getattr(args, name) for name in names})
    norms = ("none", *args.norms)
    main_runs = [dataclasses.replace(base, norm="none", init="default")]
    main_runs += [dataclasses.replace(base, norm=n) for n in norms]
    scaled = [dataclasses.replace(c, init_scale=s) for s in args.init_scales for c in main_runs[1:]]
    return main_runs, [c for c in scaled if c not in main_runs]


def _stats(values: Sequence[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": a.mean(), "std": a.std(), "min": a.min(), "max": a.max()}


def _cell(values: Sequence[float], fmt: str) -> str:
    def f(v):  # "ratio": 2 decimals below 100 (1.59), 3 significant digits above (835)
        return (f"{v:.2f}" if abs(v) < 100 else f"{v:.3g}") if fmt == "ratio" else format(v, fmt)

    s = _stats(values)
    one = len(values) == 1
    return f(s["mean"]) if one else f"{f(s['mean'])} ± {f(s['std'])} [{f(s['min'])}, {f(s['max'])}]"


def _report(runs: dict[str, list], main_labels: list[str], args: argparse.Namespace) -> str:
    """The gradient table, the summary, the init-scale table and the verdicts."""
    first = [runs[label][0] for label in main_labels]
    w = max(12, *map(len, main_labels))
    lines = [f"Gradient norm of each Linear weight at the first step (seed {args.seeds[0]})"]
    lines += [f"{'layer':<9}| " + " | ".join(f"{label:>{w}}" for label in main_labels)]
    lines.append("-" * len(lines[-1]))
    for i in range(args.depth + 1):
        name = f"{i + 1}" if i < args.depth else f"{i + 1} (head)"
        cells = (f"{r.grad_norms_first['weight'][i]:>{w}.2e}" for r in first)
        lines.append(f"{name:<9}| " + " | ".join(cells))
    several = len(args.seeds) > 1
    aw, rw = (30, 28) if several else (13, 22)
    header = f"{'test accuracy':>{aw}} {'grad ratio, first step':>{rw}} {'final loss':>11}"
    lines += ["", f"{'run':<22} {header}", "-" * (35 + aw + rw)]
    for label in main_labels:
        acc = _cell([r.test_accuracy for r in runs[label]], ".3f")
        ratio = _cell([r.ratio_first for r in runs[label]], "ratio")
        loss = np.mean([r.final_loss for r in runs[label]])
        lines.append(f"{label:<22} {acc:>{aw}} {ratio:>{rw}} {loss:>11.3g}")
    lines.append(
        f"seeds {', '.join(map(str, args.seeds))}"
        + (": mean ± standard deviation [min, max]." if several else ".")
        + " final loss: cross-entropy on the whole training set after the last step"
        + (" (mean over seeds)." if several else ".")
        + "\ngrad ratio: largest over smallest gradient norm of the hidden layers' Linear "
        "weights (1 = even through depth; the head is left out)."
    )
    norms = ("none", *args.norms)
    names = {"none": "no norm", **{k: v.__name__ for k, v in NORMS.items()}}

    def accuracies(norm, scale=1.0, init="he"):
        c = TrainConfig(norm=norm, init=init, init_scale=scale, activation=args.activation)
        return [r.test_accuracy for r in runs[c.label]]

    if args.init_scales:
        default = _train.default_init_scale(args.activation)
        lines += [
            "",
            f"Test accuracy after {args.steps} steps against the initial weight scale "
            f"(x He init; the default init is {default:.2f}x)",
        ]
        lines.append(f"{'scale':>6} | " + " | ".join(f"{names[n]:>{aw}}" for n in norms))
        lines.append("-" * len(lines[-1]))
        for s in args.init_scales:
            cells = (f"{_cell(accuracies(n, s), '.3f'):>{aw}}" for n in norms)
            lines.append(f"{s:>6g} | " + " | ".join(cells))
    lines.append("")
    base = accuracies("none")
    for norm in args.norms:
        acc, diff = accuracies(norm), np.mean(accuracies(norm)) - np.mean(base)
        if not several:
            where = "one seed, no spread to compare with: run with --seeds 0 1 2 3 4"
        elif max(acc) < min(base) or min(acc) > max(base):
            where = "beyond the spread over seeds: the seed ranges do not overlap"
        else:
            where = "within the spread over seeds: the seed ranges overlap"
        lines.append(f"{names[norm]} against {main_labels[1]}: {diff:+.3f} test accuracy ({where})")
    for norm in norms if len(args.init_scales) > 1 else ():
        means = [np.mean(accuracies(norm, s)) for s in args.init_scales]
        lines.append(
            f"{names[norm]}: test accuracy {min(means):.3f} to {max(means):.3f} over init "
            f"scales {args.init_scales[0]:g} to {args.init_scales[-1]:g}."
        )
    return "\n".join(lines)


def _environment(args: argparse.Namespace) -> dict:
    import jaxlib

    from .. import __version__

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):  # Linux names the CPU model there
        models = [l[13:].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")]
        cpu = models[0] if models else cpu
    versions = {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "eqx_norm": __version__}
    where = {"cpu": cpu, "platform": jax.devices()[0].platform, "processes": jax.process_count()}
    return where | {"devices": args.devices, "python": platform.python_version()} | versions


def _run_json(r: _train.RunResult) -> dict:
    fields = ("test_accuracy", "test_loss", "final_loss", "ratio_first", "resumed_at")
    arrays = ("losses", "eval_steps", "test_accuracies", "grad_norms_first", "grad_norms_last")
    out = {"seed": r.config.seed, **{name: getattr(r, name) for name in fields}}
    return out | {name: jax.tree.map(np.ndarray.tolist, getattr(r, name)) for name in arrays}


def _run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    is_main = jax.process_index() == 0
    say = print if is_main else (lambda *a, **k: None)
    data = _train.load_data()
    say(
        f"eqx_norm training demo: scikit-learn digits, {len(data.x_train)} train / "
        f"{len(data.x_test)} test examples, 64 standardised pixels, 10 classes"
    )
    say(
        f"model: {args.depth} x [Linear({args.width}) -> norm (or not) -> {args.activation}] "
        f"-> Linear(10), {args.dtype} activations, float32 parameters"
    )
    gain, ideal = (2, "He") if args.activation == "relu" else (1, "LeCun")
    say(
        f"init: 'default' is eqx.nn.Linear's U(-1/sqrt(fan_in), 1/sqrt(fan_in)), "
        f"{_train.default_init_scale(args.activation):.2f}x the {ideal} init that "
        f"{args.activation} needs: without normalization the signal shrinks by that much per "
        f"layer; '{ideal}' draws N(0, {gain}/fan_in), zero biases, and keeps its scale."
    )
    say(
        f"training: optax.adamw(learning_rate={args.learning_rate:g}, weight_decay="
        f"{args.weight_decay:g}), batch {args.batch_size}, {args.steps} steps, seeds "
        f"{' '.join(map(str, args.seeds))}, batch sharded over {args.devices} "
        f"{jax.devices()[0].platform} device(s) in {jax.process_count()} process(es)",
        flush=True,
    )
    runs: dict[str, list] = {}
    for seed in args.seeds:
        main_runs, scale_runs = run_configs(args, seed)
        for config in main_runs + scale_runs:
            folder = f"seed{seed}-{config.norm}-{config.init}-x{config.init_scale:g}"
            t = time.perf_counter()
            try:
                result = _train.train(
                    config,
                    data,
                    progress=is_main,
                    resume=args.resume,
                    checkpoint_dir=args.checkpoint_dir and args.checkpoint_dir / folder,
                    checkpoint_every=args.checkpoint_every,
                )
            except ValueError as error:  # a checkpoint of another run, too few devices
                print(f"python -m eqx_norm.demo: error: {error}", file=sys.stderr)
                return 2
            runs.setdefault(config.label, []).append(result)
            resumed = f", resumed at step {result.resumed_at}" if result.resumed_at else ""
            say(
                f"[{config.label}] seed {seed}: test accuracy {result.test_accuracy:.3f}, final "
                f"loss {result.final_loss:.3g}, first-step grad ratio {result.ratio_first:.3g} "
                f"({time.perf_counter() - t:.1f} s{resumed})",
                flush=True,
            )
    if not is_main:
        return 0
    main_labels = [c.label for c in main_runs]
    environment = _environment(args)
    print(f"\n{_report(runs, main_labels, args)}\n\nReproducibility: {REPRODUCIBILITY}")
    print(
        f"This run: {environment['cpu']}, {args.devices} {environment['platform']} device(s) "
        f"in {environment['processes']} process(es), jax {environment['jax']}."
    )
    args.out.mkdir(parents=True, exist_ok=True)
    config = dataclasses.asdict(main_runs[0])
    for name in ("seed", "norm", "init", "init_scale"):  # these differ between the runs
        del config[name]
    summary = {"config": config, "seeds": args.seeds, "main_runs": main_labels}
    summary |= {"init_scales": args.init_scales, "environment": environment}
    summary |= {"reproducibility": REPRODUCIBILITY, "seconds": time.perf_counter() - start}
    summary |= {
        "aggregate": {
            label: {k: _stats([getattr(r, k) for r in rs]) for k in ("test_accuracy", "final_loss")}
            for label, rs in runs.items()
        },
        "runs": {label: [_run_json(r) for r in rs] for label, rs in runs.items()},
    }
    path = args.out / "summary.json"
    path.write_text(json.dumps(summary, indent=1))
    print(f"\nsummary written to {path}")
    if not args.no_plot:
        from ._plot import plot_results

        figure = args.out / "gradient_flow.png"
        main_results = [r for label in main_labels for r in runs[label]]
        scale_results = [r for rs in runs.values() for r in rs] if args.init_scales else ()
        plot_results(main_results, figure, scale_runs=scale_results)
        print(f"figure written to {figure}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0
