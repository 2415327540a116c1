"""The training demo (eqx_norm.demo) against independent computations.

Oracles: gradients from ``eqx.filter_grad`` with norms taken in float64 NumPy, a first
adamw step written out by hand, He init's standard deviation, a second identical run, the
float32 run for the bfloat16 one, an uninterrupted run for a crashed or killed and resumed
one, and the command line in a subprocess with 8 simulated CPU devices against the
in-process single-device run. The multi-process runs are in test_multiprocess.py.
"""

import dataclasses
import doctest
import io
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

pytest.importorskip("orbax.checkpoint", reason="the demo extra")
import orbax.checkpoint as ocp
from sklearn.datasets import load_digits

import eqx_norm.demo._train
from eqx_norm.demo import TrainConfig, batch_order, load_data, loss_fn, main, make_model, train
from eqx_norm.demo._cli import build_parser, parse_args

REPO = Path(__file__).resolve().parents[1]
SMALL = TrainConfig(depth=4, width=32, steps=20)  # shared, so that its compiled step is reused
SMALL_ARGV = ["--steps", "20", "--depth", "4", "--width", "32"]
MAIN_LABELS = ["no norm, default init", "no norm, He init", "LayerNorm"]
slow = pytest.mark.slow


@pytest.fixture(scope="module")
def data():
    return load_data()


