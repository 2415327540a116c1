"""The training demo (eqx_norm.demo) against independent computations.

Oracles: gradients from ``eqx.filter_grad`` with norms taken in float64 NumPy, a first
adamw step written out by hand, a second identical run, and the command line in a
subprocess with 8 simulated CPU devices against the in-process single-device run.
"""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import pytest
from sklearn.datasets import load_digits

from eqx_norm.demo import (
    TrainConfig,
    batch_order,
    load_data,
    loss_fn,
    main,
    make_model,
    parse_args,
    train,
)
from eqx_norm.demo._cli import request_cpu_devices, without_processes

REPO = Path(__file__).resolve().parents[1]
# One small config shared by most tests, so that its compiled step is reused.
SMALL = TrainConfig(depth=4, width=32, steps=20)
SMALL_ARGV = ["--steps", "20", "--depth", "4", "--width", "32"]


@pytest.fixture(scope="module")
def data():
    return load_data()


def first_batch(config, data, step=0):
    indices = batch_order(config.seed, len(data.x_train), config.batch_size, step + 1)[step]
    return data.x_train[indices], data.y_train[indices]


def float64_norms(grads):
    """Per-layer gradient norms computed in float64 NumPy, independently of the demo."""

    def norm(a):
        return np.linalg.norm(np.asarray(a, dtype=np.float64).ravel())

    norms = {"weight": [norm(g.weight) for g in (*grads.hidden, grads.head)]}
    if grads.norms:
        norms["gamma"] = [norm(n.gamma) for n in grads.norms]
        norms["beta"] = [norm(n.beta) for n in grads.norms]
    return norms


def test_data_is_the_standardised_digits_split(data):
    x, y = load_digits(return_X_y=True)
    assert data.x_train.shape == (1437, 64) and data.x_test.shape == (360, 64)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int32
    # every class in both parts, in the proportions of the full set (stratified split)
    np.testing.assert_allclose(
        np.bincount(data.y_test) / 360, np.bincount(y) / len(y), atol=1 / 360
    )
    # standardised with training statistics: mean 0, std 1 (0 for always-blank pixels)
    np.testing.assert_allclose(data.x_train.mean(axis=0), 0, atol=1e-5)
    std = data.x_train.std(axis=0)
    assert np.all(np.isclose(std, 1, atol=1e-5) | (std == 0)), std
    assert np.all(std[x.std(axis=0) == 0] == 0)  # pixels blank in every digit stay 0
    np.testing.assert_array_equal(
        np.bincount(data.y_train) + np.bincount(data.y_test), np.bincount(y)
    )
    again = load_data()
    np.testing.assert_array_equal(again.x_test, data.x_test)


def test_batch_order_is_seeded_epochs_of_permutations():
    order = batch_order(seed=3, num_examples=10, batch_size=4, steps=5)
    assert order.shape == (5, 4)
    # 2 whole batches per epoch; each epoch draws 8 distinct examples
    for epoch in (order[0:2], order[2:4]):
        assert len(np.unique(epoch)) == 8
    np.testing.assert_array_equal(order, batch_order(3, 10, 4, 5))
    assert not np.array_equal(order, batch_order(4, 10, 4, 5))
    with pytest.raises(ValueError, match=r"`batch_size` \(11\) must not exceed"):
        batch_order(0, 10, 11, 1)


def test_gamma_and_beta_get_gradients_and_change_after_one_step(data):
    config = dataclasses.replace(SMALL, steps=1)
    model = make_model(config)
    x, y = first_batch(config, data)
    grads = eqx.filter_grad(loss_fn)(model, x, y)
    for norm in grads.norms:  # every layer's gamma and beta get a gradient
        assert np.linalg.norm(norm.gamma) > 0 and np.linalg.norm(norm.beta) > 0

    trained = train(config, data).model
    lr, wd = config.learning_rate, config.weight_decay
    for before, grad, after in zip(model.norms, grads.norms, trained.norms):
        for name in ("gamma", "beta"):
            p, g = np.asarray(getattr(before, name)), np.asarray(getattr(grad, name))
            # adamw's first step, written out: m_hat = g, v_hat = g^2 (bias-corrected)
            expected = p - lr * (g / (np.abs(g) + 1e-8) + wd * p)
            new = np.asarray(getattr(after, name))
            # a unit that the ReLU shuts for the whole batch gets exactly 0: those move by
            # weight decay alone; all others move
            assert np.all(new[g != 0] != p[g != 0]) and np.mean(g != 0) > 0.5
            # parameters are O(1) in float32 (ulp 1.2e-7); the step is 1e-3
            np.testing.assert_allclose(new, expected, atol=1e-6)


