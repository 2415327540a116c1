"""Every touch of JAX beyond its public API, in one guarded place.

The kernels are JAX primitives (``jax.extend.core.Primitive``) so that forward mode,
``vmap``, reverse mode and sharded ``jit`` all reach the compiled code. Defining one needs
the rule registries of ``jax.interpreters.{ad, batching, mlir}``, and two facts of a
lowering that JAX passes only in its context object: whether the module is lowered for
``jax.export`` (then the ``jnp`` formula is lowered, so exported artifacts hold no custom
call), and the device assignment (a multi-device ``jit`` runs the kernel through
``custom_partitioning``, which reads it only for primitives in JAX's private
``prim_requires_devices_during_lowering``). Under ``shard_map`` an output must vary over
the mesh axes its operands vary over, read from the abstract value.

If any of this is missing in the installed JAX, :func:`missing_hooks` says which, the
binding registers nothing, and every call takes the pure-JAX path: ``import eqx_norm``
never fails because of the kernel.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from jax.extend.core import Primitive

try:
    from jax._src import dispatch as _dispatch
    from jax.interpreters import ad as _ad
    from jax.interpreters import batching as _batching
    from jax.interpreters import mlir as _mlir

    _REQUIRES_DEVICES = _dispatch.prim_requires_devices_during_lowering
    Zero = _ad.Zero
    _registries = (_ad.primitive_jvps, _ad.primitive_transposes, _batching.primitive_batchers)
    _lower_fun, _register_lowering = _mlir.lower_fun, _mlir.register_lowering
    _MISSING = None
except (ImportError, AttributeError) as error:  # a JAX that moved an internal
    Zero = type(None)
    _MISSING = f"JAX {jax.__version__} lacks a hook the kernel binding needs ({error})"


def missing_hooks() -> str | None:
    """None when every hook is there, else which one is missing."""
    return _MISSING


def varying(a: Any) -> frozenset:
    """The ``shard_map`` mesh axes ``a`` (a value or an abstract value) varies over."""
    aval = a if isinstance(a, jax.core.AbstractValue) else jax.typeof(a)
    return frozenset(getattr(getattr(aval, "mat", None), "varying", ()))


def output_aval(shape: tuple[int, ...], dtype: Any, operands: tuple) -> Any:
    """An output's abstract value; under ``shard_map`` it varies as its first operand."""
    first = operands[0]
    if not varying(first):
        return jax.core.ShapedArray(shape, dtype)
    sharding = jax.sharding.NamedSharding(
        first.sharding.mesh, jax.sharding.PartitionSpec(*(None for _ in shape))
    )
    return first.update(shape=shape, dtype=dtype, weak_type=False, sharding=sharding)


def bind(primitive: Primitive, *args: Any, **params: Any) -> Any:
    """``primitive.bind`` with every operand cast to vary over the same ``shard_map`` axes,
    as JAX's own primitives do (so that, transposed, a shared operand's cotangent is
    psummed)."""
    axes = frozenset().union(*(varying(a) for a in args))
    if axes:
        args = tuple(
            jax.lax.pcast(a, tuple(sorted(axes - varying(a))), to="varying")
            if axes - varying(a)
            else a
            for a in args
        )
    return primitive.bind(*args, **params)


def lowering_facts(ctx: Any) -> tuple[bool, int]:
    """``(for_export, number of devices)`` of the lowering ``ctx`` belongs to."""
    parameters = ctx.module_context.lowering_parameters
    devices = getattr(ctx.module_context.axis_context, "device_assignment", None)
    return bool(getattr(parameters, "for_export", False)), len(devices or ())


def define_primitive(
    name: str,
    *,
    abstract_eval: Callable,
    reference: Callable,
    lowering: Callable,
    jvp: Callable,
    batch: Callable,
    transpose: Callable | None = None,
) -> Primitive:
    """A multiple-results primitive with its rules, registered unless hooks are missing.

    ``reference(*args, **params)`` is the ``jnp`` formula: it lowers the primitive on every
    platform but the CPU. On the CPU, ``lowering(for_export, devices, **params)`` returns
    the function to lower (the kernel call, or ``reference`` where the kernel may not run).
    """
    primitive = Primitive(name)
    primitive.multiple_results = True

    @functools.cache
    def compiled(params: tuple) -> Callable:
        return jax.jit(lambda *args: primitive.bind(*args, **dict(params)))

    primitive.def_impl(lambda *args, **params: compiled(tuple(sorted(params.items())))(*args))
    primitive.def_abstract_eval(abstract_eval)
    if _MISSING is not None:
        return primitive

    def any_platform(ctx, *args, **params):
        fn = functools.partial(reference, **params)
        return _lower_fun(fn, multiple_results=True)(ctx, *args)

    def cpu(ctx, *args, **params):
        fn = lowering(*lowering_facts(ctx), **params)
        return _lower_fun(fn, multiple_results=True)(ctx, *args)

    _register_lowering(primitive, any_platform)
    _register_lowering(primitive, cpu, platform="cpu")
    jvps, transposes, batchers = _registries
    jvps[primitive] = jvp
    batchers[primitive] = batch
    if transpose is not None:
        transposes[primitive] = transpose
    _REQUIRES_DEVICES.add(primitive)  # custom_partitioning inside needs the devices
    return primitive
