"""Data-parallel training across 2 processes on 127.0.0.1, against the single-process run.

The library's part: ``tests/_multiprocess_worker.py`` trains a LayerNorm model for a few
optax steps on a global mesh of 4 CPU devices in 2 processes (gloo collectives), started by
the demo's launcher, and must match the single-process run. The launcher's part: a process
that exits before joining, is killed, or raises is reported with its id and last stderr
lines, quickly, never by hanging; a run past ``--timeout`` is stopped. The demo's part:
``python -m eqx_norm.demo --processes 2`` trains like one process, and a process whose peer
never starts fails after ``--join-timeout``, naming the coordinator. All start processes: slow.

No test asserts a wall-clock time (a loaded machine can be several times slower): a hang is
bounded by the launcher's or the demo's own timeout, or by a subprocess timeout far above a
healthy run's time.
"""

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("orbax.checkpoint", reason="the launcher is the demo's: the demo extra")
from eqx_norm.demo import TrainConfig, load_data, train
from eqx_norm.demo._cli import launch

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent
WORKER = "_multiprocess_worker"
# a healthy 2-process run takes ~5 s on 2 busy cores; this only bounds a hang, and it is
# below JAX's own timeouts (300 s to join, 100 s without a heartbeat), so that a launcher
# that waited for JAX to notice a failed process would return 124 instead of its code
TIMEOUT = 90.0


@pytest.fixture
def worker_env(monkeypatch):
    """Children import eqx_norm from this checkout and the worker from tests/; 2 devices each."""
    path = os.pathsep.join([str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")])
    monkeypatch.setenv("PYTHONPATH", path)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")


def test_two_processes_train_like_one(worker_env, tmp_path, capfd, monkeypatch):
    assert launch(["--out", str(tmp_path / "multi.json")], 2, TIMEOUT, module=WORKER) == 0
    assert "process 0: done" in capfd.readouterr().out  # process 0's output is streamed
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    command = [sys.executable, "-m", WORKER, "--out", str(tmp_path / "single.json")]
    subprocess.run(command, check=True, timeout=TIMEOUT, capture_output=True)
    reference, result = (
        json.loads((tmp_path / f).read_text()) for f in ("single.json", "multi.json")
    )
    assert reference["distributed"] is False and reference["counts"] == [1, 1, 1]
    assert result["distributed"] is True and result["counts"] == [2, 4, 2]
    assert result["x_sharding"] == "P('batch',)" and result["loss_sharding_replicated"]
    # float32: the 4-device run sums the batch in another order (partial sums per device),
    # so the results agree to a few ulps of O(1) values, not bit for bit
    np.testing.assert_allclose(result["losses"], reference["losses"], rtol=1e-5)
    assert result["losses"][-1] < result["losses"][0]  # it trained
    assert len(result["params"]) == len(reference["params"]) == 6  # 2 Linear (w, b) + gamma, beta
    for got, expected in zip(result["params"], reference["params"]):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("how", "code", "message", "tail"),
    [
        ("start", 3, "exited with code 3", "failing on purpose (start)"),
        ("kill", 1, "was killed by signal SIGKILL", "failing on purpose (kill)"),
        ("raise", 1, "exited with code 1", "RuntimeError: failing on purpose"),
    ],
)
def test_failed_process_is_reported_and_the_rest_stopped(
    worker_env, tmp_path, capfd, how, code, message, tail
):
    argv = ["--out", str(tmp_path / "out.json"), "--fail-process", "1", "--fail-how", how]
    status = launch(argv, 2, TIMEOUT, module=WORKER)
    err = capfd.readouterr().err
    # process 1's own code, not the launcher's 124 after TIMEOUT: reported as soon as
    # process 1 failed, not after a JAX timeout (TIMEOUT is below JAX's)
    assert status == code, err
    assert "timed out" not in err, err
    assert f"process 1 of 2 (python -m {WORKER}) {message}; stopped the others." in err
    assert "Last lines of process 1's stderr:" in err and tail in err
    assert not (tmp_path / "out.json").exists()


DEMO = TrainConfig(depth=2, width=16, steps=5, batch_size=32)
DEMO_ARGV = ["--steps", "5", "--depth", "2", "--width", "16", "--batch-size", "32", "--no-plot"]
DEMO_ARGV += ["--init-scales"]  # the main runs only


def run_demo(tmp_path, *extra, timeout=150):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the demo asks for devices
    command = [sys.executable, "-m", "eqx_norm.demo", *DEMO_ARGV, "--out", str(tmp_path), *extra]
    return subprocess.run(
        command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout
    )


def test_demo_on_two_processes_trains_like_one_process(worker_env, tmp_path):
    process = run_demo(tmp_path, "--processes", "2", "--devices", "4", "--timeout", "120")
    assert process.returncode == 0, process.stderr[-3000:]
    assert "batch sharded over 4 cpu device(s) in 2 process(es)" in process.stdout
    assert process.stdout.count("summary written to") == 1  # only process 0 reports
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["devices"] == 4 and summary["environment"]["processes"] == 2
    data = load_data()
    runs = {"no norm, default init": ("none", "default"), "no norm, He init": ("none", "he")}
    for name, (norm, init) in {**runs, "LayerNorm": ("layer", "he")}.items():
        (run,) = summary["runs"][name]
        single = train(dataclasses.replace(DEMO, norm=norm, init=init), data)  # 1 device
        # 4 devices in 2 processes reorder the float32 sums of each mean (partial sums
        # combined by gloo all-reduces): a few ulps (1.2e-7) per step
        np.testing.assert_allclose(run["losses"], single.losses, rtol=1e-5)
        np.testing.assert_allclose(run["final_loss"], single.final_loss, rtol=1e-5)
        np.testing.assert_allclose(run["test_loss"], single.test_loss, rtol=1e-5)
        for kind, values in single.grad_norms_last.items():  # the final parameters, seen
            np.testing.assert_allclose(run["grad_norms_last"][kind], values, rtol=1e-4)
        assert abs(run["test_accuracy"] - single.test_accuracy) <= 1 / 360


def test_demo_times_out_instead_of_hanging(worker_env, tmp_path):
    # 100000 steps take minutes: stopped by its own --timeout (code 124 and the message say
    # so), well before the subprocess timeout, which only bounds a hang
    argv = ["--processes", "2", "--steps", "100000", "--timeout", "2"]
    process = run_demo(tmp_path, *argv, timeout=150)
    assert process.returncode == 124, process.stderr[-3000:]
    assert "eqx_norm: timed out after 2 s; process(es) [0, 1] of 2" in process.stderr
    assert "Last lines of process 1's stderr:" in process.stderr


def test_demo_whose_peer_never_starts_fails_after_join_timeout(tmp_path):
    # process 0 of 2 alone: without --join-timeout it would wait JAX's 300 s, then abort
    # from C++ naming no address; the subprocess timeout only bounds a hang
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # a free port
        coordinator = f"127.0.0.1:{sock.getsockname()[1]}"
    joined = ["--coordinator", coordinator, "--num-processes", "2", "--process-id", "0"]
    process = run_demo(tmp_path, *joined, "--join-timeout", "3", timeout=3 + 120)
    assert process.returncode == 1, process.stderr[-3000:]
    assert (
        f"python -m eqx_norm.demo: error: process 0 of 2 could not join the coordinator at "
        f"{coordinator} within 3 s (--join-timeout)" in process.stderr
    ), process.stderr[-3000:]
    assert "Check failure" not in process.stderr  # our error, not JAX's abort
    assert not (tmp_path / "summary.json").exists()
