"""Loading saved parameters into a template, with an error whenever they do not fit.

``eqx.tree_serialise_leaves`` writes a model's array leaves one after another, without
their names or the model's configuration, and ``eqx.tree_deserialise_leaves`` reads them
back in the order of a template ``like``. Equinox raises when a leaf changes shape, but
not when the template has fewer leaves than the file: a model saved with two
``LayerNorm(8)`` loaded into ``[LayerNorm(8, use_bias=False), LayerNorm(8)]`` silently gets
the first layer's ``beta`` as the second layer's ``gamma``. :func:`load_leaves` reads the
same files and checks, before reading any leaf, that the file holds as many arrays as the
template has leaves (and otherwise names the layer whose structure differs), then every
leaf's shape and dtype.
"""

from __future__ import annotations

import contextlib
import io
import math
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
        ValueError: the file holds fewer or more arrays than ``like`` has leaves (checked
            first, from the arrays' headers: the message names the layer whose structure
            differs, e.g. the one whose ``beta`` is switched off in ``like`` only), a leaf's
            shape or dtype differs, the file is truncated, or it is damaged where a header
            is (the message names the leaf's path in the model). Loading never unpickles:
            pickled data in the file is this error too. The format has no checksum: a
            changed byte inside an array's data loads as a different value.

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
        arrays = _scan(f)
        mismatch = None if arrays is None else _structure_mismatch(like, arrays)
        if mismatch is not None:
            raise ValueError(mismatch)
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


def _scan(f: BinaryIO) -> list[tuple[tuple[int, ...], np.dtype]] | None:
    """The shape and dtype of each array the file holds from its position on, read from the
    arrays' headers (their data are skipped, and the file is put back where it was).

    ``None`` where the file cannot be scanned (it is not seekable) or does not hold whole
    arrays to its end (a damaged header, pickled data, a truncated array): reading it leaf
    by leaf then says at which leaf.
    """
    if not f.seekable():
        return None
    start = f.tell()
    end = f.seek(0, io.SEEK_END)
    f.seek(start)
    headers = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }
    arrays = []
    try:
        while f.tell() < end:
            read_header = headers.get(np.lib.format.read_magic(f))
            if read_header is None:
                return None
            shape, _, dtype = read_header(f)
            if dtype.hasobject:
                return None
            f.seek(math.prod(shape) * dtype.itemsize, io.SEEK_CUR)
            arrays.append((tuple(shape), dtype))
        return arrays if f.tell() == end else None
    except Exception:  # NumPy raises many types on a damaged header
        return None
    finally:
        f.seek(start)


def _module(paths: list[tuple]) -> str:
    """The deepest subtree of the template that holds the leaves at ``paths``, named."""
    common: tuple = ()
    if paths:
        parents = [path[:-1] for path in paths]
        for keys in zip(*parents):
            if any(key != keys[0] for key in keys):
                break
            common += (keys[0],)
    return f"`{jax.tree_util.keystr(common)}`" if common else "`like`"


def _field(key: Any) -> str:
    return str(getattr(key, "name", getattr(key, "key", getattr(key, "idx", key))))


def _structure_mismatch(like: Any, arrays: list[tuple[tuple[int, ...], np.dtype]]) -> str | None:
    """Why ``like`` does not fit a file holding ``arrays``, naming the subtree whose leaf count
    differs; ``None`` where the counts are equal (each leaf's shape is checked on reading).

    The file has no names, so the extra or missing arrays are placed where the two sequences
    of shapes and dtypes line up: they agree before that place and after it. An extra array
    is put first where the template has a parameter switched off (a ``None`` field, such as
    ``beta`` with ``use_bias=False``): that layer is the one that differs.
    """
    entries = jax.tree_util.tree_flatten_with_path(like, is_leaf=lambda x: x is None)[0]
    stored, template = [], []  # the paths, shapes and dtypes of the leaves read from a file
    switched_off = []  # (how many stored leaves come before it, path) of each None field
    for path, leaf in entries:
        if leaf is None:
            switched_off.append((len(stored), path))
        elif isinstance(leaf, jax.ShapeDtypeStruct) or eqx.is_array_like(leaf):
            stored.append(path)
            template.append(_shape_dtype(leaf))
    n, m = len(template), len(arrays)
    if n == m:
        return None
    same = [a == b for a, b in zip(template, arrays)]
    prefix = same.index(False) if False in same else min(n, m)
    suffix = 0
    while suffix < min(n, m) and template[n - 1 - suffix] == arrays[m - 1 - suffix]:
        suffix += 1
    counts = (
        f"the file holds {m} array{'s' * (m != 1)} where the template has {n} "
        f"lea{'ves' if n != 1 else 'f'}"
    )
    fix = "Build the template with the configuration the model was saved with"

    def differs(paths: list[tuple]) -> str:
        where = _module(paths)
        return f"load_leaves: the template differs from the saved model in {where}: {counts}"

    def extra(gap: int) -> str:  # the extra arrays, where they go in before leaf `gap`
        shapes = ", ".join(f"{shape} {dtype}" for shape, dtype in arrays[gap : gap + m - n])
        if m - n == 1:
            return f"the extra array (of shape and dtype {shapes}) fits"
        return f"the {m - n} extra arrays (of shapes and dtypes {shapes}) fit"

    if m > n:  # the extra arrays go in before the template's leaf i, for each i in `gaps`
        gaps = range(n - suffix, prefix + 1)
        switched_off = [(gap, path) for gap, path in switched_off if gap in gaps]
        if switched_off:
            gap = switched_off[0][0]
            first = [path for at, path in switched_off if at == gap]
            fields = ", ".join(f"`{_field(path[-1])}`" for path in first)
            return (
                f"{differs(first)}, and {extra(gap)} where {_module(first)} has {fields} "
                f"switched off (None). {fix} ({_module(first)} with {fields})."
            )
        if gaps:
            around = stored[max(gaps.start - 1, 0) : gaps.stop]
            return f"{differs(around)}, and {extra(gaps.start)} inside it. {fix}."
    else:  # the template's leaves i to i + n - m are missing, for each i in `gaps`
        gaps = range(m - suffix, prefix + 1)
        if gaps:
            missing = stored[gaps.start : gaps.stop - 1 + n - m]
            names = ", ".join(f"`{jax.tree_util.keystr(path)}`" for path in missing)
            lacks = names if len(missing) == n - m else f"{n - m} of {names}"
            return (
                f"{differs(missing)}, and the file lacks {lacks}. Was the model saved with "
                f"gamma or beta switched off there? {fix}."
            )
    first = stored[min(prefix, n - 1)] if stored else ()
    return (
        f"{differs([first])}, and they differ from the template's leaf "
        f"`{jax.tree_util.keystr(first)}` on. {fix}."
    )