@pytest.mark.parametrize("norm", [True, False])
def test_reported_gradient_norms_equal_filter_grad_norms(data, norm):
    config = dataclasses.replace(SMALL, norm=norm, steps=3)
    result = train(config, data)
    before_last = train(dataclasses.replace(config, steps=2), data).model
    for norms, model, step in (
        (result.grad_norms_first, make_model(config), 0),
        (result.grad_norms_last, before_last, 2),
    ):
        grads = eqx.filter_grad(loss_fn)(model, *first_batch(config, data, step))
        expected = float64_norms(grads)
        assert set(norms) == set(expected)
        for name, values in expected.items():
            # eager and jitted float32 gradients differ by rounding: ~1e-6 relative
            np.testing.assert_allclose(norms[name], values, rtol=1e-5)


def test_layernorm_run_learns_and_keeps_the_gradient_even(data):
    # Measured (seed 0, 300 steps): LayerNorm test accuracy 0.944, first-step gradient
    # ratio 2.65; without normalization 0.797 and 1.1e3 (seeds 0-3: 528 to 1.2e3).
    result = train(TrainConfig(steps=300), data)
    assert result.test_accuracy >= 0.9, result.test_accuracy
    assert result.ratio_first < 5, result.ratio_first
    no_norm = train(TrainConfig(steps=1, norm=False), data)
    assert no_norm.ratio_first > 100, no_norm.ratio_first
    # without normalization the gradient vanishes towards the input
    weight = no_norm.grad_norms_first["weight"]
    assert weight[0] < weight[-2] / 100


