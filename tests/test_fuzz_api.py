"""Fuzzing the public API: valid and invalid arguments, drawn together by hypothesis.

Every argument is drawn from a table of values, each tagged ``ok`` (valid whatever else is
drawn), ``bad`` (invalid whatever else is drawn) or ``maybe`` (valid or not depending on
the other arguments: a random initializer needs a key, ``implementation="kernel"`` needs an
input the kernel serves). Each example then checks one of two outcomes:

* the call raises: a ``TypeError`` or ``ValueError`` (nothing else), whose message names
  one of the ``bad``/``maybe`` arguments (`name` in backticks, ``name=``, or ``x of shape``);
* the call returns: no argument was ``bad``, and the output has x's shape and x's dtype (or
  ``dtype``), and agrees with the float64 reference of ``tests/reference.py`` to the
  output dtype's rounding (2e-5 relative for float32, 2e-3 float16, 1.6e-2 bfloat16, on
  outputs of order 1: inputs are standard normal).

Families: LayerNorm/RMSNorm, GroupNorm/InstanceNorm (modules and functions) and
``functional.batch_norm``. Each test counts the examples of each outcome and asserts that
both were exercised; the counts are printed (``pytest -s``) and recorded as test properties.

``load_leaves`` gets files truncated at every byte, files with random bits flipped (our
``ValueError`` naming the leaf, or a load in which only the flipped data bytes changed: the
format has no checksum), pickled data in place of an array (refused, never unpickled), and
templates of another configuration than the saved model.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import re
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eqx_norm
from eqx_norm import functional
from eqx_norm.initializers import Constant, Normal, OneInit, TruncatedNormal, Uniform, ZeroInit

import reference

# the quick loop (-m "not slow") skips this file: hypothesis fuzzing: long; CI runs it
pytestmark = pytest.mark.slow

# 30 examples per family keep the quick run under a minute; the slow run draws 150 (or
# EQX_NORM_FUZZ_EXAMPLES) per family.
QUICK, LONG = 30, int(os.environ.get("EQX_NORM_FUZZ_EXAMPLES", "150"))
SETTINGS = settings(  # max_examples set per test
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
OK, BAD, MAYBE = "ok", "bad", "maybe"
TOLERANCE = {
    jnp.dtype(jnp.float32): 2e-5,
    jnp.dtype(jnp.float16): 2e-3,
    jnp.dtype(jnp.bfloat16): 1.6e-2,
}
COUNTS: collections.Counter = collections.Counter()


def tagged(*pairs):
    """A table of ``(value, status)`` pairs, drawn from by :meth:`Picker.pick`."""
    return pairs


COMMON = ["x", "x dtype", "epsilon", "dtype", "mask", "zero_centered_scale"]
LAYER = ["elementwise_affine", "param_dtype", "scale_initializer", "bias_initializer"]
TRAILING = ["normalized_shape", "implementation"]
GROUPED = ["spatial_ndim", "channel_axis", "num_channels", "num_groups"]


class Picker:
    """Draws each argument of one example. Mode ``valid``: every argument from its valid
    values; ``one``: only the argument ``target`` from its invalid ones, so the message must
    name that one; ``mixed``: each argument invalid with probability 1/4."""

    def __init__(self, draw, targets):
        self.draw = draw
        self.mode = draw(st.sampled_from(["valid", "valid", "one", "one", "mixed"]))
        self.target = draw(st.sampled_from(targets))

    def bad(self, name):
        if self.mode == "valid":
            return False
        if self.mode == "one":
            return name == self.target
        return self.draw(st.integers(0, 3)) == 3

    def pick(self, name, pairs):
        """A ``(value, status)`` pair: a ``bad`` one when this argument is to be invalid,
        else an ``ok`` one, or one 1 time in 4 a ``maybe`` one (where the table has any)."""
        if self.bad(name):
            status = BAD
        else:
            maybe = any(s == MAYBE for _, s in pairs) and self.draw(st.integers(0, 3)) == 3
            status = MAYBE if maybe else OK
        pool = [pair for pair in pairs if pair[1] == status] or list(pairs)
        return self.draw(st.sampled_from(pool))

    def kind(self, name, good, bad):
        return self.draw(st.sampled_from(bad if self.bad(name) else good))


def _pairs(values, status):
    return [(v, status) for v in values]


EPSILONS = tagged(
    *_pairs([1e-5, 0.0, 0.1, 1, np.float32(1e-3)], OK),
    *_pairs([-1e-5, float("nan"), float("inf"), "1e-5", None, True, 1j, np.array(1e-5)], BAD),
)
FLAGS = tagged(*_pairs([True, False, np.bool_(True)], OK), *_pairs([None, 1, "yes"], BAD))
# use_scale/use_bias: None follows elementwise_affine.
SWITCHES = tagged(*_pairs([None, True, False, np.bool_(True)], OK), *_pairs([1, "yes"], BAD))
DTYPES = tagged(
    *_pairs([None, jnp.float32, jnp.bfloat16, jnp.float16, "float32", np.float64], OK),
    *_pairs([jnp.int32, bool, jnp.complex64, "nope", [1], object], BAD),
)
IMPLEMENTATIONS = tagged(
    (None, OK),
    ("xla", OK),
    ("kernel", MAYBE),
    *_pairs(["XLA", "", 1, True, np.array(["xla"]), np.array([1, 2])], BAD),
)
X_DTYPES = tagged(
    *_pairs([jnp.float32, jnp.bfloat16, jnp.float16, np.float64], OK),
    *_pairs([jnp.int32, jnp.bool_, jnp.complex64], BAD),
)
CONTAINERS = st.sampled_from(["jax", "numpy", "list"])
# Few distinct shapes, so that most examples reuse compiled operations (zero-size included).
BATCHES = st.sampled_from([(), (2,), (0,), (2, 1)])
NOT_ARRAYS = tagged(*_pairs([None, "abc", {}, [[1.0, 2.0], [1.0]], object()], BAD))


def initializer(kind, shape, key):
    """The initializer of table entry ``kind`` for a parameter of ``shape``, and its status."""
    random = OK if key is not None else MAYBE  # without a key: a ValueError naming it
    table = {
        "ZeroInit class": (ZeroInit, OK),
        "OneInit(2)": (OneInit(2.0), OK),
        "Constant(0.5)": (Constant(0.5), OK),
        "Normal class": (Normal, random),
        "TruncatedNormal": (TruncatedNormal(stddev=0.5), random),
        "Uniform": (Uniform(-1.0, 1.0), random),
        "jax ones": (jax.nn.initializers.ones, OK),
        "jax normal": (jax.nn.initializers.normal(1.0), random),
        "array": (np.linspace(0.5, 1.5, int(np.prod(shape))).reshape(shape), OK),
        "int array": (np.ones(shape, np.int32), OK),
        "wrong-shape array": (np.ones((*shape, 2), np.float32), BAD),
        "complex array": (np.ones(shape, np.complex64), BAD),
        "bool array": (np.ones(shape, bool), BAD),
        "string array": (np.full(shape, "a"), BAD),
        "scalar": (2.0, BAD),
        "string": ("ones", BAD),
        "list": ([1.0] * int(np.prod(shape)), BAD),
        "wrong-shape callable": (lambda k, s, d: jnp.ones((*s, 2), d), BAD),
        "None callable": (lambda k, s, d: None, BAD),
        "complex callable": (lambda k, s, d: jnp.ones(s, jnp.complex64), BAD),
        "non-initializer class": (int, BAD),
        "Constant class": (Constant, BAD),
    }
    return table[kind]


GOOD_INITIALIZERS = [
    "ZeroInit class",
    "OneInit(2)",
    "Constant(0.5)",
    "Normal class",
    "TruncatedNormal",
    "Uniform",
    "jax ones",
    "jax normal",
    "array",
    "int array",
    "None",
]  # "None" is the default
BAD_INITIALIZERS = [
    "wrong-shape array",
    "complex array",
    "bool array",
    "string array",
    "scalar",
    "string",
    "list",
    "wrong-shape callable",
    "None callable",
    "complex callable",
    "non-initializer class",
    "Constant class",
]


def initializer_kind(pick, argument, off):
    """An initializer kind for ``argument``; for a parameter switched ``off``, the only valid
    one is the default None, and any other is a contradiction."""
    kind = pick.kind(argument, GOOD_INITIALIZERS, BAD_INITIALIZERS)
    return "None" if off and kind in GOOD_INITIALIZERS else kind


def names(message, argument):
    """Whether ``message`` names ``argument``."""
    pattern = rf"`{argument}`|\b{argument}=|\b{argument} of shape|\b{argument} has shape"
    return re.search(pattern, message) is not None


def make_x(pick, shape, status):
    """An input of ``shape`` (a dtype and container drawn), its status and expected dtype."""
    draw = pick.draw
    dtype, dtype_status = pick.pick("x dtype", X_DTYPES)
    seed = draw(st.integers(0, 2**16))
    values = np.asarray(jax.random.normal(jax.random.key(seed), shape)) + 0.5
    container = draw(CONTAINERS)
    if container == "list" and 0 in shape:
        container = "numpy"  # an empty nested list loses the shape
    if container == "jax":
        x = jnp.asarray(values).astype(dtype)
    elif container == "numpy":
        x = values.astype(dtype)
    else:  # nested Python lists (a 0-d shape gives a Python scalar)
        x = values.astype(dtype).tolist()
    expected = jax.dtypes.canonicalize_dtype(np.asarray(x).dtype)
    worst = BAD if BAD in (status, dtype_status) else MAYBE if MAYBE == status else OK
    return x, worst, expected


def draw_mask(pick, x_shape):
    """A mask for an input of ``x_shape`` and its status."""
    kind = pick.kind("mask", ["none", "none", "full", "broadcast"], ["int", "rank", "string"])
    keep = np.asarray(jax.random.bernoulli(jax.random.key(len(x_shape)), 0.7, x_shape))
    if kind == "none":
        return None, OK
    if kind == "full":
        return keep, OK
    if kind == "broadcast":
        return keep[..., :1] if x_shape and x_shape[-1] else keep, OK
    if kind == "int":
        return keep.astype(np.int32), BAD
    if kind == "rank":
        return keep[None], BAD
    return "mask", BAD


def check_outcome(run, statuses, expected_shape, expected_dtype, reference_fn):
    """Run ``run()`` and check it against the statuses of its arguments (see the module
    docstring); ``reference_fn(y)`` checks the values of a successful call."""
    suspects = [name for name, status in statuses.items() if status != OK]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # float64 truncated to float32 without x64
        try:
            y = run()
        except (TypeError, ValueError) as error:
            message = str(error)
            assert suspects, f"all arguments valid, yet {type(error).__name__}: {message}"
            assert any(names(message, name) for name in suspects), (
                f"the message does not name any of {suspects}: {type(error).__name__}: {message}"
            )
            COUNTS["error"] += 1
            return
    bad = [name for name, status in statuses.items() if status == BAD]
    assert not bad, f"invalid {bad} accepted: {statuses}"
    assert y.shape == expected_shape
    assert y.dtype == expected_dtype
    reference_fn(y)
    COUNTS["ok"] += 1


def close_to(y, want, dtypes):
    """``y`` equals the float64 ``want`` to the rounding of the coarsest of ``dtypes``."""
    tol = max(TOLERANCE[jnp.dtype(d)] for d in dtypes)
    got = np.asarray(y.astype(jnp.float32), np.float64)
    finite = np.isfinite(want)  # a zero-variance row at epsilon 0 is 0/0 in the reference
    np.testing.assert_allclose(got[finite], want[finite], rtol=tol, atol=tol)


def trailing_shapes():
    return tagged(
        *_pairs([3, (2, 3), [4], np.int64(2), 1], OK),
        *_pairs(
            [0, -2, 2.5, "3", None, [[3]], (), (2, 0), True, np.array([3]), 2**61, (2**40,) * 2],
            BAD,
        ),
    )


@st.composite
def trailing_cases(draw, via_layer):
    """Arguments for LayerNorm/RMSNorm (``via_layer``) or layer_norm/rms_norm."""
    targets = (
        COMMON + TRAILING + ([*LAYER, "use_scale", "use_bias"] if via_layer else ["gamma", "beta"])
    )
    pick = Picker(draw, targets)
    center = draw(st.booleans())
    shape_value, shape_status = pick.pick("normalized_shape", trailing_shapes())
    shape = (
        tuple(np.atleast_1d(shape_value).tolist())
        if shape_status == OK
        else (3,)  # the input is built for a shape the layer was not given
    )
    statuses = {"normalized_shape": shape_status}
    batch = draw(BATCHES)
    x_kind = pick.kind("x", ["match"], ["wrong", "scalar", "not array"])
    if x_kind == "not array":
        x, x_status = draw(st.sampled_from(NOT_ARRAYS))
        x_dtype = None
    else:
        x_shape = {"match": batch + shape, "wrong": batch + shape + (2,), "scalar": ()}[x_kind]
        status = OK if x_kind == "match" and shape_status == OK else MAYBE
        if x_kind != "match" and shape_status == OK:
            status = BAD
        x, x_status, x_dtype = make_x(pick, x_shape, status)
    statuses["x"] = x_status
    epsilon, statuses["epsilon"] = pick.pick("epsilon", EPSILONS)
    dtype, statuses["dtype"] = pick.pick("dtype", DTYPES)
    implementation, statuses["implementation"] = pick.pick("implementation", IMPLEMENTATIONS)
    x_shape = np.shape(x) if x_dtype is not None else ()
    mask, statuses["mask"] = draw_mask(pick, x_shape)
    if mask is not None and statuses["x"] != OK:
        statuses["mask"] = MAYBE if statuses["mask"] == OK else statuses["mask"]
    zero_centered, statuses["zero_centered_scale"] = pick.pick("zero_centered_scale", FLAGS)
    case = dict(
        center=center,
        shape_value=shape_value,
        shape=shape,
        x=x,
        x_dtype=x_dtype,
        epsilon=epsilon,
        dtype=dtype,
        implementation=implementation,
        mask=mask,
        zero_centered=zero_centered,
        statuses=statuses,
    )
    if via_layer:
        key = draw(st.sampled_from([None, jax.random.key(1)]))
        affine, statuses["elementwise_affine"] = pick.pick("elementwise_affine", FLAGS)
        use_scale, statuses["use_scale"] = pick.pick("use_scale", SWITCHES)
        use_bias, statuses["use_bias"] = pick.pick("use_bias", SWITCHES)
        param_dtype, statuses["param_dtype"] = pick.pick("param_dtype", DTYPES)
        inits = {}
        case_flags = {"use_scale": use_scale, "use_bias": use_bias}
        affine_off = statuses["elementwise_affine"] == OK and not affine
        for flag, value in case_flags.items():
            if affine_off and statuses[flag] == OK and value is not None and value:
                statuses[flag] = BAD  # asks for a parameter elementwise_affine switches off
        for argument, switch in (
            ("scale_initializer", "use_scale"),
            ("bias_initializer", "use_bias"),
        ):
            value = case_flags[switch]
            switch_off = statuses[switch] == OK and value is not None and not value
            off = affine_off or switch_off
            kind = initializer_kind(pick, argument, off)
            value, status = (None, OK) if kind == "None" else initializer(kind, shape, key)
            if shape_status != OK and status == OK:
                status = MAYBE  # built for a shape the layer was not given
            if off and value is not None:
                # An initializer for a parameter switched off, unless it is the default
                # written out (ZeroInit is the bias's, and the scale's when zero-centred).
                status = MAYBE if kind == "ZeroInit class" else BAD
            inits[argument], statuses[argument] = value, status
        case.update(
            key=key,
            affine=affine,
            use_scale=use_scale,
            use_bias=use_bias,
            param_dtype=param_dtype,
            **inits,
        )
    else:
        for argument in ("gamma", "beta"):
            value, status = pick.pick(
                argument,
                tagged(
                    (None, OK),
                    (np.linspace(0.5, 1.5, int(np.prod(shape))).reshape(shape), OK),
                    (jnp.full(shape, 0.25, jnp.bfloat16), OK),
                    (np.ones(shape, np.int32), BAD),
                    (np.ones((*shape, 2), np.float32), BAD),
                    ("gamma", BAD),
                    ([[1.0], [1.0, 2.0]], BAD),
                ),
            )
            if shape_status != OK and status == OK:
                status = MAYBE
            case[argument], statuses[argument] = value, status
    return case


def _trailing_reference(case, gamma, beta, zero_centered):
    def check(y):
        x = jnp.asarray(case["x"])
        if zero_centered and gamma is not None:
            gamma_ = 1.0 + np.asarray(gamma.astype(jnp.float32), np.float64)
        else:
            gamma_ = None if gamma is None else np.asarray(gamma.astype(jnp.float32))
        beta_ = None if beta is None else np.asarray(beta.astype(jnp.float32))
        fn = reference.layer_norm if case["center"] else reference.rms_norm
        want = fn(
            np.asarray(x.astype(jnp.float32)),
            len(case["shape"]),
            gamma_,
            beta_,
            epsilon=float(case["epsilon"]),
            mask=case["mask"],
        )
        close_to(y, want, [x.dtype, y.dtype])

    return check


def _fuzz_trailing_layers(case):
    cls = eqx_norm.LayerNorm if case["center"] else eqx_norm.RMSNorm
    built = {}

    def run():
        layer = cls(
            case["shape_value"],
            case["epsilon"],
            scale_initializer=case["scale_initializer"],
            bias_initializer=case["bias_initializer"],
            elementwise_affine=case["affine"],
            use_scale=case["use_scale"],
            use_bias=case["use_bias"],
            zero_centered_scale=case["zero_centered"],
            param_dtype=case["param_dtype"],
            dtype=case["dtype"],
            implementation=case["implementation"],
            key=case["key"],
        )
        built["layer"] = layer
        y, state = layer(case["x"], "state", mask=case["mask"])
        assert state == "state"
        return y

    expected_dtype = _expected_dtype(case)

    def check(y):
        layer = built["layer"]
        _trailing_reference(case, layer.gamma, layer.beta, layer.zero_centered_scale)(y)

    check_outcome(run, case["statuses"], _expected_shape(case), expected_dtype, check)


def _fuzz_trailing_functions(case):
    fn = functional.layer_norm if case["center"] else functional.rms_norm

    def run():
        return fn(
            case["x"],
            case["shape_value"],
            case["gamma"],
            case["beta"],
            epsilon=case["epsilon"],
            mask=case["mask"],
            zero_centered_scale=case["zero_centered"],
            dtype=case["dtype"],
            implementation=case["implementation"],
        )

    def check(y):  # only reached when gamma and beta were accepted
        gamma, beta = (None if v is None else jnp.asarray(v) for v in (case["gamma"], case["beta"]))
        _trailing_reference(case, gamma, beta, case["zero_centered"])(y)

    check_outcome(run, case["statuses"], _expected_shape(case), _expected_dtype(case), check)


def _expected_shape(case):
    return np.shape(case["x"]) if case["x_dtype"] is not None else None


def _expected_dtype(case):
    if case["dtype"] is not None and case["statuses"]["dtype"] == OK:
        return jax.dtypes.canonicalize_dtype(jnp.dtype(case["dtype"]))
    return case["x_dtype"]


@st.composite
def grouped_cases(draw, via_layer):
    """Arguments for GroupNorm/InstanceNorm (``via_layer``) or group_norm/instance_norm."""
    pick = Picker(draw, COMMON + GROUPED + (LAYER if via_layer else ["gamma", "beta"]))
    instance = draw(st.booleans())
    statuses = {}
    spatial_ndim, statuses["spatial_ndim"] = pick.pick(
        "spatial_ndim",
        tagged(*_pairs([1, 2], OK), (0, BAD if instance else OK), *_pairs([-1, 1.0, "2"], BAD)),
    )
    channel_axis, statuses["channel_axis"] = pick.pick(
        "channel_axis", tagged(*_pairs([-1, 0], OK), *_pairs([1, -2, "a", None, 0.0], BAD))
    )
    channels = draw(st.sampled_from([2, 4, 6]))
    num_channels, statuses["num_channels"] = pick.pick(
        "num_channels", tagged((channels, OK), *_pairs([0, 2.0, "4", 2**60], BAD), (8, MAYBE))
    )
    groups = None
    if not instance:
        groups, statuses["num_groups"] = pick.pick(
            "num_groups",
            tagged(*_pairs([1, 2], OK), *_pairs([0, -1, 1.5, "2", None], BAD), (4, MAYBE)),
        )
    layout_ok = statuses["spatial_ndim"] == OK and statuses["channel_axis"] == OK
    n = (spatial_ndim if layout_ok else 1) + 1
    example = [draw(st.sampled_from([1, 3])) for _ in range(n - 1)]
    example.insert(0 if layout_ok and channel_axis == 0 else n - 1, channels)
    batch = draw(BATCHES)
    x_kind = pick.kind("x", ["match"], ["short", "not array"])
    if x_kind == "not array":
        x, x_status = draw(st.sampled_from(NOT_ARRAYS))
        x_dtype = None
    else:
        x_shape = batch + tuple(example) if x_kind == "match" else tuple(example[1:])
        x, x_status, x_dtype = make_x(pick, x_shape, OK if x_kind == "match" else MAYBE)
        if not layout_ok:
            x_status = MAYBE if x_status == OK else x_status
    statuses["x"] = x_status
    if groups is not None and statuses["num_groups"] == OK and channels % groups:
        statuses["num_groups"] = MAYBE
    epsilon, statuses["epsilon"] = pick.pick("epsilon", EPSILONS)
    dtype, statuses["dtype"] = pick.pick("dtype", DTYPES)
    x_shape = np.shape(x) if x_dtype is not None else ()
    mask, statuses["mask"] = draw_mask(pick, x_shape)
    if mask is not None and statuses["x"] != OK:
        statuses["mask"] = MAYBE if statuses["mask"] == OK else statuses["mask"]
    zero_centered, statuses["zero_centered_scale"] = pick.pick("zero_centered_scale", FLAGS)
    case = dict(
        instance=instance,
        spatial_ndim=spatial_ndim,
        channel_axis=channel_axis,
        channels=channels,
        num_channels=num_channels,
        groups=groups,
        x=x,
        x_dtype=x_dtype,
        epsilon=epsilon,
        dtype=dtype,
        mask=mask,
        zero_centered=zero_centered,
        statuses=statuses,
    )
    shape = (channels,)
    if via_layer:
        key = draw(st.sampled_from([None, jax.random.key(1)]))
        case["key"] = key
        case["affine"], statuses["elementwise_affine"] = pick.pick("elementwise_affine", FLAGS)
        case["param_dtype"], statuses["param_dtype"] = pick.pick("param_dtype", DTYPES)
        for argument in ("scale_initializer", "bias_initializer"):
            off = statuses["elementwise_affine"] == OK and not case["affine"]
            kind = initializer_kind(pick, argument, off)
            value, status = (None, OK) if kind == "None" else initializer(kind, shape, key)
            if statuses["num_channels"] != OK and status == OK:
                status = MAYBE  # built for x's channels, not for num_channels
            if off and value is not None:
                # An initializer for a parameter switched off, unless it is the default
                # written out (ZeroInit is the bias's, and the scale's when zero-centred).
                status = MAYBE if kind == "ZeroInit class" else BAD
            case[argument], statuses[argument] = value, status
    else:
        if statuses["num_channels"] == MAYBE:
            statuses["num_channels"] = BAD  # 8 never matches x's 2, 4 or 6 channels
        for argument in ("gamma", "beta"):
            case[argument], statuses[argument] = pick.pick(
                argument,
                tagged(
                    (None, OK),
                    (np.linspace(0.5, 1.5, channels), OK),
                    (np.ones(channels + 1, np.float32), BAD),
                    (np.ones(channels, np.int32), BAD),
                    ("gamma", BAD),
                ),
            )
    return case


def _grouped_reference(case, gamma, beta, zero_centered, groups):
    def check(y):
        x = jnp.asarray(case["x"])
        if zero_centered and gamma is not None:
            gamma_ = 1.0 + np.asarray(gamma.astype(jnp.float32), np.float64)
        else:
            gamma_ = None if gamma is None else np.asarray(gamma.astype(jnp.float32))
        beta_ = None if beta is None else np.asarray(beta.astype(jnp.float32))
        want = reference.group_norm(
            np.asarray(x.astype(jnp.float32)),
            case["channels"] if groups is None else groups,
            case["spatial_ndim"],
            gamma_,
            beta_,
            epsilon=float(case["epsilon"]),
            mask=case["mask"],
            channel_axis=case["channel_axis"],
        )
        close_to(y, want, [x.dtype, y.dtype])

    return check


def _fuzz_grouped_layers(case):
    built = {}
    common = dict(
        scale_initializer=case["scale_initializer"],
        bias_initializer=case["bias_initializer"],
        elementwise_affine=case["affine"],
        spatial_ndim=case["spatial_ndim"],
        channel_axis=case["channel_axis"],
        zero_centered_scale=case["zero_centered"],
        param_dtype=case["param_dtype"],
        dtype=case["dtype"],
        key=case["key"],
    )

    def run():
        if case["instance"]:
            layer = eqx_norm.InstanceNorm(case["num_channels"], case["epsilon"], **common)
        else:
            layer = eqx_norm.GroupNorm(
                case["groups"], case["num_channels"], case["epsilon"], **common
            )
        built["layer"] = layer
        return layer(case["x"], mask=case["mask"])

    def check(y):
        layer = built["layer"]
        groups = None if case["instance"] else case["groups"]
        _grouped_reference(case, layer.gamma, layer.beta, layer.zero_centered_scale, groups)(y)

    check_outcome(run, case["statuses"], _expected_shape(case), _expected_dtype(case), check)


def _fuzz_grouped_functions(case):
    common = dict(
        num_channels=case["num_channels"],
        spatial_ndim=case["spatial_ndim"],
        channel_axis=case["channel_axis"],
        epsilon=case["epsilon"],
        mask=case["mask"],
        zero_centered_scale=case["zero_centered"],
        dtype=case["dtype"],
    )

    def run():
        if case["instance"]:
            return functional.instance_norm(case["x"], case["gamma"], case["beta"], **common)
        return functional.group_norm(
            case["x"], case["groups"], case["gamma"], case["beta"], **common
        )

    def check(y):  # only reached when gamma and beta were accepted
        gamma, beta = (None if v is None else jnp.asarray(v) for v in (case["gamma"], case["beta"]))
        groups = None if case["instance"] else case["groups"]
        _grouped_reference(case, gamma, beta, case["zero_centered"], groups)(y)

    check_outcome(run, case["statuses"], _expected_shape(case), _expected_dtype(case), check)


BN_ONLY = ["training", "momentum"]


@st.composite
def batch_cases(draw):
    """Arguments for functional.batch_norm (channel on axis -1 or 1 of x, batch included)."""
    pick = Picker(
        draw,
        [*COMMON, "channel_axis", "running_mean", "running_var", "gamma", "beta", *BN_ONLY],
    )
    statuses = {}
    channel_axis, statuses["channel_axis"] = pick.pick(
        "channel_axis", tagged(*_pairs([-1, 1], OK), *_pairs([5, "a", None, 1.5], BAD))
    )
    channels = draw(st.sampled_from([2, 3]))
    shape = (draw(st.sampled_from([2, 4])), 3, channels)
    if channel_axis == 1:
        shape = (shape[0], channels, 3)
    x_kind = pick.kind("x", ["match"], ["not array"])
    if x_kind == "not array":
        x, statuses["x"] = draw(st.sampled_from(NOT_ARRAYS))
        x_dtype = None
    else:
        x, statuses["x"], x_dtype = make_x(pick, shape, OK)
    case = dict(x=x, x_dtype=x_dtype, channel_axis=channel_axis, channels=channels)
    for argument, fill in (("running_mean", 0.1), ("running_var", 1.5)):
        case[argument], statuses[argument] = pick.pick(
            argument,
            tagged(
                (np.full(channels, fill, np.float32), OK),
                (np.full(channels + 1, fill, np.float32), BAD),
                (np.full(channels, 1, np.int32), BAD),
                (None, BAD),
                ("stat", BAD),
            ),
        )
    for argument in ("gamma", "beta"):
        case[argument], statuses[argument] = pick.pick(
            argument,
            tagged(
                (None, OK),
                (np.linspace(0.5, 1.5, channels), OK),
                (np.ones(channels + 1, np.float32), BAD),
            ),
        )
    case["training"], statuses["training"] = pick.pick(
        "training", tagged(*_pairs([True, False], OK), *_pairs([None, "yes", 1], BAD))
    )
    case["momentum"], statuses["momentum"] = pick.pick(
        "momentum",
        tagged(*_pairs([0.9, 0.0, 1], OK), *_pairs([-0.1, 1.5, float("nan"), "0.9"], BAD)),
    )
    case["epsilon"], statuses["epsilon"] = pick.pick("epsilon", EPSILONS)
    case["dtype"], statuses["dtype"] = pick.pick("dtype", DTYPES)
    x_shape = np.shape(x) if x_dtype is not None else ()
    case["mask"], statuses["mask"] = draw_mask(pick, x_shape)
    case["zero_centered"], statuses["zero_centered_scale"] = pick.pick("zero_centered_scale", FLAGS)
    case["statuses"] = statuses
    return case


def _fuzz_batch_norm(case):
    out = {}

    def run():
        y, mean, var = functional.batch_norm(
            case["x"],
            case["running_mean"],
            case["running_var"],
            case["gamma"],
            case["beta"],
            training=case["training"],
            momentum=case["momentum"],
            epsilon=case["epsilon"],
            channel_axis=case["channel_axis"],
            mask=case["mask"],
            zero_centered_scale=case["zero_centered"],
            dtype=case["dtype"],
        )
        out["stats"] = (mean, var)
        return y

    def check(y):
        x = np.asarray(jnp.asarray(case["x"]).astype(jnp.float32), np.float64)
        x = np.moveaxis(x, case["channel_axis"], -1)  # channels last for the reference
        mask = case["mask"]
        keep = (
            None
            if mask is None
            else np.moveaxis(np.broadcast_to(mask, y.shape), case["channel_axis"], -1)
        )
        axes = (0, 1)
        if case["training"]:
            want = reference.standardize(x, axes, float(case["epsilon"]), keep)
        else:
            want = (x - case["running_mean"]) / np.sqrt(case["running_var"] + case["epsilon"])
            want = want if keep is None else np.where(keep, want, 0.0)
        gamma, beta = case["gamma"], case["beta"]
        if gamma is not None:
            want = want * (1 + gamma if case["zero_centered"] else gamma)
        if beta is not None:
            want = want + beta
        close_to(
            y, np.moveaxis(want, -1, case["channel_axis"]), [jnp.asarray(case["x"]).dtype, y.dtype]
        )
        mean, var = out["stats"]
        if case["training"] and mask is None:  # running statistics, Bessel-corrected
            n, m = x.shape[0] * x.shape[1], float(case["momentum"])
            want_mean = m * case["running_mean"] + (1 - m) * x.mean(axis=axes)
            want_var = m * case["running_var"] + (1 - m) * x.var(axis=axes) * n / (n - 1)
            close_to(mean, want_mean, [jnp.asarray(case["x"]).dtype])
            close_to(var, want_var, [jnp.asarray(case["x"]).dtype])
        elif not case["training"]:
            np.testing.assert_array_equal(mean, case["running_mean"])
            np.testing.assert_array_equal(var, case["running_var"])

    expected_shape = np.shape(case["x"]) if case["x_dtype"] is not None else None
    check_outcome(run, case["statuses"], expected_shape, _expected_dtype(case), check)


FAMILIES = pytest.mark.parametrize(
    "fuzz",
    [
        (_fuzz_trailing_layers, lambda: trailing_cases(via_layer=True)),
        (_fuzz_trailing_functions, lambda: trailing_cases(via_layer=False)),
        (_fuzz_grouped_layers, lambda: grouped_cases(via_layer=True)),
        (_fuzz_grouped_functions, lambda: grouped_cases(via_layer=False)),
        (_fuzz_batch_norm, batch_cases),
    ],
    ids=["LayerNorm/RMSNorm", "layer_norm/rms_norm", "GroupNorm/InstanceNorm", "group_norm", "bn"],
)


def _run_fuzz(fuzz, examples, record_property):
    # a fresh @given test per run: hypothesis refuses to apply settings twice to one test
    check, cases = fuzz
    COUNTS.clear()
    settings(SETTINGS, max_examples=examples)(given(cases())(check))()
    print(f"\n{check.__name__}: {COUNTS['ok']} returned, {COUNTS['error']} raised our error")
    record_property("examples_ok", COUNTS["ok"])
    record_property("examples_error", COUNTS["error"])
    assert COUNTS["ok"] + COUNTS["error"] == examples, dict(COUNTS)
    # Both outcomes exercised: a table that only ever fails (or never) checks little.
    assert COUNTS["ok"] >= examples // 10 and COUNTS["error"] >= examples // 10, dict(COUNTS)


@FAMILIES
def test_fuzzed_arguments_give_our_errors_or_right_outputs(fuzz, record_property):
    _run_fuzz(fuzz, QUICK, record_property)


@pytest.mark.slow
@FAMILIES
def test_fuzzed_arguments_long_run(fuzz, record_property):
    _run_fuzz(fuzz, LONG, record_property)


# ------------------------------------------------------------------------------ load_leaves

LOAD_MESSAGE = r"^load_leaves: .*`\[\d\]\.(gamma|beta)`"


def _saved(model):
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, model)
    return buffer.getvalue()


def _data_regions(data):
    """The byte ranges of each array's data (after its header) in a saved file."""
    stream, regions = io.BytesIO(data), []
    while stream.tell() < len(data):
        start = stream.tell()
        version = np.lib.format.read_magic(stream)
        fmt = np.lib.format
        (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(stream)
        header_end = stream.tell()
        stream.seek(start)
        np.load(stream)
        regions.append(range(header_end, stream.tell()))
    return regions


MODEL = [eqx_norm.LayerNorm(8), eqx_norm.GroupNorm(2, 4)]


def test_load_leaves_truncated_at_every_byte_is_our_error(tmp_path):
    data = _saved(MODEL)
    for end in range(len(data)):
        with pytest.raises(ValueError, match=LOAD_MESSAGE):
            eqx_norm.load_leaves(io.BytesIO(data[:end]), MODEL)
    path = tmp_path / "model.eqx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"ends before the template's leaf `\[\d\]\.\w+`"):
        eqx_norm.load_leaves(path, MODEL)
    COUNTS["truncated"] += len(data) + 1
    print(f"\nload_leaves: {len(data) + 1} truncated files, each our ValueError")


@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7)), min_size=1, max_size=4))
def _fuzz_flipped_bits(flips):
    data = _saved(MODEL)
    damaged = bytearray(data)
    positions = set()
    for where, bit in flips:
        damaged[where % len(data)] ^= 1 << bit
        positions.add(where % len(data))
    positions = {p for p in positions if damaged[p] != data[p]}  # a bit flipped twice
    regions = _data_regions(data)
    in_data = all(any(p in r for r in regions) for p in positions)
    try:
        loaded = eqx_norm.load_leaves(io.BytesIO(bytes(damaged)), MODEL)
    except ValueError as error:
        assert re.search(LOAD_MESSAGE, str(error)), str(error)
        assert not in_data, f"only data bytes changed, yet: {error}"
        COUNTS["error"] += 1
        return
    # No checksum in the format: a changed data byte loads as a changed value, and nothing
    # else may change: every leaf keeps the template's shape and dtype, and the loaded bytes
    # differ from the saved ones only at the flipped positions.
    leaves = jax.tree_util.tree_leaves(loaded)
    for leaf, want, region in zip(leaves, jax.tree_util.tree_leaves(MODEL), regions, strict=True):
        assert leaf.shape == want.shape and leaf.dtype == want.dtype
        got = np.frombuffer(np.asarray(leaf).tobytes(), np.uint8)
        saved = np.frombuffer(data[region.start : region.stop], np.uint8)
        changed = {region.start + int(i) for i in np.flatnonzero(got != saved)}
        assert changed <= positions
    COUNTS["ok"] += 1