def demo(cwd, *argv, timeout=300, wait=True):
    """``python -m eqx_norm.demo *argv`` in a fresh process without XLA_FLAGS."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "eqx_norm.demo", *argv]
    if not wait:
        return subprocess.Popen(
            command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
    return subprocess.run(
        command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def first_batch(config, data, step=0):
    indices = batch_order(config.seed, len(data.x_train), config.batch_size, step + 1)[step]
    return data.x_train[indices], data.y_train[indices]


def saved_state(folder, step):
    """The (params, opt_state) leaves of an orbax checkpoint, read without a template (as
    nested dicts: in the order of their keys, not of the model's fields)."""
    composite = ocp.args.Composite(state=ocp.args.StandardRestore())
    return [
        np.asarray(a)
        for a in jax.tree.leaves(ocp.CheckpointManager(folder).restore(step, args=composite).state)
    ]


# ------------------------------------------------------------------------ data and model


def test_data_is_the_standardised_digits_split(data):
    x, y = load_digits(return_X_y=True)
    assert data.x_train.shape == (1437, 64) and data.x_test.shape == (360, 64)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int32
    # every class in both parts, in the proportions of the full set (stratified split)
    np.testing.assert_allclose(
        np.bincount(data.y_test) / 360, np.bincount(y) / len(y), atol=1 / 360
    )
    np.testing.assert_array_equal(
        np.bincount(data.y_train) + np.bincount(data.y_test), np.bincount(y)
    )
    # standardised with training statistics: mean 0, std 1 (0 for always-blank pixels)
    np.testing.assert_allclose(data.x_train.mean(axis=0), 0, atol=1e-5)
    std = data.x_train.std(axis=0)
    assert np.all(np.isclose(std, 1, atol=1e-5) | (std == 0)), std
    assert np.all(std[x.std(axis=0) == 0] == 0)  # pixels blank in every digit stay 0
    np.testing.assert_array_equal(load_data().x_test, data.x_test)


def test_batch_order_is_seeded_epochs_of_permutations():
    order = batch_order(seed=3, num_examples=10, batch_size=4, steps=5)
    assert order.shape == (5, 4)
    for epoch in (order[0:2], order[2:4]):  # 2 whole batches per epoch: 8 distinct examples
        assert len(np.unique(epoch)) == 8
    np.testing.assert_array_equal(order, batch_order(3, 10, 4, 5))
    # the first steps do not depend on the run's length: a resumed run finds its place
    np.testing.assert_array_equal(order[:3], batch_order(3, 10, 4, 3))
    assert not np.array_equal(order, batch_order(4, 10, 4, 5))
    with pytest.raises(ValueError, match=r"`batch_size` \(11\) exceeds the training set \(10\)"):
        batch_order(0, 10, 11, 1)


@pytest.mark.slow
def test_initialisations_have_their_stated_scale():
    # 64 x 256 weights per layer: the sample standard deviation is within ~2% of the true one
    config = TrainConfig(depth=3, width=256, norm="none")
    he = make_model(config)
    default = make_model(dataclasses.replace(config, init="default"))
    scaled = make_model(dataclasses.replace(config, init_scale=0.25))
    for i, fan_in in enumerate((64, 256, 256)):
        std = float(np.std(np.asarray(he.hidden[i].weight, dtype=np.float64)))
        assert abs(std / math.sqrt(2 / fan_in) - 1) < 0.05, (i, std)
        assert np.all(np.asarray(he.hidden[i].bias) == 0)
        # eqx.nn.Linear's U(-1/sqrt(fan_in), 1/sqrt(fan_in)): std 1/sqrt(3 fan_in)
        std = float(np.std(np.asarray(default.hidden[i].weight, dtype=np.float64)))
        assert abs(std / math.sqrt(1 / (3 * fan_in)) - 1) < 0.05, (i, std)
        np.testing.assert_array_equal(scaled.hidden[i].weight, 0.25 * he.hidden[i].weight)
    assert abs(eqx_norm.demo._train.default_init_scale("relu") - math.sqrt(1 / 6)) < 1e-12
    # runs that differ only by their norm start from the same weights; every norm of NORMS
    for name, cls in eqx_norm.demo.NORMS.items():
        model = make_model(dataclasses.replace(config, norm=name))
        assert len(model.norms) == 3 and all(type(n) is cls for n in model.norms)
        for a, b in zip(model.hidden, he.hidden):
            np.testing.assert_array_equal(a.weight, b.weight)


@slow
def test_gamma_and_beta_get_gradients_and_follow_adamw_s_first_step(data):
    config = dataclasses.replace(SMALL, steps=1)
    model = make_model(config)
    grads = eqx.filter_grad(loss_fn)(model, *first_batch(config, data))
    trained = train(config, data).model
    lr, wd = config.learning_rate, config.weight_decay
    for before, grad, after in zip(model.norms, grads.norms, trained.norms):
        for name in ("gamma", "beta"):
            p, g = np.asarray(getattr(before, name)), np.asarray(getattr(grad, name))
            assert np.linalg.norm(g) > 0  # every layer's gamma and beta get a gradient
            # adamw's first step, written out: m_hat = g, v_hat = g^2 (bias-corrected)
            expected = p - lr * (g / (np.abs(g) + 1e-8) + wd * p)
            new = np.asarray(getattr(after, name))
            # a unit that the ReLU shuts for the whole batch gets exactly 0: it moves by
            # weight decay alone; all others move
            assert np.all(new[g != 0] != p[g != 0]) and np.mean(g != 0) > 0.5
            # parameters are O(1) in float32 (ulp 1.2e-7); the step is 1e-3
            np.testing.assert_allclose(new, expected, atol=1e-6)


@slow
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
        expected = {"weight": [g.weight for g in (*grads.hidden, grads.head)]}
        for name in ("gamma", "beta") if grads.norms else ():
            if getattr(grads.norms[0], name, None) is not None:
                expected[name] = [getattr(n, name) for n in grads.norms]
        assert set(norms) == set(expected)
        for name, arrays in expected.items():  # norms in float64 NumPy, apart from the demo's
            values = [np.linalg.norm(np.asarray(a, dtype=np.float64).ravel()) for a in arrays]
            # eager and jitted float32 gradients differ by rounding: ~1e-6 relative
            np.testing.assert_allclose(norms[name], values, rtol=1e-5)


@slow
def test_default_init_starves_the_first_layers_and_he_init_does_not(data):
    # Measured at the first step (seed 0, depth 12): ratio 1.1e3 with the default init,
    # 2.06 with He init, 1.59 with He init and LayerNorm (seeds 0-4 in docs/training_demo.md)
    config = TrainConfig(steps=1)
    default = train(dataclasses.replace(config, norm="none", init="default"), data)
    assert default.ratio_first > 100, default.ratio_first
    weight = default.grad_norms_first["weight"]
    assert weight[0] < weight[-2] / 100  # the gradient vanishes towards the input
    for norm in ("none", "layer"):
        assert train(dataclasses.replace(config, norm=norm), data).ratio_first < 5, norm


@slow
def test_layernorm_makes_training_robust_to_the_init_scale(data):
    # The demo's measured claim (seeds 0-4 in docs/training_demo.md): at 4x He init the run
    # without normalization stays below 0.6 test accuracy, LayerNorm's above 0.8; at He
    # init both reach 0.9. Seed 0, 500 steps: 0.447 / 0.875 and 0.914 / 0.922.
    for scale, plain_ok, layer_min in (
        (4.0, lambda a: a < 0.6, 0.8),
        (1.0, lambda a: a > 0.9, 0.9),
    ):
        plain = train(TrainConfig(norm="none", init_scale=scale), data)
        assert plain_ok(plain.test_accuracy), (scale, plain.test_accuracy)
        layer = train(TrainConfig(norm="layer", init_scale=scale), data)
        assert layer.test_accuracy > layer_min, (scale, layer.test_accuracy)


@slow
def test_same_seed_gives_identical_results(data):
    a, b = train(SMALL, data), train(SMALL, data)
    np.testing.assert_array_equal(a.losses, b.losses)
    for name in a.grad_norms_last:
        np.testing.assert_array_equal(a.grad_norms_last[name], b.grad_norms_last[name])
    assert a.test_accuracy == b.test_accuracy and a.final_loss == b.final_loss
    assert not np.array_equal(a.losses, train(dataclasses.replace(SMALL, seed=1), data).losses)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"activation": "gelu"}, r"`activation` must be one of \('relu', 'tanh'\), got 'gelu'"),
        ({"norm": "batch"}, r"`norm` must be one of \('none', 'layer', 'rms'.*\), got 'batch'"),
        ({"init": "xavier"}, r"`init` must be one of \('default', 'he'\), got 'xavier'"),
        ({"dtype": "float16"}, r"`dtype` must be one of \('float32', 'bfloat16'\)"),
        ({"batch_size": 100, "devices": 8}, r"`batch_size` \(100\) must be divisible by `devices`"),
    ],
)
def test_config_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_too_few_devices_is_a_clear_error(data, capsys):
    devices = 2 * jax.device_count()
    with pytest.raises(
        ValueError, match=rf"`devices`={devices} needs {devices} device.*jax_num_cpu_devices"
    ):
        train(dataclasses.replace(SMALL, devices=devices, batch_size=8 * devices), data)
    # from the command line too (JAX has started here: the count it asks for comes too late)
    assert (
        main(
            [*SMALL_ARGV, "--devices", str(devices), "--batch-size", str(8 * devices), "--no-plot"]
        )
        == 2
    )
    assert (
        f"error: `devices`={devices} needs {devices} device(s) in each of 1 process"
        in capsys.readouterr().err
    )


