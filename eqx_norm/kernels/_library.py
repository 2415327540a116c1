"""Load the compiled CPU library once, register its FFI targets, and say why it cannot serve.

The library (built by CMake from ``cpu/`` into ``cpu/`` at install time: a data folder, not
a module) is opened with :mod:`ctypes`; each handler symbol is registered with
:func:`jax.ffi.register_ffi_target` under its target name. The library reports which
element types it was compiled for (``EqxNormDtypes``), so a build without ``_Float16``
leaves float16 to the XLA path instead of failing at run time.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from ._binding import MISSING

LIBRARY = {"win32": "eqx_norm_cpu.dll", "darwin": "libeqx_norm_cpu.dylib"}.get(
    sys.platform, "libeqx_norm_cpu.so"
)
# FFI target name -> exported handler symbol: eqx_norm_rows_forward -> EqxNormRowsForward
TARGETS = {
    f"eqx_norm_{kernel}_{way}": f"EqxNorm{kernel.title()}{way.title()}"
    for kernel in ("rows", "residual", "groups", "columns")
    for way in ("forward", "backward")
}
TARGETS["eqx_norm_columns_normalize"] = "EqxNormColumnsNormalize"  # BatchNorm's y
# bits of EqxNormDtypes()
_DTYPE_BITS = {1: jnp.dtype(jnp.float32), 2: jnp.dtype(jnp.bfloat16), 4: jnp.dtype(jnp.float16)}


def _folders() -> list[Path]:
    """Where the built library may lie: ``cpu/`` beside this file, in each package path
    (an editable install keeps the build beside the installed copy)."""
    package = sys.modules[__package__]
    paths = [Path(p) for p in getattr(package, "__path__", [])] + [Path(__file__).parent]
    return [p / "cpu" for p in dict.fromkeys(paths)]


@functools.cache
def load() -> tuple[str | None, frozenset]:
    """Load and register once: ``(None, dtypes)`` on success, else ``(reason, ())``."""
    path = next((f / LIBRARY for f in _folders() if (f / LIBRARY).is_file()), None)
    if path is None:
        return (
            "the eqx_norm CPU kernel was not built (installed with EQX_NORM_KERNEL=OFF, or "
            f"no {LIBRARY} in eqx_norm/kernels/cpu/)"
        ), frozenset()
    try:
        library = ctypes.cdll.LoadLibrary(str(path))
        library.EqxNormDtypes.restype = ctypes.c_int
        bits = library.EqxNormDtypes()
        for target, symbol in TARGETS.items():
            handler = jax.ffi.pycapsule(getattr(library, symbol))
            jax.ffi.register_ffi_target(target, handler, platform="cpu")
    except (OSError, AttributeError) as error:
        return f"the eqx_norm CPU kernel failed to load from {path}: {error}", frozenset()
    return None, frozenset(dtype for bit, dtype in _DTYPE_BITS.items() if bits & bit)


def unavailable_reason(x: jax.Array | jax.ShapeDtypeStruct) -> str | None:
    """None when the kernel can serve ``x``, else a short reason why it cannot.

    It serves an ``x`` of a dtype the library was built for (float32, bfloat16 and, where
    the compiler has ``_Float16``, float16) that lives on the CPU (a traced ``x``: when
    JAX's default backend is the CPU), once the library is loaded and JAX offers every
    public hook the binding needs (else :data:`eqx_norm.kernels._binding.MISSING`).
    """
    reason, dtypes = load()
    reason = MISSING or reason
    if reason is not None:
        return reason
    dtype = jnp.dtype(x.dtype)
    if dtype not in dtypes:
        built = ", ".join(sorted(str(d) for d in dtypes))
        return f"dtype {dtype} is not served by the kernel (built for {built})"
    platforms = None
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        platforms = {device.platform for device in x.devices()}
    elif getattr(x, "sharding", None) is not None:
        platforms = {device.platform for device in x.sharding.device_set}
    if not platforms:
        platforms = {jax.default_backend()}
    if platforms != {"cpu"}:
        return f"the kernel runs on CPU only, x is on {', '.join(sorted(platforms))}"
    return None


def served(reason: str | None) -> None:
    """Raise with ``reason`` unless it is None: a kernel called where it cannot serve."""
    if reason is not None:
        raise ValueError(f"the eqx_norm CPU kernel cannot serve this call: {reason}")
