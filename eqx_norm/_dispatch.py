"""Which implementation serves a call: the compiled CPU kernel where it can, else XLA.

The families ask :func:`use_kernel` with the reason the kernel cannot serve their call
(None when it can): ``implementation=None`` then takes the kernel where it serves,
``"xla"`` never does, and ``"kernel"`` where it cannot is an error that says why.
"""

from __future__ import annotations

from collections.abc import Hashable

from jaxtyping import Array

from ._checks import DTypeLike


def common_reason(
    x: Array, *, masked: bool, out_dtype: DTypeLike, axis_name: Hashable | None = None
) -> str | None:
    """Why no kernel serves a call, for the reasons every kernel shares; None if none."""
    if masked:
        return "a `mask` is given"
    if axis_name is not None:
        return f"`axis_name`={axis_name!r} is given: the kernel cannot see the other shards"
    if out_dtype != x.dtype:  # the kernel writes x's dtype: a wider output would lose bits
        return f"the output dtype {out_dtype} differs from x's dtype {x.dtype}"
    return None


def use_kernel(implementation: str | None, layer: str, reason: str | None) -> bool:
    """Whether the compiled kernel runs this call, given why it cannot (None: it can)."""
    if implementation == "xla":
        return False
    if reason is None:
        return True
    if implementation == "kernel":
        raise ValueError(
            f"{layer}: implementation='kernel' cannot serve this call: {reason}. Use "
            "implementation=None to run the kernel where it serves and XLA elsewhere."
        )
    return False