# -------------------------------------------------------------------------- command line


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--devices", "3"], r"--batch-size 128 must be a multiple of --devices 3"),
        (
            ["--processes", "2", "--devices", "3"],
            r"--devices 3 must be a multiple of the processes \(2\)",
        ),
        (["--processes", "2", "--process-id", "0"], r"--processes starts its processes itself"),
        (["--coordinator", "h:1"], r"needs --coordinator, --num-processes and --process-id"),
        (["--steps", "0"], r"--steps: expected a positive integer, got '0'"),
        (["--steps", "x"], r"--steps: invalid int value: 'x'"),
        (["--resume"], r"--resume needs --checkpoint-dir"),
        (["--init-scales", "0"], r"--init-scales: expected a finite positive number, got '0'"),
        (["--learning-rate", "nan"], r"--learning-rate: expected a finite number >= 0, got 'nan'"),
        (
            ["--norms", "batch"],
            r"--norms: invalid choice: 'batch' \(choose from '?layer'?, '?rms'?",
        ),
        (["--dtype", "float16"], r"--dtype: invalid choice: 'float16'"),
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
    assert len(options) == 23
    for action in options:
        assert action.help and " ".join(action.help.split()) in text, action.option_strings
        if action.default not in (None, False):  # else the help says what happens instead
            assert f"(default: {action.default})" in text, action.option_strings
    assert "--steps N optimizer steps per run (default: 500)" in text
    assert "(default: [0.25, 0.5, 1.0, 2.0, 4.0])" in text
    assert "layer = eqx_norm.LayerNorm, rms = eqx_norm.RMSNorm" in text  # from the NORMS table
    assert "(default: None)" not in text and "(default: False)" not in text


