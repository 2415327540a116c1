"""The demo's multi-process set-up: join JAX's distributed runtime, or start local processes.

This is part of the training demo, not of the library: ``import eqx_norm`` never imports
it, and it changes JAX's configuration (CPU collectives) only when
:func:`initialize_from_args` joins a multi-process run.

JAX's own multi-controller runtime is the engine: every process runs the same program,
``jax.distributed.initialize`` connects them through a coordinator, and ``jax.devices()``
then lists the devices of all processes, so a ``Mesh`` over them shards one global batch
across hosts. This module only reads the coordinator address, process count and process id
(from flags or the ``EQX_NORM_*`` environment variables), and, for trying it on one
machine, launches N local processes that never hang: any failure or a timeout stops them
all and says which process failed and why.

Example:
    >>> from eqx_norm.demo.distributed import initialize_from_args
    >>> initialize_from_args(None, None, None)  # no flags, no EQX_NORM_* variables set
    False

On real hosts, run the same command on each one, with the same coordinator address (host
and a free port of process 0's machine), the same process count, and ids 0..N-1::

    EQX_NORM_COORDINATOR=host0:1234 EQX_NORM_NUM_PROCESSES=2 EQX_NORM_PROCESS_ID=0 python -m ...
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from typing import IO

import jax

__all__ = [
    "ENV_COORDINATOR",
    "ENV_NUM_PROCESSES",
    "ENV_PROCESS_ID",
    "exit_on_error",
    "initialize_from_args",
    "launch_local_processes",
]

ENV_COORDINATOR = "EQX_NORM_COORDINATOR"
ENV_NUM_PROCESSES = "EQX_NORM_NUM_PROCESSES"
ENV_PROCESS_ID = "EQX_NORM_PROCESS_ID"

_TAIL_LINES = 20  # lines of a failed process's stderr repeated in the report
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def _int_setting(value: int | str | None, flag: str, env: str) -> int | None:
    if value is None or isinstance(value, int):
        return value
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"`{flag}` (or ${env}) must be an integer, got {value!r}.") from None


def initialize_from_args(
    coordinator: str | None,
    num_processes: int | None,
    process_id: int | None,
    *,
    initialization_timeout: int = 60,
) -> bool:
    """Join JAX's multi-process runtime if a coordinator is given; report whether it did.

    Each argument falls back to its environment variable when None: ``EQX_NORM_COORDINATOR``
    (``host:port`` of process 0), ``EQX_NORM_NUM_PROCESSES`` and ``EQX_NORM_PROCESS_ID``.
    With none of the three given this is a single-process run and nothing happens. With
    all three, CPU collectives are set to gloo and ``jax.distributed.initialize`` connects
    to the coordinator, waiting at most ``initialization_timeout`` seconds for the others.
    Call it before any other JAX call: JAX fixes its device list on first use.

    Args:
        coordinator: ``host:port`` of process 0's coordinator service, e.g. ``"10.0.0.1:1234"``.
        num_processes: how many processes take part, ``>= 1``.
        process_id: this process's id, ``0 <= process_id < num_processes``.
        initialization_timeout: seconds to wait for every process to connect.

    Returns:
        True if the distributed runtime was initialized, False for a single process.

    Raises:
        ValueError: only some of the three settings are given, or one is malformed.

    Example:
        >>> from eqx_norm.demo.distributed import initialize_from_args
        >>> initialize_from_args(None, None, None)
        False
    """
    settings = {
        "--coordinator": (coordinator, ENV_COORDINATOR),
        "--num-processes": (num_processes, ENV_NUM_PROCESSES),
        "--process-id": (process_id, ENV_PROCESS_ID),
    }
    values = {}
    for flag, (value, env) in settings.items():
        if value is None:
            value = os.environ.get(env) or None
        values[flag] = value
    missing = [f"{flag} (or ${settings[flag][1]})" for flag, v in values.items() if v is None]
    if len(missing) == 3:
        return False
    if missing:
        given = ", ".join(f"{flag}={v}" for flag, v in values.items() if v is not None)
        raise ValueError(
            f"A multi-process run needs the coordinator address, the process count and the "
            f"process id; got {given} but not {' and '.join(missing)}. Give all three, or "
            "none for a single-process run."
        )
    address = str(values["--coordinator"])
    if not re.fullmatch(r"\[?[^\s]+?\]?:\d+", address):
        raise ValueError(
            f"`--coordinator` (or ${ENV_COORDINATOR}) must be host:port, e.g. "
            f"'127.0.0.1:1234', got {address!r}."
        )
    count = _int_setting(values["--num-processes"], "--num-processes", ENV_NUM_PROCESSES)
    rank = _int_setting(values["--process-id"], "--process-id", ENV_PROCESS_ID)
    if count < 1:
        raise ValueError(f"`--num-processes` (or ${ENV_NUM_PROCESSES}) must be >= 1, got {count}.")
    if not 0 <= rank < count:
        raise ValueError(
            f"`--process-id` (or ${ENV_PROCESS_ID}) must be in [0, {count}) for "
            f"{count} processes, got {rank}."
        )
    platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS") or "cpu"
    if "cpu" in platforms.split(","):
        # the CPU client needs explicit cross-process collectives; accelerators bring their own
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=count,
        process_id=rank,
        initialization_timeout=int(initialization_timeout),
    )
    return True


@contextlib.contextmanager
def exit_on_error() -> Iterator[None]:
    """In a multi-process run, exit at once on an uncaught exception instead of hanging.

    After ``jax.distributed.initialize``, a process that raises would wait at exit in JAX's
    shutdown barrier (up to 5 minutes) for processes that are themselves blocked waiting for
    it in a collective. Inside this context an exception prints its traceback and ends the
    process with exit code 1 straight away, so the launcher (or the cluster scheduler) sees
    the failure and stops the rest. In a single-process run exceptions propagate as usual.

    Example:
        >>> from eqx_norm.demo.distributed import exit_on_error
        >>> with exit_on_error():
        ...     pass
    """
    try:
        yield
    except Exception:
        if not jax.distributed.is_initialized():
            raise
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pump(stream: IO[bytes], tail: collections.deque, forward: IO[str] | None) -> None:
    """Copy ``stream`` as it comes to ``forward`` and its last lines into ``tail``.

    Bytes are forwarded unchanged as soon as they arrive, so progress bars that redraw
    with ``\\r`` keep working; ``tail`` keeps, of each line, what a terminal would show.
    """
    pending = b""
    while chunk := stream.read1(1 << 16):
        if forward is not None:
            forward.flush()
            target = getattr(forward, "buffer", None)
            if target is not None:
                target.write(chunk)
                target.flush()
            else:
                forward.write(chunk.decode(errors="replace"))
                forward.flush()
        *lines, pending = (pending + chunk).split(b"\n")
        tail.extend(line.rsplit(b"\r", 1)[-1].decode(errors="replace") for line in lines)
    if pending:
        tail.append(pending.rsplit(b"\r", 1)[-1].decode(errors="replace"))
    stream.close()


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def launch_local_processes(
    argv: Sequence[str],
    num_processes: int,
    *,
    timeout: float,
    module: str = "eqx_norm.demo",
    devices_per_process: int | None = None,
) -> int:
    """Run ``python -m module *argv`` as ``num_processes`` cooperating local processes.

    The processes share a coordinator on a free port of 127.0.0.1 and get their rank
    through ``EQX_NORM_COORDINATOR``, ``EQX_NORM_NUM_PROCESSES`` and ``EQX_NORM_PROCESS_ID``
    (the module calls :func:`initialize_from_args`). Process 0's stdout and stderr are
    streamed to this process's; the others' are kept only to report a failure. If any
    process exits non-zero, or ``timeout`` seconds pass, the remaining processes are killed
    and a report naming the failed (or still running) processes and the last lines of
    their stderr is written to stderr. This function never waits longer than ``timeout``
    plus a few seconds to reap the killed processes.

    Args:
        argv: arguments after ``python -m module``, the same for every process.
        num_processes: how many processes to start, ``>= 1``.
        timeout: seconds the whole run may take, ``> 0``.
        module: the module to run; it must call :func:`initialize_from_args`.
        devices_per_process: if set, each process simulates this many CPU devices
            (``XLA_FLAGS=--xla_force_host_platform_device_count=N``).

    Returns:
        0 if every process exited with 0; otherwise the first failed process's exit code
        (1 if it was killed by a signal), or 124 on a timeout.

    Example:
        >>> from eqx_norm.demo.distributed import launch_local_processes
        >>> launch_local_processes(["--steps", "2"], 2, timeout=120.0)  # doctest: +SKIP
        0
    """
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"`num_processes` must be a positive int, got {num_processes!r}.")
    if not timeout > 0:
        raise ValueError(f"`timeout` must be a positive number of seconds, got {timeout!r}.")
    if devices_per_process is not None and (
        isinstance(devices_per_process, bool)
        or not isinstance(devices_per_process, int)
        or devices_per_process < 1
    ):
        raise ValueError(
            f"`devices_per_process` must be a positive int or None, got {devices_per_process!r}."
        )
    address = f"127.0.0.1:{_free_port()}"
    base_env = dict(os.environ)
    if devices_per_process is not None:
        flags = [f for f in base_env.get("XLA_FLAGS", "").split() if _DEVICE_COUNT_FLAG not in f]
        base_env["XLA_FLAGS"] = " ".join([*flags, f"{_DEVICE_COUNT_FLAG}={devices_per_process}"])
    processes: list[subprocess.Popen] = []
    tails: list[collections.deque] = []
    pumps: list[threading.Thread] = []
    try:
        for rank in range(num_processes):
            env = dict(base_env)
            env[ENV_COORDINATOR] = address
            env[ENV_NUM_PROCESSES] = str(num_processes)
            env[ENV_PROCESS_ID] = str(rank)
            env["PYTHONUNBUFFERED"] = "1"  # stream process 0's output as it is printed
            process = subprocess.Popen(
                [sys.executable, "-m", module, *argv],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            processes.append(process)
            tail: collections.deque = collections.deque(maxlen=_TAIL_LINES)
            tails.append(tail)
            for stream, forward in (
                (process.stdout, sys.stdout if rank == 0 else None),
                (process.stderr, sys.stderr if rank == 0 else None),
            ):
                # stdout lines of the other processes land in a throwaway deque
                sink = tail if stream is process.stderr else collections.deque(maxlen=1)
                thread = threading.Thread(target=_pump, args=(stream, sink, forward), daemon=True)
                thread.start()
                pumps.append(thread)
        deadline = time.monotonic() + timeout
        failed: list[int] = []
        while True:
            codes = [p.poll() for p in processes]
            failed = [rank for rank, code in enumerate(codes) if code not in (None, 0)]
            if failed or all(code == 0 for code in codes) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - unkillable process
                pass
        for thread in pumps:
            thread.join(timeout=2)
    if not failed and all(p.returncode == 0 for p in processes):
        return 0
    if failed:
        first = failed[0]
        code = processes[first].returncode
        lines = [
            f"eqx_norm: process {first} of {num_processes} (python -m {module}) "
            f"{_describe_exit(code)}; stopped the other processes."
        ]
        lines += [f"eqx_norm: process {r} also {_describe_exit(codes[r])}." for r in failed[1:]]
        lines.append(f"Last lines of process {first}'s stderr:")
        lines += [f"  | {line}" for line in tails[first]] or ["  | (nothing)"]
        status = code if code > 0 else 1
    else:
        running = [rank for rank, code in enumerate(codes) if code is None]
        lines = [
            f"eqx_norm: timed out after {timeout:g} s; process(es) {running} of "
            f"{num_processes} (python -m {module}) were still running and were killed."
        ]
        for rank in running:
            lines.append(f"Last lines of process {rank}'s stderr:")
            lines += [f"  | {line}" for line in tails[rank]] or ["  | (nothing)"]
        status = 124
    print("\n".join(lines), file=sys.stderr, flush=True)
    return status