def test_same_seed_gives_identical_results(data):
    a, b = train(SMALL, data), train(SMALL, data)
    np.testing.assert_array_equal(a.losses, b.losses)
    for name in a.grad_norms_last:
        np.testing.assert_array_equal(a.grad_norms_last[name], b.grad_norms_last[name])
    assert a.test_accuracy == b.test_accuracy and a.final_loss == b.final_loss
    other = train(dataclasses.replace(SMALL, seed=1), data)
    assert not np.array_equal(a.losses, other.losses)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"depth": 0}, r"`depth` must be a positive int, got 0"),
        ({"seed": -1}, r"`seed` must be a non-negative int, got -1"),
        ({"activation": "gelu"}, r"`activation` must be one of \['relu', 'tanh'\], got 'gelu'"),
        ({"batch_size": 100, "devices": 8}, r"`batch_size` \(100\) must be divisible by"),
        ({"learning_rate": float("nan")}, r"`learning_rate` must be a finite non-negative"),
    ],
)
def test_config_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_too_few_devices_is_a_clear_error(data):
    devices = 2 * jax.device_count()
    config = dataclasses.replace(SMALL, devices=devices, batch_size=8 * devices)
    flag = f"XLA_FLAGS=--xla_force_host_platform_device_count={devices}"
    with pytest.raises(ValueError, match=rf"`devices`={devices} needs .*{flag}"):
        train(config, data)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--devices", "3"], r"--batch-size 128 must be divisible by --devices 3"),
        (["--processes", "2", "--devices", "3"], r"--devices 3 must be a multiple of the"),
        (["--processes", "2", "--process-id", "0"], r"do not combine it with"),
        (["--steps", "0"], r"--steps: expected a positive integer, got '0'"),
    ],
)
def test_command_line_errors(argv, match, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert re.search(match, capsys.readouterr().err)


def test_device_count_defaults_and_requests(monkeypatch):
    assert parse_args([]).devices == 1
    assert parse_args(["--processes", "2"]).devices == 2
    monkeypatch.setenv("EQX_NORM_NUM_PROCESSES", "4")
    args = parse_args(["--devices", "8"])
    assert args.local_devices == 2
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    request_cpu_devices(2)
    assert os.environ["XLA_FLAGS"] == (
        "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=2"
    )
    request_cpu_devices(8)  # a count already set is kept
    assert os.environ["XLA_FLAGS"].endswith("count=2")
    assert without_processes(["--processes", "2", "--steps", "5", "--processes=3"]) == [
        "--steps",
        "5",
    ]


def test_processes_flag_hands_the_command_to_the_launcher(monkeypatch):
    import eqx_norm.distributed

    calls = []
    monkeypatch.setattr(
        eqx_norm.distributed,
        "launch_local_processes",
        lambda argv, n, **kwargs: calls.append((argv, n, kwargs)) or 7,
    )
    status = main(["--steps", "5", "--processes", "2", "--devices", "4", "--timeout", "9"])
    assert status == 7  # the launcher's exit code
    # the copies get the same command without --processes, and 2 devices each
    assert calls == [
        (
            ["--steps", "5", "--devices", "4", "--timeout", "9"],
            2,
            {"timeout": 9.0, "devices_per_process": 2},
        )
    ]


def test_coordinator_flags_are_passed_to_initialize(monkeypatch, tmp_path, capsys):
    import eqx_norm.distributed

    calls = []
    monkeypatch.setattr(
        eqx_norm.distributed,
        "initialize_from_args",
        lambda *args: calls.append(args) or False,  # False: it stays one process
    )
    argv = [*SMALL_ARGV, "--no-plot", "--out", str(tmp_path), "--coordinator", "h:1"]
    assert main([*argv, "--num-processes", "1", "--process-id", "0"]) == 0
    assert calls == [("h:1", 1, 0)]
    assert "Gradient norm per layer" in capsys.readouterr().out


def test_main_prints_tables_and_writes_summary_without_plot(tmp_path, capsys):
    status = main([*SMALL_ARGV, "--no-plot", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 0
    assert "init: eqx.nn.Linear's default init" in out
    assert "Gradient norm per layer" in out and "5 (head)" in out
    assert "grad ratio, first step" in out
    assert not (tmp_path / "gradient_flow.png").exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["runs"]) == {"no norm", "LayerNorm"}
    assert len(summary["runs"]["LayerNorm"]["losses"]) == 20


def test_main_reports_missing_devices_clearly(monkeypatch, capsys):
    # JAX has started in this process, so the device count XLA_FLAGS asks for comes too late
    devices = 2 * jax.device_count()
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    status = main([*SMALL_ARGV, "--devices", str(devices), "--no-plot"])
    assert status == 2
    assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count={devices}"
    err = capsys.readouterr().err
    assert f"error: `devices`={devices} needs {devices} device(s) in each of 1 process" in err


def test_command_line_on_8_devices_writes_the_figure_and_trains_like_1_device(tmp_path, data):
    # `python -m eqx_norm.demo --devices 8` in a fresh process with no XLA_FLAGS set: the
    # entry point asks XLA for 8 CPU devices itself. One subprocess serves both checks.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    process = subprocess.run(
        [sys.executable, "-m", "eqx_norm.demo", *SMALL_ARGV, "--devices", "8"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 0, process.stderr
    assert "batch sharded over 8 cpu device(s)" in process.stdout
    assert "20/20" in process.stderr  # the progress bar
    figure = Path("demo_output") / "gradient_flow.png"  # the default --out, relative to cwd
    assert f"figure written to {figure}" in process.stdout
    assert (tmp_path / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / figure).shape[:2] == (400, 1300)

    runs = json.loads((tmp_path / "demo_output" / "summary.json").read_text())["runs"]
    for norm in (False, True):
        run = runs["LayerNorm" if norm else "no norm"]
        single = train(dataclasses.replace(SMALL, norm=norm), data)
        # Sharding the batch over 8 devices splits each mean into 8 partial sums combined
        # by an all-reduce, so float32 additions are reordered: a few ulp (1.2e-7) per
        # step. Measured over these 20 steps: 2.1e-7 relative at most; 1e-5 is 50x that.
        np.testing.assert_allclose(run["losses"], single.losses, rtol=1e-5)
        np.testing.assert_allclose(run["final_loss"], single.final_loss, rtol=1e-5)
        for name, values in single.grad_norms_last.items():
            np.testing.assert_allclose(run["grad_norms_last"][name], values, rtol=1e-5)
        # a test example can flip only if two of its logits tie within that rounding
        assert abs(run["test_accuracy"] - single.test_accuracy) <= 1 / 360
