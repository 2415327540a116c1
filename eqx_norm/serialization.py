"""Loading saved parameters into a template, with an error whenever they do not fit.

``eqx.tree_serialise_leaves`` writes a model's array leaves one after another, without
their names or the model's configuration, and ``eqx.tree_deserialise_leaves`` reads them
back in the order of a template ``like``. Equinox raises when a leaf changes shape, but
not when the template has fewer leaves than the file: a model saved with two
``LayerNorm(8)`` loaded into ``[LayerNorm(8, use_bias=False), LayerNorm(8)]`` silently gets
the first layer's ``beta`` as the second layer's ``gamma``. :func:`load_leaves` reads the
same files and checks every leaf's shape and dtype and that the file ends where the
template does.
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import Any, BinaryIO, TypeVar

import equinox as eqx
import jax
import numpy as np

__all__ = ["load_leaves"]

T = TypeVar("T")


def _shape_dtype(leaf: Any) -> tuple[tuple[int, ...], np.dtype]:
    dtype = getattr(leaf, "dtype", None)
    return tuple(np.shape(leaf)), np.dtype(dtype if dtype is not None else np.result_type(leaf))


def _describe(leaf: Any) -> str:
    shape, dtype = _shape_dtype(leaf)
    return f"shape {shape} and dtype {dtype}"


def _fix(path: str, expected: Any, loaded: Any) -> str:
    (shape, dtype), (loaded_shape, loaded_dtype) = _shape_dtype(expected), _shape_dtype(loaded)
    if shape == loaded_shape and dtype != loaded_dtype:
        return (
            f" Only the dtype differs: build the template with param_dtype={loaded_dtype.name} "
            "(the dtype the model was saved with), or load it and cast afterwards."
        )
    if path.endswith((".gamma", ".beta")):
        return (
            " A layer's gamma and beta have the shape of its normalized_shape (or its "
            "channels): build the template with the configuration the model was saved with."
        )
    return " Build the template with the configuration the model was saved with."


def load_leaves(path_or_file: str | os.PathLike | BinaryIO, like: T) -> T:
    """Load leaves saved by ``eqx.tree_serialise_leaves`` into ``like``, checking that they fit.

    Reads exactly what ``eqx.tree_deserialise_leaves(path_or_file, like)`` reads and
    returns the same model, but raises instead of returning a wrong one: every array leaf
    must have the template's shape and dtype, and the file must hold exactly as many
    leaves as the template (a ``gamma`` or ``beta`` switched off in the template but
    present in the file, or the reverse, is an error). The configuration (static fields
    such as ``normalized_shape`` and ``epsilon``) is not in the file and comes from ``like``.

    Args:
        path_or_file: a path, or a binary file object positioned where the model starts
            (it is left just after the model's last leaf).
        like: a model of the same structure, e.g. built with the same arguments, or with
            ``eqx.filter_eval_shape`` to skip allocating its arrays.

    Returns:
        ``like`` with its leaves replaced by the saved ones.

    Raises:
        ValueError: a leaf's shape or dtype differs, the file holds fewer or more leaves
            than ``like``, is truncated, or is damaged where a header is (the message names
            the leaf's path in the model). Loading never unpickles: pickled data in the
            file is this error too. The format has no checksum: a changed byte inside an
            array's data loads as a different value.

    Example:
        >>> import io, equinox as eqx
        >>> from eqx_norm import LayerNorm, load_leaves
        >>> buffer = io.BytesIO()
        >>> eqx.tree_serialise_leaves(buffer, LayerNorm(8))
        >>> _ = buffer.seek(0)
        >>> load_leaves(buffer, LayerNorm(8)).gamma.shape
        (8,)
    """
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(like)[0]]
    position = iter(paths)
    problems: list[str] = []  # equinox wraps errors raised in `check`; re-raised plainly below

    def check(f: BinaryIO, leaf: Any) -> Any:
        path = next(position)
        try:
            loaded = eqx.default_deserialise_filter_spec(f, leaf)
        except Exception as error:  # NumPy raises many types on a damaged header
            problems.append(_unreadable(f, path, error))
            raise
        if loaded is not leaf and _shape_dtype(loaded) != _shape_dtype(leaf):
            problems.append(
                f"load_leaves: leaf `{path}` of the template has {_describe(leaf)}, but the "
                f"file holds {_describe(loaded)} there.{_fix(path, leaf, loaded)}"
            )
            raise ValueError(problems[-1])
        return loaded

    with contextlib.ExitStack() as stack:
        if isinstance(path_or_file, (str, os.PathLike)):
            f = stack.enter_context(open(path_or_file, "rb"))
        else:
            f = path_or_file
        try:
            out = eqx.tree_deserialise_leaves(f, like, filter_spec=check)
        except Exception:
            if problems:
                raise ValueError(problems[0]) from None
            raise
        start = f.tell()
        extra = f.read()
    if extra:
        if not isinstance(path_or_file, (str, os.PathLike)) and f.seekable():
            f.seek(start)  # leave the stream where this model's leaves end
        count = _count_arrays(extra)
        raise ValueError(
            f"load_leaves: the file holds {count} more array(s) after the template's "
            f"{len(paths)} leaves: `like` does not match the saved model (e.g. a gamma or "
            "beta switched off in the template but saved in the file). Build the template "
            "with the configuration the model was saved with."
        )
    return out


def _unreadable(f: BinaryIO, path: str, error: Exception) -> str:
    """Why the array at leaf ``path`` could not be read: the file ends, it holds pickled
    data (never unpickled: NumPy's ``allow_pickle=False``), or it is damaged."""
    detail = f"{type(error).__name__}: {error}"
    if "pickle" in str(error):
        return (
            f"load_leaves: the file holds pickled data (or bytes that are not a NumPy array) "
            f"where the template's leaf `{path}` should be ({detail}); load_leaves never "
            "unpickles. The file is damaged or was not written by eqx.tree_serialise_leaves."
        )
    try:
        at_end = f.read(1) == b""
    except (OSError, ValueError):
        at_end = False
    if isinstance(error, EOFError) or at_end:
        return (
            f"load_leaves: the file ends before the template's leaf `{path}` (it holds "
            f"fewer arrays than `like` has leaves, or is truncated; {detail}). Was it saved "
            "from a model with gamma or beta switched off? Build the template with the "
            "configuration the model was saved with."
        )
    return (
        f"load_leaves: the file is damaged at the template's leaf `{path}`: its bytes are not "
        f"a valid NumPy array ({detail}). It was changed after eqx.tree_serialise_leaves "
        "wrote it, or was written by something else."
    )


def _count_arrays(data: bytes) -> str:
    stream, count = io.BytesIO(data), 0
    try:
        while stream.tell() < len(data):
            np.load(stream)
            count += 1
    except (EOFError, ValueError, OSError):
        return "some"
    return str(count)
