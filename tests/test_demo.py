"""The training demo (eqx_norm.demo) against independent computations.

Oracles: gradients from ``eqx.filter_grad`` with norms taken in float64 NumPy, a first
adamw step written out by hand, He init's standard deviation, a second identical run, the
float32 run for the bfloat16 one, an uninterrupted run for a killed and resumed one, and
the command line in a subprocess with 8 simulated CPU devices against the in-process
single-device run.
"""

import dataclasses
import doctest
import importlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import pytest
from sklearn.datasets import load_digits

from eqx_norm.demo import (
    CheckpointError,
    Checkpointing,
    TrainConfig,
    batch_order,
    build_parser,
    default_init_scale,
    load_data,
    loss_fn,
    main,
    make_model,
    parse_args,
    train,
)
from eqx_norm.demo._cli import request_cpu_devices, without_processes

# the quick loop (-m "not slow") skips this file: training runs: long; CI runs it
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# One small config shared by most tests, so that its compiled step is reused.
SMALL = TrainConfig(depth=4, width=32, steps=20)
SMALL_ARGV = ["--steps", "20", "--depth", "4", "--width", "32"]
MAIN_LABELS = ["no norm, default init", "no norm, He init", "LayerNorm"]


@pytest.fixture(scope="module")
def data():
    return load_data()


def subprocess_env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def first_batch(config, data, step=0):
    indices = batch_order(config.seed, len(data.x_train), config.batch_size, step + 1)[step]
    return data.x_train[indices], data.y_train[indices]


def float64_norms(grads):
    """Per-layer gradient norms computed in float64 NumPy, independently of the demo."""

    def norm(a):
        return np.linalg.norm(np.asarray(a, dtype=np.float64).ravel())

    norms = {"weight": [norm(g.weight) for g in (*grads.hidden, grads.head)]}
    for name in ("gamma", "beta"):
        if grads.norms and getattr(grads.norms[0], name) is not None:
            norms[name] = [norm(getattr(n, name)) for n in grads.norms]
    return norms


# ------------------------------------------------------------------------ data and model


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
    # the first steps do not depend on the run's length: a resumed run finds its place
    np.testing.assert_array_equal(order[:3], batch_order(3, 10, 4, 3))
    assert not np.array_equal(order, batch_order(4, 10, 4, 5))
    with pytest.raises(ValueError, match=r"`batch_size` \(11\) must not exceed"):
        batch_order(0, 10, 11, 1)


def test_initialisations_have_their_stated_scale():
    # 64 x 256 weights per layer: the sample standard deviation is within ~2% of the true one
    config = TrainConfig(depth=3, width=256, norm="none")
    he = make_model(dataclasses.replace(config, init="he"))
    default = make_model(dataclasses.replace(config, init="default"))
    scaled = make_model(dataclasses.replace(config, init="he", init_scale=0.25))
    for i, fan_in in enumerate((64, 256, 256)):
        std = float(np.std(np.asarray(he.hidden[i].weight, dtype=np.float64)))
        assert abs(std / math.sqrt(2 / fan_in) - 1) < 0.05, (i, std)
        assert np.all(np.asarray(he.hidden[i].bias) == 0)
        # eqx.nn.Linear's U(-1/sqrt(fan_in), 1/sqrt(fan_in)): std 1/sqrt(3 fan_in)
        std = float(np.std(np.asarray(default.hidden[i].weight, dtype=np.float64)))
        assert abs(std / math.sqrt(1 / (3 * fan_in)) - 1) < 0.05, (i, std)
        np.testing.assert_array_equal(scaled.hidden[i].weight, 0.25 * he.hidden[i].weight)
    assert abs(default_init_scale("relu") - math.sqrt(1 / 6)) < 1e-12
    # runs that differ only by their norm start from the same weights
    layer = make_model(dataclasses.replace(config, norm="layer"))
    for a, b in zip(layer.hidden, he.hidden):
        np.testing.assert_array_equal(a.weight, b.weight)
    assert len(make_model(dataclasses.replace(config, norm="rms")).norms) == 3


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


@pytest.mark.parametrize(("norm", "init"), [("layer", "he"), ("none", "default"), ("rms", "he")])
def test_reported_gradient_norms_equal_filter_grad_norms(data, norm, init):
    config = dataclasses.replace(SMALL, norm=norm, init=init, steps=3)
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