def test_parsed_defaults_and_the_processes_launch(monkeypatch):
    assert parse_args([]).seeds == [0] and parse_args(["--seed", "3"]).seeds == [3]
    assert parse_args(["--seeds", "2", "0", "2"]).seeds == [2, 0]  # each once, in order
    assert parse_args(["--init-scales"]).init_scales == []
    assert parse_args(["--init-scales", "4", "0.5"]).init_scales == [0.5, 4.0]
    assert parse_args(["--norms", "rms", "layer", "rms"]).norms == ["rms", "layer"]
    assert parse_args([]).devices == 1 and parse_args(["--processes", "2"]).devices == 2
    args = parse_args(
        ["--devices", "8", "--coordinator", "h:1", "--num-processes", "4", "--process-id", "3"]
    )
    assert args.local_devices == 2
    calls = []
    monkeypatch.setattr(eqx_norm.demo._cli, "launch", lambda *a: calls.append(a) or 7)
    argv = ["--processes", "2", "--steps", "5", "--devices", "4", "--timeout", "9", "--processes=2"]
    assert main(argv) == 7  # the launcher's exit code
    # the copies get the same command without --processes
    assert calls == [(["--steps", "5", "--devices", "4", "--timeout", "9"], 2, 9.0)]


def test_coordinator_flags_join_jax_distributed(monkeypatch):
    calls = []
    monkeypatch.setattr(
        jax.distributed, "initialize", lambda *a, **k: calls.append(("init", *a, k))
    )
    monkeypatch.setattr(jax.config, "update", lambda *a: calls.append(a))
    monkeypatch.setattr(eqx_norm.demo._cli, "_run", lambda args: calls.append("run") or 0)
    assert main(["--coordinator", "h:1", "--num-processes", "2", "--process-id", "1"]) == 0
    assert calls == [
        ("jax_num_cpu_devices", 1),
        ("jax_cpu_collectives_implementation", "gloo"),
        ("init", "h:1", 2, 1, {"initialization_timeout": 310}),  # --join-timeout 300 + 10
        "run",
    ]


@pytest.mark.slow
def test_missing_demo_extra_is_a_clear_message():
    code = "import sys; sys.modules['sklearn'] = None; import eqx_norm.demo"
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert process.returncode == 1
    assert (
        'ImportError: eqx_norm.demo needs scikit-learn, which is not installed. Install the demo extra: pip install "eqx_norm[demo]"'
        in process.stderr
    )