def test_load_leaves_flipped_bits_are_our_error_or_only_those_values():
    COUNTS.clear()
    settings(SETTINGS, max_examples=200)(_fuzz_flipped_bits)()
    print(f"\nload_leaves flipped bits: {COUNTS['error']} our error, {COUNTS['ok']} loaded")
    assert COUNTS["error"] >= 20 and COUNTS["ok"] >= 20, dict(COUNTS)


UNPICKLED = []


def _record(tag):
    UNPICKLED.append(tag)


class _Evil:
    """Unpickling it calls ``_record``: proof that the loader ran pickle."""

    def __reduce__(self):
        return (_record, ("unpickled",))


@pytest.mark.parametrize("how", ["object array", "raw pickle"])
def test_load_leaves_never_unpickles(how):
    buffer = io.BytesIO()
    if how == "object array":
        np.save(buffer, np.array([_Evil()] * 8, dtype=object), allow_pickle=True)
    else:
        pickle.dump(_Evil(), buffer)
    data = buffer.getvalue() + _saved(MODEL)[len(_saved(eqx_norm.LayerNorm(8).gamma)) :]
    with pytest.raises(ValueError, match=r"pickled data .*`\[0\]\.gamma`.* never unpickles"):
        eqx_norm.load_leaves(io.BytesIO(data), MODEL)
    assert UNPICKLED == []
    pickle.loads(pickle.dumps(_Evil()))  # the probe works: unpickling does record
    assert UNPICKLED == ["unpickled"]
    UNPICKLED.clear()