def test_default_init_starves_the_first_layers_and_he_init_does_not(data):
    # Measured at the first step (seed 0, depth 12): ratio 1.1e3 with the default init,
    # 2.06 with He init, 1.59 with He init and LayerNorm (seeds 0-4 in
    # docs/training_demo.md). One step each, so this stays quick.
    config = TrainConfig(steps=1)
    default = train(dataclasses.replace(config, norm="none", init="default"), data)
    assert default.ratio_first > 100, default.ratio_first
    weight = default.grad_norms_first["weight"]
    assert weight[0] < weight[-2] / 100  # the gradient vanishes towards the input
    for norm in ("none", "layer"):
        he = train(dataclasses.replace(config, norm=norm, init="he"), data)
        assert he.ratio_first < 5, (norm, he.ratio_first)


@pytest.mark.slow
def test_layernorm_makes_training_robust_to_the_init_scale(data):
    # The demo's measured claim (seeds 0-4 in docs/training_demo.md): at 4x He init the run
    # without normalization stays below 0.6 test accuracy, LayerNorm's above 0.8; at He
    # init both reach 0.9. Seed 0, 500 steps: 0.447 / 0.875 and 0.914 / 0.922.
    config = TrainConfig(init="he")
    for scale, low, high in ((4.0, None, 0.8), (1.0, 0.9, 0.9)):
        plain = train(dataclasses.replace(config, norm="none", init_scale=scale), data)
        layer = train(dataclasses.replace(config, norm="layer", init_scale=scale), data)
        if low is None:
            assert plain.test_accuracy < 0.6, plain.test_accuracy
        else:
            assert plain.test_accuracy > low, plain.test_accuracy
        assert layer.test_accuracy > high, layer.test_accuracy


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
        ({"norm": "batch"}, r"`norm` must be one of \['layer', 'none', 'rms'\], got 'batch'"),
        ({"norm": True}, r"`norm` is a string now: 'layer' for norm=True"),
        ({"init": "xavier"}, r"`init` must be one of \['default', 'he'\], got 'xavier'"),
        ({"init_scale": 0.0}, r"`init_scale` must be a finite positive number, got 0.0"),
        ({"dtype": "float16"}, r"`dtype` must be one of \['bfloat16', 'float32'\]"),
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


# -------------------------------------------------------------------------- command line


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--devices", "3"], r"--batch-size 128 must be divisible by --devices 3"),
        (["--processes", "2", "--devices", "3"], r"--devices 3 must be a multiple of the"),
        (["--processes", "2", "--process-id", "0"], r"do not combine it with"),
        (["--steps", "0"], r"--steps: expected a positive integer, got '0'"),
        (["--resume"], r"--resume needs --checkpoint-dir"),
        (["--init-scales", "0"], r"--init-scales: expected a finite positive number, got '0'"),
        (["--norms", "batch"], r"--norms: invalid choice: 'batch'"),
        (["--learning-rate", "-1"], r"--learning-rate must be finite and >= 0, got -1.0"),
    ],
)
def test_command_line_errors(argv, match, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert re.search(match, capsys.readouterr().err)


def test_help_shows_every_option_with_its_help_and_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # argparse wraps at the terminal's width
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # one space between words
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(options) == 22
    for action in options:
        assert action.help, action.option_strings  # every option says what it does
        assert " ".join(action.help.split()) in text
        if action.default is None:  # no value to show: the help says what happens instead
            assert "(default: " in action.help, action.option_strings
        elif action.default is not False:  # a flag's default (off) goes without saying
            assert f"(default: {action.default})" in text, action.option_strings
    assert "--steps N optimizer steps per run (default: 500)" in text
    assert "(default: [0.25, 0.5, 1.0, 2.0, 4.0])" in text
    assert "--devices N shard each batch over N devices" in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_seed_options_and_device_count_defaults(monkeypatch):
    assert parse_args([]).seeds == [0]
    assert parse_args(["--seed", "3"]).seeds == [3]  # the old spelling still works
    assert parse_args(["--seeds", "2", "0", "2"]).seeds == [2, 0]
    assert parse_args(["--init-scales"]).init_scales == []
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


def test_missing_demo_extra_is_a_clear_message(monkeypatch, capsys):
    # None in sys.modules makes `import sklearn` fail as if it were not installed
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    assert main([*SMALL_ARGV, "--no-plot"]) == 2
    err = capsys.readouterr().err
    assert "the demo needs scikit-learn, tqdm, which are not installed" in err
    assert 'pip install ".[demo]"' in err
    assert "Traceback" not in err and "ModuleNotFoundError" not in err


def test_library_import_leaves_the_demo_and_jax_config_alone():
    code = (
        "import sys, jax\n"
        "before = dict(jax.config.values)\n"
        "import eqx_norm, eqx_norm.functional, eqx_norm.initializers, eqx_norm.serialization\n"
        "after = dict(jax.config.values)\n"
        "demo = sorted(m for m in sys.modules if m.startswith('eqx_norm.demo'))\n"
        "changed = sorted(k for k in after if after[k] != before.get(k))\n"
        "print(demo, changed, 'sklearn' in sys.modules, 'matplotlib' in sys.modules)\n"
    )
    process = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True
    )
    assert process.returncode == 0, process.stderr
    assert process.stdout.split("\n")[0] == "[] [] False False"
    assert not (REPO / "eqx_norm" / "distributed.py").exists()