@slow
def test_main_prints_tables_and_writes_summary_in_bfloat16(tmp_path, capsys):
    argv = [
        *SMALL_ARGV,
        "--no-plot",
        "--out",
        str(tmp_path),
        "--seeds",
        "0",
        "1",
        "--dtype",
        "bfloat16",
    ]
    assert main([*argv, "--norms", "layer", "rms", "--init-scales", "0.5", "1"]) == 0
    out = capsys.readouterr().out
    for line in (
        "init: 'default' is eqx.nn.Linear's U(-1/sqrt(fan_in), 1/sqrt(fan_in)), 0.41x the He init",
        "bfloat16 activations, float32 parameters",
        "Gradient norm of each Linear weight at the first step (seed 0)",
        "5 (head)",
        "grad ratio, first step",
        "mean ± standard deviation [min, max]",
        "LayerNorm against no norm, He init:",
        "RMSNorm against no norm, He init:",
        "Test accuracy after 20 steps against the initial weight scale",
        "LayerNorm: test accuracy",
        "Reproducibility: Bit for bit, a run repeats only on the same machine",
    ):
        assert line in out, line
    assert not (tmp_path / "gradient_flow.png").exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    labels = [*MAIN_LABELS, "RMSNorm"]
    assert summary["main_runs"] == labels and summary["seeds"] == [0, 1]
    assert summary["config"]["dtype"] == "bfloat16"
    # the main runs and the scale-0.5 runs, each once per seed; scale 1 is the main runs
    assert set(summary["runs"]) == {
        *labels,
        "no norm, He init x0.5",
        "LayerNorm x0.5",
        "RMSNorm x0.5",
    }
    for label, runs in summary["runs"].items():
        assert [r["seed"] for r in runs] == [0, 1] and len(runs[0]["losses"]) == 20, label
        accuracies = [r["test_accuracy"] for r in runs]
        aggregate = summary["aggregate"][label]["test_accuracy"]
        assert aggregate["mean"] == pytest.approx(np.mean(accuracies)) and aggregate["max"] == max(
            accuracies
        )
    assert summary["environment"]["devices"] == 1 and "jaxlib" in summary["environment"]
    assert "device layout" in summary["reproducibility"]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.slow
def test_progress_bar_only_on_a_terminal(data, capsys, monkeypatch):
    """Piped to a file, the demo writes no progress lines (tqdm redraws its bar with \\r:
    about 60 KB of them for the default runs); on a terminal it draws the bar."""
    train(SMALL, data, progress=True)  # under capsys, stderr is not a terminal
    assert capsys.readouterr().err == ""
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    train(SMALL, data, progress=True)
    assert "\r" in terminal.getvalue() and "20/20" in terminal.getvalue()


@slow
def test_command_line_on_8_devices_writes_the_figure_and_trains_like_1_device(tmp_path, data):
    # a fresh process with no XLA_FLAGS: the entry point asks JAX for 8 CPU devices itself
    process = demo(tmp_path, *SMALL_ARGV, "--devices", "8", "--init-scales", "0.5", "1")
    assert process.returncode == 0, process.stderr
    assert "batch sharded over 8 cpu device(s)" in process.stdout
    assert "\r" not in process.stderr  # stderr is a pipe: no progress bar
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


@slow
def test_checkpoints_resume_a_finished_run_and_refuse_another_run(tmp_path, data):
    first = train(SMALL, data, checkpoint_dir=tmp_path, checkpoint_every=8)
    # orbax keeps the last checkpoint only (steps 8 and 16 are gone), no temporary folders
    assert sorted(p.name for p in tmp_path.iterdir()) == ["20"]
    # parameters, then adamw's count (int32) and moments (float32, one per parameter)
    leaves = saved_state(tmp_path, 20)
    n_params = len(jax.tree.leaves(eqx.filter(first.model, eqx.is_array)))
    assert len(leaves) == 3 * n_params + 1
    assert [a.dtype for a in leaves].count(np.dtype(np.int32)) == 1
    weight = np.asarray(first.model.hidden[0].weight)
    assert any(a.shape == weight.shape and np.array_equal(a, weight) for a in leaves)
    with pytest.raises(
        ValueError, match=r"already holds a checkpoint of a run \(step 20\): pass --resume"
    ):
        train(SMALL, data, checkpoint_dir=tmp_path)
    again = train(SMALL, data, checkpoint_dir=tmp_path, resume=True)
    assert again.resumed_at == 20  # read back, not retrained
    np.testing.assert_array_equal(again.losses, first.losses)
    assert again.test_accuracy == first.test_accuracy and again.final_loss == first.final_loss
    for a, b in zip(jax.tree.leaves(again.model), jax.tree.leaves(first.model)):
        np.testing.assert_array_equal(a, b)
    other = dataclasses.replace(SMALL, learning_rate=3e-3)
    with pytest.raises(
        ValueError, match=r"is of another run \(learning_rate: saved 0.001, now 0.003\)"
    ):
        train(other, data, checkpoint_dir=tmp_path, resume=True)