CONFIGS = st.tuples(
    st.sampled_from([4, 8, (2, 4)]),
    st.booleans(),
    st.booleans(),
    st.sampled_from([jnp.float32, jnp.bfloat16]),
)


@given(CONFIGS, CONFIGS)
def _fuzz_mismatched_templates(saved, like):
    def build(config):
        shape, use_scale, use_bias, param_dtype = config
        return eqx_norm.LayerNorm(
            shape, use_scale=use_scale, use_bias=use_bias, param_dtype=param_dtype
        )

    saved_model, template = build(saved), build(like)
    data = _saved(saved_model)
    same_leaves = [(a.shape, a.dtype) for a in jax.tree_util.tree_leaves(saved_model)] == [
        (a.shape, a.dtype) for a in jax.tree_util.tree_leaves(template)
    ]
    try:
        loaded = eqx_norm.load_leaves(io.BytesIO(data), template)
    except ValueError as error:
        assert str(error).startswith("load_leaves: "), str(error)
        assert not same_leaves
        COUNTS["error"] += 1
        return
    assert same_leaves
    for a, b in zip(
        jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(saved_model), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    COUNTS["ok"] += 1


def test_load_leaves_mismatched_templates():
    COUNTS.clear()
    settings(SETTINGS, max_examples=100)(_fuzz_mismatched_templates)()
    print(f"\nload_leaves templates: {COUNTS['error']} our error, {COUNTS['ok']} loaded")
    assert COUNTS["error"] >= 10 and COUNTS["ok"] >= 10, dict(COUNTS)