def test_processes_flag_hands_the_command_to_the_launcher(monkeypatch):
    import eqx_norm.demo.distributed

    calls = []
    monkeypatch.setattr(
        eqx_norm.demo.distributed,
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
    import eqx_norm.demo.distributed

    calls = []
    monkeypatch.setattr(
        eqx_norm.demo.distributed,
        "initialize_from_args",
        lambda *args: calls.append(args) or False,  # False: it stays one process
    )
    argv = [*SMALL_ARGV, "--no-plot", "--init-scales", "--out", str(tmp_path)]
    argv += ["--coordinator", "h:1", "--num-processes", "1", "--process-id", "0"]
    assert main(argv) == 0
    assert calls == [("h:1", 1, 0)]
    assert "Gradient norm of each Linear weight" in capsys.readouterr().out


def test_main_prints_tables_and_writes_summary_without_plot(tmp_path, capsys):
    argv = [*SMALL_ARGV, "--no-plot", "--out", str(tmp_path), "--seeds", "0", "1"]
    status = main([*argv, "--norms", "layer", "rms", "--init-scales", "0.5", "1"])
    out = capsys.readouterr().out
    assert status == 0
    assert "init: 'default' is eqx.nn.Linear's U(-1/sqrt(fan_in), 1/sqrt(fan_in))" in out
    assert "Gradient norm of each Linear weight at the first step (seed 0)" in out
    assert "5 (head)" in out and "grad ratio, first step" in out
    assert "mean ± standard deviation [min, max]" in out
    assert "LayerNorm against no norm, He init:" in out and "RMSNorm against" in out
    assert "Test accuracy after 20 steps against the initial weight scale" in out
    assert "Reproducibility: Bit for bit, a run repeats only on the same machine" in out
    assert not (tmp_path / "gradient_flow.png").exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    labels = [*MAIN_LABELS, "RMSNorm"]
    assert summary["main_runs"] == labels and summary["seeds"] == [0, 1]
    # the main runs and the scale-0.5 runs, each once per seed; scale 1 is the main runs
    scaled = ["no norm, He init x0.5", "LayerNorm x0.5", "RMSNorm x0.5"]
    assert set(summary["runs"]) == {*labels, *scaled}
    for label, runs in summary["runs"].items():
        assert [r["seed"] for r in runs] == [0, 1], label
        assert len(runs[0]["losses"]) == 20
        accuracies = [r["test_accuracy"] for r in runs]
        assert summary["aggregate"][label]["test_accuracy"]["mean"] == pytest.approx(
            np.mean(accuracies)
        )
        assert summary["aggregate"][label]["test_accuracy"]["max"] == max(accuracies)
    assert summary["environment"]["devices"] == 1 and "jaxlib" in summary["environment"]
    assert "device layout" in summary["reproducibility"]


def test_main_reports_missing_devices_clearly(monkeypatch, capsys):
    # JAX has started in this process, so the device count XLA_FLAGS asks for comes too late
    devices = 2 * jax.device_count()
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    status = main([*SMALL_ARGV, "--devices", str(devices), "--no-plot"])
    assert status == 2
    assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count={devices}"
    err = capsys.readouterr().err
    assert f"error: `devices`={devices} needs {devices} device(s) in each of 1 process" in err


SCALES = ["--init-scales", "0.5", "1"]


@pytest.mark.slow  # a subprocess with 8 devices
def test_command_line_on_8_devices_writes_the_figure_and_trains_like_1_device(tmp_path, data):
    # `python -m eqx_norm.demo --devices 8` in a fresh process with no XLA_FLAGS set: the
    # entry point asks XLA for 8 CPU devices itself. One subprocess serves both checks.
    process = subprocess.run(
        [sys.executable, "-m", "eqx_norm.demo", *SMALL_ARGV, "--devices", "8", *SCALES],
        cwd=tmp_path,
        env=subprocess_env(),
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

    # three panels: loss, first-step gradients, test accuracy against the init scale
    assert matplotlib.image.imread(tmp_path / figure).shape[:2] == (420, 1380)

    summary = json.loads((tmp_path / "demo_output" / "summary.json").read_text())
    assert summary["environment"]["devices"] == 8
    for label, norm, init in zip(MAIN_LABELS, ("none", "none", "layer"), ("default", "he", "he")):
        (run,) = summary["runs"][label]
        single = train(dataclasses.replace(SMALL, norm=norm, init=init), data)
        # Sharding the batch over 8 devices splits each mean into 8 partial sums combined
        # by an all-reduce, so float32 additions are reordered: a few ulp (1.2e-7) per
        # step. Measured over these 20 steps: 2.1e-7 relative at most; 1e-5 is 50x that.
        np.testing.assert_allclose(run["losses"], single.losses, rtol=1e-5)
        np.testing.assert_allclose(run["final_loss"], single.final_loss, rtol=1e-5)
        for name, values in single.grad_norms_last.items():
            np.testing.assert_allclose(run["grad_norms_last"][name], values, rtol=1e-5)
        # a test example can flip only if two of its logits tie within that rounding
        assert abs(run["test_accuracy"] - single.test_accuracy) <= 1 / 360


# --------------------------------------------------------------------------- checkpoints


def checkpointed(tmp_path, config, data, **kwargs):
    return train(config, data, checkpointing=Checkpointing(tmp_path / "run", **kwargs))


def test_checkpoint_files_and_resume_of_a_finished_run(tmp_path, data):
    config = dataclasses.replace(SMALL, steps=20)
    first = checkpointed(tmp_path, config, data, every=8)
    folder = tmp_path / "run"
    # the last checkpoint only (steps 8 and 16 were replaced), no temporary files left
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.json", "state-00000020.eqx"]
    metadata = json.loads((folder / "checkpoint.json").read_text())
    assert metadata["format"] == "eqx_norm.demo checkpoint" and metadata["version"] == 1
    assert metadata["step"] == 20 and metadata["config"]["depth"] == 4
    assert metadata["data_order"]["next_step"] == 21
    np.testing.assert_array_equal(metadata["history"]["losses"], first.losses)
    # the state file is plain .npy records: parameters then adamw's count, mu and nu
    with open(folder / "state-00000020.eqx", "rb") as f:
        arrays = [np.load(f, allow_pickle=False) for _ in range(3)]
    np.testing.assert_array_equal(arrays[0], first.model.hidden[0].weight)

    with pytest.raises(ValueError, match=r"already holds a checkpoint of a run: pass --resume"):
        checkpointed(tmp_path, config, data, every=8)
    again = checkpointed(tmp_path, config, data, every=8, resume=True)
    assert again.resumed_at == 20  # read back, not retrained
    np.testing.assert_array_equal(again.losses, first.losses)
    assert again.test_accuracy == first.test_accuracy and again.final_loss == first.final_loss
    for a, b in zip(jax.tree.leaves(again.model), jax.tree.leaves(first.model)):
        np.testing.assert_array_equal(a, b)


def test_resume_in_process_equals_the_uninterrupted_run(tmp_path, data):
    config = dataclasses.replace(SMALL, steps=20)
    reference = train(config, data)
    # "interrupt" after 12 steps: a 12-step run of the same config writes the same state
    # as the 20-step run does at step 12 (the first steps' batches do not depend on
    # `steps`), except for the config it records; so copy the state under the 20-step
    # config's metadata.
    short = dataclasses.replace(config, steps=12)
    checkpointed(tmp_path, short, data, every=6)
    metadata_path = tmp_path / "run" / "checkpoint.json"
    metadata = json.loads(metadata_path.read_text())
    metadata["config"]["steps"] = 20
    metadata_path.write_text(json.dumps(metadata))
    resumed = checkpointed(tmp_path, config, data, every=6, resume=True)
    assert resumed.resumed_at == 12
    np.testing.assert_array_equal(resumed.losses, reference.losses)
    for a, b in zip(jax.tree.leaves(resumed.model), jax.tree.leaves(reference.model)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("damage", ["truncate", "flip", "metadata", "missing", "config"])
def test_damaged_checkpoint_is_a_clear_error_naming_the_file(tmp_path, data, damage):
    config = dataclasses.replace(SMALL, steps=10)
    checkpointed(tmp_path, config, data, every=10)
    folder = tmp_path / "run"
    state, metadata = folder / "state-00000010.eqx", folder / "checkpoint.json"
    if damage == "truncate":
        state.write_bytes(state.read_bytes()[:-100])
        match = rf"The checkpoint state {re.escape(str(state))} is truncated"
    elif damage == "flip":
        raw = bytearray(state.read_bytes())
        raw[-7] ^= 0x40  # one bit of the last array's data
        state.write_bytes(bytes(raw))
        match = rf"The checkpoint state {re.escape(str(state))} is corrupted"
    elif damage == "metadata":
        metadata.write_text(metadata.read_text()[:200])
        match = rf"The checkpoint metadata {re.escape(str(metadata))} is not valid JSON"
    elif damage == "missing":
        state.unlink()
        match = rf"Cannot read the checkpoint state {re.escape(str(state))}"
    else:
        config = dataclasses.replace(config, learning_rate=3e-3)
        match = r"is of another run \(learning_rate: saved 0.001, now 0.003\)"
    with pytest.raises(CheckpointError, match=match):
        checkpointed(tmp_path, config, data, every=10, resume=True)


class _Marker:
    """Unpickling this would create a folder: the test checks that it never happens."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_loading_a_checkpoint_never_unpickles(tmp_path, data):
    import hashlib

    config = dataclasses.replace(SMALL, steps=10)
    checkpointed(tmp_path, config, data, every=10)
    folder = tmp_path / "run"
    marker = tmp_path / "unpickled"
    state = folder / "state-00000010.eqx"
    with open(state, "wb") as f:  # a pickled object array where the first leaf should be
        np.save(f, np.array([_Marker(str(marker))], dtype=object), allow_pickle=True)
    metadata = json.loads((folder / "checkpoint.json").read_text())
    metadata["state"]["bytes"] = state.stat().st_size  # a consistent, malicious checkpoint
    metadata["state"]["sha256"] = hashlib.sha256(state.read_bytes()).hexdigest()
    (folder / "checkpoint.json").write_text(json.dumps(metadata))
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(state))} does not fit"):
        checkpointed(tmp_path, config, data, every=10, resume=True)
    assert not marker.exists()


def demo_command(out, checkpoints, *extra):
    argv = ["--steps", "600", "--depth", "2", "--width", "16", "--batch-size", "32"]
    argv += ["--init-scales", "--no-plot", "--out", str(out), "--checkpoint-dir", str(checkpoints)]
    return [sys.executable, "-m", "eqx_norm.demo", *argv, "--checkpoint-every", "50", *extra]


@pytest.mark.slow
def test_killed_and_resumed_demo_ends_bit_for_bit_like_an_uninterrupted_one(tmp_path):
    env = subprocess_env()
    env["PYTHONUNBUFFERED"] = "1"
    # 1. the run that gets killed: SIGKILL once the second run (no norm, He init) has
    #    saved a checkpoint at step >= 100 of 600; the first run is finished by then
    killed = tmp_path / "killed"
    second = killed / "seed0-none-he-x1" / "checkpoint.json"
    process = subprocess.Popen(
        demo_command(tmp_path / "out_killed", killed),
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        step = 0
        while time.monotonic() < deadline and process.poll() is None:
            try:
                step = json.loads(second.read_text())["step"]
            except (FileNotFoundError, json.JSONDecodeError):
                step = 0
            if step >= 100:
                break
            time.sleep(0.01)
        assert process.poll() is None, "the demo ended before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    saved = json.loads(second.read_text())["step"]
    assert 100 <= saved < 600  # killed mid-run
    assert not (tmp_path / "out_killed" / "summary.json").exists()

    # 2. resume it
    resumed = subprocess.run(
        demo_command(tmp_path / "out_killed", killed, "--resume"),
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[no norm, default init] seed 0: " in resumed.stdout
    assert "resumed at step 600)" in resumed.stdout  # the finished run, read back
    assert f"resumed at step {saved})" in resumed.stdout

    # 3. the same command, never interrupted
    reference = subprocess.run(
        demo_command(tmp_path / "out_reference", tmp_path / "reference"),
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert reference.returncode == 0, reference.stderr[-3000:]

    # the final parameters and optimizer states, bit for bit, for all three runs
    for run in ("seed0-none-default-x1", "seed0-none-he-x1", "seed0-layer-he-x1"):
        a = (killed / run / "state-00000600.eqx").read_bytes()
        b = (tmp_path / "reference" / run / "state-00000600.eqx").read_bytes()
        assert a == b, run
    runs = [
        json.loads((tmp_path / out / "summary.json").read_text())["runs"]
        for out in ("out_killed", "out_reference")
    ]
    for label in MAIN_LABELS:
        a, b = runs[0][label][0], runs[1][label][0]
        assert a["losses"] == b["losses"] and a["test_accuracy"] == b["test_accuracy"]
        assert a["final_loss"] == b["final_loss"]


# -------------------------------------------------------------------------- bfloat16


def test_bfloat16_activations_float32_parameters_and_state(data, tmp_path):
    config = dataclasses.replace(SMALL, dtype="bfloat16", steps=1)
    model = make_model(config)
    x, y = first_batch(config, data)
    jaxpr = jax.make_jaxpr(lambda m: loss_fn(m, x, y))(model)
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 5  # 4 hidden layers and the head, each computed in bf16
    assert all(v.aval.dtype == jax.numpy.bfloat16 for e in dots for v in e.invars)
    result = train(config, data, checkpointing=Checkpointing(tmp_path / "run"))
    # the saved state: every parameter and adamw's mu and nu in float32, its count in int32
    path = tmp_path / "run" / "state-00000001.eqx"
    with open(path, "rb") as f:
        dtypes = []
        while f.tell() < path.stat().st_size:
            dtypes.append(np.load(f, allow_pickle=False).dtype)
    n_params = len(jax.tree.leaves(eqx.filter(model, eqx.is_array)))
    assert len(dtypes) == 3 * n_params + 1
    assert dtypes.count(np.dtype(np.int32)) == 1
    assert dtypes.count(np.dtype(np.float32)) == 3 * n_params
    # the same weights and batch: bf16 keeps 8 significant bits (relative rounding 2^-9
    # = 2e-3 per value), so the first loss (~2.3) agrees to about 1e-2 relative; measured
    # 2e-5 to 1.3e-4 over seeds 0-2
    reference = train(dataclasses.replace(config, dtype="float32"), data)
    np.testing.assert_allclose(result.losses[0], reference.losses[0], rtol=1e-2)
    assert result.losses.dtype == np.float32


@pytest.mark.slow
def test_bfloat16_trains_1000_steps_like_float32(data):
    # Bound: the final loss (cross-entropy on the whole training set) within 10% of the
    # float32 run's. Why: both runs start from the same float32 weights and see the same
    # batches; bf16 rounds each activation by at most 2^-9 relative, which moves a logit
    # of ~10 by ~0.02 and an example's small loss by a few percent at most, with random
    # signs that mostly cancel over 1437 examples; the trajectories part only by such
    # rounding. Measured (depth 4, width 32, seeds 0-2): 0.02% to 0.5% apart (final loss
    # ~2.8e-3). A run whose parameters and adamw state are stored in bf16 instead (updates
    # of 1e-3 under bf16's spacing of 4e-3 near 1) ends at 0.074: 26x the float32 loss.
    config = TrainConfig(depth=4, width=32, steps=1000)
    f32 = train(config, data)
    bf16 = train(dataclasses.replace(config, dtype="bfloat16"), data)
    assert np.all(np.isfinite(bf16.losses)) and np.isfinite(bf16.final_loss)
    assert abs(bf16.final_loss - f32.final_loss) <= 0.1 * f32.final_loss, (
        bf16.final_loss,
        f32.final_loss,
    )
    assert f32.final_loss < 0.01  # both trained: the initial loss is ~2.3
    assert abs(bf16.test_accuracy - f32.test_accuracy) <= 5 / 360


def test_command_line_bfloat16(tmp_path, capsys):
    argv = [*SMALL_ARGV, "--no-plot", "--init-scales", "--dtype", "bfloat16"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    assert "bfloat16 activations, float32 parameters" in capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["dtype"] == "bfloat16"


# ------------------------------------------------------------------------ documentation


PAGE = REPO / "docs" / "training_demo.md"


@pytest.mark.parametrize(
    "index",
    range(len(re.findall(r"^```python\n", PAGE.read_text(), flags=re.MULTILINE))),
)
def test_training_demo_page_examples_run(index, tmp_path, monkeypatch):
    blocks = re.findall(r"^```python\n(.*?)^```", PAGE.read_text(), flags=re.DOTALL | re.MULTILINE)
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[index], f"training_demo.md block {index}", "exec"), {"__name__": "__doc__"})


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["eqx_norm.demo", "eqx_norm.demo._train", "eqx_norm.demo.distributed"]
)
def test_demo_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0