@slow
def test_a_crashed_run_resumes_bit_for_bit(tmp_path, data, monkeypatch):
    reference = train(SMALL, data)
    step, calls = eqx_norm.demo._train.train_step, []

    def crash_at_13(*args):
        calls.append(None)
        if len(calls) == 13:
            raise KeyboardInterrupt
        return step(*args)

    monkeypatch.setattr(eqx_norm.demo._train, "train_step", crash_at_13)
    with pytest.raises(KeyboardInterrupt):
        train(SMALL, data, checkpoint_dir=tmp_path, checkpoint_every=6)
    monkeypatch.undo()
    time.sleep(1)  # the step-12 save, asynchronous, may still be committing: either is fine
    resumed = train(SMALL, data, checkpoint_dir=tmp_path, checkpoint_every=6, resume=True)
    assert resumed.resumed_at in (6, 12)
    np.testing.assert_array_equal(resumed.losses, reference.losses)
    for a, b in zip(jax.tree.leaves(resumed.model), jax.tree.leaves(reference.model)):
        np.testing.assert_array_equal(a, b)


@slow
def test_killed_and_resumed_demo_ends_bit_for_bit_like_an_uninterrupted_one(tmp_path):
    argv = [
        "--steps",
        "600",
        "--depth",
        "2",
        "--width",
        "16",
        "--batch-size",
        "32",
        "--init-scales",
    ]
    argv += ["--no-plot", "--checkpoint-every", "50"]
    killed, second = tmp_path / "killed", tmp_path / "killed" / "seed0-none-he-x1"
    # 1. SIGKILL once the second run (no norm, He init) has committed a checkpoint at a
    #    step >= 100 of 600 (orbax renames a step's folder to its number once complete)
    process = demo(
        tmp_path, *argv, "--out", "out_killed", "--checkpoint-dir", str(killed), wait=False
    )
    try:
        deadline, steps = time.monotonic() + 240, []
        while (
            time.monotonic() < deadline and process.poll() is None and max(steps, default=0) < 100
        ):
            steps = (
                [int(p.name) for p in second.glob("*") if p.name.isdigit()]
                if second.exists()
                else []
            )
            time.sleep(0.01)
        assert process.poll() is None, "the demo ended before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    saved = max(int(p.name) for p in second.glob("*") if p.name.isdigit())
    assert 100 <= saved < 600  # killed mid-run
    assert not (tmp_path / "out_killed" / "summary.json").exists()
    # 2. resume it; 3. the same command, never interrupted
    resumed = demo(
        tmp_path, *argv, "--out", "out_killed", "--checkpoint-dir", str(killed), "--resume"
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[no norm, default init] seed 0: " in resumed.stdout
    assert "resumed at step 600)" in resumed.stdout  # the finished run, read back
    assert f"resumed at step {saved})" in resumed.stdout
    reference = demo(
        tmp_path, *argv, "--out", "out_reference", "--checkpoint-dir", str(tmp_path / "reference")
    )
    assert reference.returncode == 0, reference.stderr[-3000:]
    # the final parameters and optimizer states, bit for bit, for all three runs
    for run in ("seed0-none-default-x1", "seed0-none-he-x1", "seed0-layer-he-x1"):
        for a, b in zip(
            saved_state(killed / run, 600), saved_state(tmp_path / "reference" / run, 600)
        ):
            assert a.dtype == b.dtype and np.array_equal(a, b), run
    runs = [
        json.loads((tmp_path / out / "summary.json").read_text())["runs"]
        for out in ("out_killed", "out_reference")
    ]
    for label in MAIN_LABELS:
        a, b = runs[0][label][0], runs[1][label][0]
        assert a["losses"] == b["losses"] and a["test_accuracy"] == b["test_accuracy"]
        assert a["final_loss"] == b["final_loss"]


# -------------------------------------------------------------------------- bfloat16


@slow
def test_bfloat16_activations_float32_parameters_and_state(data, tmp_path):
    config = dataclasses.replace(SMALL, dtype="bfloat16", steps=1)
    model = make_model(config)
    x, y = first_batch(config, data)
    jaxpr = jax.make_jaxpr(lambda m: loss_fn(m, x, y))(model)
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 5  # 4 hidden layers and the head, each computed in bf16
    assert all(v.aval.dtype == jax.numpy.bfloat16 for e in dots for v in e.invars)
    result = train(config, data, checkpoint_dir=tmp_path)
    # the saved state: every parameter and adamw's mu and nu in float32, its count in int32
    dtypes = [a.dtype for a in saved_state(tmp_path, 1)]
    n_params = len(jax.tree.leaves(eqx.filter(model, eqx.is_array)))
    assert (
        dtypes.count(np.dtype(np.float32)) == 3 * n_params and dtypes.count(np.dtype(np.int32)) == 1
    )
    # the same weights and batch: bf16 keeps 8 significant bits (relative rounding 2^-9
    # = 2e-3 per value), so the first loss (~2.3) agrees to about 1e-2 relative; measured
    # 2e-5 to 1.3e-4 over seeds 0-2
    reference = train(dataclasses.replace(config, dtype="float32"), data)
    np.testing.assert_allclose(result.losses[0], reference.losses[0], rtol=1e-2)
    assert result.losses.dtype == np.float32


@slow
def test_bfloat16_trains_1000_steps_like_float32(data):
    # Bound: the final loss (cross-entropy on the whole training set) within 10% of the
    # float32 run's. Why: both runs start from the same float32 weights and see the same
    # batches; bf16 rounds each activation by at most 2^-9 relative, which moves a logit
    # of ~10 by ~0.02 and an example's small loss by a few percent at most, with random
    # signs that mostly cancel over 1437 examples. Measured (depth 4, width 32, seeds 0-2):
    # 0.02% to 0.5% apart (final loss ~2.8e-3). Parameters and adamw state stored in bf16
    # instead (updates of 1e-3 under bf16's spacing of 4e-3 near 1) end at 0.074: 26x.
    config = TrainConfig(depth=4, width=32, steps=1000)
    f32, bf16 = train(config, data), train(dataclasses.replace(config, dtype="bfloat16"), data)
    assert np.all(np.isfinite(bf16.losses)) and np.isfinite(bf16.final_loss)
    assert abs(bf16.final_loss - f32.final_loss) <= 0.1 * f32.final_loss, (
        bf16.final_loss,
        f32.final_loss,
    )
    assert f32.final_loss < 0.01  # both trained: the initial loss is ~2.3
    assert abs(bf16.test_accuracy - f32.test_accuracy) <= 5 / 360


# ------------------------------------------------------------------------ documentation

PAGE = REPO / "docs" / "training_demo.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", PAGE.read_text(), flags=re.DOTALL | re.MULTILINE)


@slow
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_training_demo_page_examples_run(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], f"training_demo.md block {index}", "exec"), {"__name__": "__doc__"})


@slow
def test_demo_docstring_examples():
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(eqx_norm.demo._train, optionflags=flags)
    assert result.failed == 0 and result.attempted > 0
