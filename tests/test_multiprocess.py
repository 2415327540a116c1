"""Data-parallel training across 2 processes on 127.0.0.1, against the single-process run.

The processes are started by ``eqx_norm.demo.distributed.launch_local_processes`` (gloo CPU
collectives, 2 simulated CPU devices each, so a global mesh of 4 devices) and run either
``tests/_multiprocess_worker.py`` (a few optax steps; it writes its final parameters) or
the demo, ``python -m eqx_norm.demo --processes 2``. Every run has a bounded timeout, and
each failure mode (a process that exits before joining, is killed, raises, or the whole
run times out) must be reported with the failed process's id and its last stderr lines,
quickly, never by hanging. The tests that start processes are marked slow.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from eqx_norm.demo import TrainConfig, load_data, train
from eqx_norm.demo.distributed import (
    ENV_COORDINATOR,
    ENV_NUM_PROCESSES,
    ENV_PROCESS_ID,
    initialize_from_args,
    launch_local_processes,
)

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
WORKER = "_multiprocess_worker"
TIMEOUT = 90.0  # a healthy 2-process run takes ~5 s on 2 busy cores; this only bounds a hang


@pytest.fixture
def worker_env(monkeypatch):
    """Children import eqx_norm from this checkout and the worker from tests/."""
    path = os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")])
    monkeypatch.setenv("PYTHONPATH", path)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    for name in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)


def single_process_run(out):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    subprocess.run(
        [sys.executable, "-m", WORKER, "--out", str(out)],
        env=env,
        check=True,
        timeout=TIMEOUT,
        capture_output=True,
    )
    return json.loads(out.read_text())


@pytest.mark.slow
def test_two_processes_train_like_one(worker_env, tmp_path, capsys):
    reference = single_process_run(tmp_path / "single.json")
    code = launch_local_processes(
        ["--out", str(tmp_path / "multi.json"), "--steps", "3"],
        2,
        timeout=TIMEOUT,
        module=WORKER,
        devices_per_process=2,
    )
    assert code == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "multi.json").read_text())
    assert reference["distributed"] is False and reference["device_count"] == 1
    assert result["distributed"] is True
    assert (result["process_count"], result["device_count"], result["local_device_count"]) == (
        2,
        4,
        2,
    )
    assert result["x_sharding"] == "P('batch',)" and result["loss_sharding_replicated"]
    # float32: the 4-device run sums the batch in a different order (partial sums per
    # device), so results agree to a few ulps of O(1) values, not bit for bit
    np.testing.assert_allclose(result["losses"], reference["losses"], rtol=1e-5)
    assert result["losses"][-1] < result["losses"][0]  # it trained
    assert len(result["params"]) == len(reference["params"]) == 6  # 2 Linear (w, b) + gamma, beta
    for got, expected in zip(result["params"], reference["params"]):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # process 0's output is streamed through
    assert "process 0: done" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("how", "code", "message", "tail"),
    [
        ("start", 3, "exited with code 3", "failing on purpose (start)"),
        ("kill", 1, "was killed by signal SIGKILL", "failing on purpose (kill)"),
        ("raise", 1, "exited with code 1", "RuntimeError: failing on purpose"),
    ],
)
def test_failed_process_is_reported_and_the_rest_stopped(
    worker_env, tmp_path, capsys, how, code, message, tail
):
    start = time.monotonic()
    status = launch_local_processes(
        ["--out", str(tmp_path / "out.json"), "--fail-process", "1", "--fail-how", how],
        2,
        timeout=TIMEOUT,
        module=WORKER,
        devices_per_process=2,
    )
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert status == code, err
    assert f"process 1 of 2 (python -m {WORKER}) {message}; stopped the other processes." in err
    assert "Last lines of process 1's stderr:" in err and tail in err
    # reported as soon as process 1 failed, not after a JAX timeout (30 s and more)
    assert elapsed < 25, elapsed
    assert not (tmp_path / "out.json").exists()


def test_initialize_without_settings_is_single_process(monkeypatch):
    for name in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    assert initialize_from_args(None, None, None) is False


@pytest.mark.parametrize(
    ("flags", "env", "match"),
    [
        (
            ("127.0.0.1:1234", None, None),
            {},
            r"got --coordinator=127.0.0.1:1234 but not --num-processes \(or "
            r"\$EQX_NORM_NUM_PROCESSES\) and --process-id \(or \$EQX_NORM_PROCESS_ID\)",
        ),
        (
            (None, 2, None),
            {ENV_PROCESS_ID: "0"},
            r"but not --coordinator \(or \$EQX_NORM_COORDINATOR\)",
        ),
        (("localhost", 2, 0), {}, r"`--coordinator` .* must be host:port.*got 'localhost'"),
        (("127.0.0.1:1234", 2, 2), {}, r"`--process-id` .* must be in \[0, 2\).* got 2"),
        (("127.0.0.1:1234", 0, 0), {}, r"`--num-processes` .* must be >= 1, got 0"),
        (
            (None, None, None),
            {ENV_COORDINATOR: "h:1", ENV_NUM_PROCESSES: "two", ENV_PROCESS_ID: "0"},
            r"`--num-processes` \(or \$EQX_NORM_NUM_PROCESSES\) must be an integer, got 'two'",
        ),
    ],
)
def test_initialize_rejects_incomplete_or_bad_settings(monkeypatch, flags, env, match):
    for name in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=match):
        initialize_from_args(*flags)


@pytest.mark.parametrize(
    ("num_processes", "kwargs", "match"),
    [
        (0, {"timeout": 1.0}, r"`num_processes` must be a positive int, got 0"),
        (2, {"timeout": 0.0}, r"`timeout` must be a positive number of seconds, got 0.0"),
        (2, {"timeout": 1.0, "devices_per_process": 0}, r"`devices_per_process` must be"),
    ],
)
def test_launcher_rejects_bad_arguments(num_processes, kwargs, match):
    with pytest.raises(ValueError, match=match):
        launch_local_processes([], num_processes, **kwargs)


# ---------------------------------------------------------------- the demo across processes

DEMO = TrainConfig(depth=2, width=16, steps=5, batch_size=32)
DEMO_ARGV = ["--steps", "5", "--depth", "2", "--width", "16", "--batch-size", "32", "--no-plot"]
DEMO_ARGV += ["--init-scales"]  # the main runs only
DEMO_RUNS = {"no norm, default init": ("none", "default"), "no norm, He init": ("none", "he")}
DEMO_RUNS["LayerNorm"] = ("layer", "he")


def demo_command(out, *extra):
    return [sys.executable, "-m", "eqx_norm.demo", *DEMO_ARGV, "--out", str(out), *extra]


@pytest.fixture
def demo_env(worker_env):
    """The environment of worker_env, without XLA_FLAGS: the demo asks for its devices."""
    return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


@pytest.mark.slow
def test_demo_on_two_processes_trains_like_one_process(demo_env, tmp_path):
    command = demo_command(tmp_path, "--processes", "2", "--devices", "4", "--timeout", "120")
    process = subprocess.run(
        command, env=demo_env, cwd=tmp_path, capture_output=True, text=True, timeout=150
    )
    assert process.returncode == 0, process.stderr[-3000:]
    assert "batch sharded over 4 cpu device(s) in 2 process(es)" in process.stdout
    assert process.stdout.count("summary written to") == 1  # only process 0 reports
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["devices"] == 4
    assert summary["environment"]["processes"] == 2
    data = load_data()
    for name, (norm, init) in DEMO_RUNS.items():
        (run,) = summary["runs"][name]
        single = train(dataclasses.replace(DEMO, norm=norm, init=init), data)  # 1 device
        # 4 devices in 2 processes reorder the float32 sums of each mean (partial sums
        # combined by gloo all-reduces): a few ulps (1.2e-7) per step
        np.testing.assert_allclose(run["losses"], single.losses, rtol=1e-5)
        np.testing.assert_allclose(run["final_loss"], single.final_loss, rtol=1e-5)
        # the final parameters, seen through the last step's gradients and the test set
        for kind, values in single.grad_norms_last.items():
            np.testing.assert_allclose(run["grad_norms_last"][kind], values, rtol=1e-4)
        np.testing.assert_allclose(run["test_loss"], single.test_loss, rtol=1e-5)
        assert abs(run["test_accuracy"] - single.test_accuracy) <= 1 / 360


def child_pids(pid):
    """Ids of the direct children of ``pid``, from /proc (Linux)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def process_rank(pid):
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v for v in environ if v.startswith(b"EQX_NORM_PROCESS_ID=")).split(b"=")[1])


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds processes in /proc")
def test_demo_reports_a_killed_process_and_stops_the_others(demo_env, tmp_path):
    command = demo_command(tmp_path, "--processes", "2", "--timeout", "120")
    command[command.index("--steps") + 1] = "100000"  # still training when process 1 dies
    stderr = tmp_path / "stderr.txt"
    with open(stderr, "w") as err_file:
        launcher = subprocess.Popen(
            command, env=demo_env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=err_file, text=True
        )
    try:
        # process 0's output is streamed: once it prints this line, all have joined and
        # are training (the launcher's --timeout bounds this loop if they never get there)
        for line in launcher.stdout:
            if line.startswith("training:"):
                break
        children = child_pids(launcher.pid)
        assert len(children) == 2, stderr.read_text()[-3000:]
        victim = next(pid for pid in children if process_rank(pid) == 1)
        start = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    err = stderr.read_text()
    assert launcher.returncode == 1, err
    assert time.monotonic() - start < 20
    assert (
        "eqx_norm: process 1 of 2 (python -m eqx_norm.demo) was killed by signal SIGKILL; "
        "stopped the other processes." in err
    )
    for pid in children:  # none is left behind
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.slow
def test_demo_times_out_instead_of_hanging(demo_env, tmp_path):
    command = demo_command(tmp_path, "--processes", "2", "--timeout", "2")
    command[command.index("--steps") + 1] = "100000"
    start = time.monotonic()
    process = subprocess.run(
        command, env=demo_env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert process.returncode == 124, process.stderr[-3000:]
    assert "eqx_norm: timed out after 2 s; process(es) [0, 1] of 2" in process.stderr
    assert time.monotonic() - start < 20
