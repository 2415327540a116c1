"""Passes over memory, counted in the compiled HLO: the CPU proxy for an accelerator's time.

A normalization is bound by memory on a GPU or TPU: its time is about the number of times
it reads and writes an array of ``x``'s size. :func:`memory_passes` compiles a function for
the default backend and counts, in the entry computation (after XLA's fusion, where each
instruction is one kernel that reads its operands from memory and writes its result), the
operands and results of ``x``'s size or larger.

What it shows: how many full-size arrays the compiled program moves, and which of them are
``x`` itself, so that a change that adds a pass (a materialized intermediate, a reduction
that XLA did not fuse) is seen without a timer. What it cannot show:

* what happens inside one fusion: XLA:CPU's YNN fusions run a whole normalization as one
  instruction, whose inner loops may read a row more than once from cache;
* the cost of arithmetic, which on CPU is most of a fused normalization's time;
* another backend's fusion decisions: XLA:GPU fuses differently, so the counts here are a
  proxy, and the timings on a GPU (``benchmarks/gpu_check.py``) are the check.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import jax

# Instructions that move no data: their operands are not read by a kernel of their own.
_FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast"}
_ARRAY = re.compile(r"\w+\[([\d,]*)\]")


class Passes(NamedTuple):
    """Full-size arrays moved by one call: ``reads`` (operands, ``x`` included), ``writes``
    (results), ``reads_of_x`` (the operands that are ``x`` itself) and ``kernels`` (the
    instructions that read or write one)."""

    reads: int
    writes: int
    reads_of_x: int
    kernels: int


def _elements(shape: str) -> list[int]:
    return [math.prod(int(d) for d in dims.split(",") if d) for dims in _ARRAY.findall(shape)]


def _closing(text: str, depth: int = 0) -> int:
    """The index in ``text`` where the parentheses opened before it (``depth``) and in it
    close."""
    for index, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return index
    return len(text)


def _split_instruction(line: str):
    """``(name, shape, opcode, operands)`` of one HLO instruction line, or None."""
    match = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)", line)
    if match is None:
        return None
    name, rest = match.groups()
    if rest.startswith("("):  # a tuple shape: up to its closing parenthesis
        end = _closing(rest)
        shape, rest = rest[: end + 1], rest[end + 1 :].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    opcode, _, rest = rest.partition("(")
    operands = re.findall(r"%([\w.\-]+)", rest[: _closing(rest, 1)])
    return name, shape, opcode.strip(), operands


def count_in_hlo(text: str, size: int) -> Passes:
    """:class:`Passes` of the entry computation of compiled HLO ``text`` for arrays of at
    least ``size`` elements; ``x`` is the entry's parameter 0."""
    entry = text[text.index("\nENTRY") :]
    entry = entry[: entry.index("\n}")]
    shapes, x_names = {}, set()
    reads = writes = reads_of_x = kernels = 0
    for line in entry.splitlines()[1:]:
        parsed = _split_instruction(line)
        if parsed is None:
            continue
        name, shape, opcode, operands = parsed
        shapes[name] = shape
        if opcode == "parameter" and "parameter(0)" in line:
            x_names.add(name)
        if opcode == "bitcast" and operands and operands[0] in x_names:
            x_names.add(name)  # a view of x
        if opcode in _FREE:
            continue
        big_in = [o for o in operands if max(_elements(shapes.get(o, "")), default=0) >= size]
        big_out = [n for n in _elements(shape) if n >= size]
        reads += len(big_in)
        reads_of_x += sum(o in x_names for o in big_in)
        writes += len(big_out)
        kernels += bool(big_in or big_out)
    return Passes(reads, writes, reads_of_x, kernels)


def memory_passes(fn, x, *args) -> Passes:
    """:class:`Passes` of ``jax.jit(fn)(x, *args)`` compiled for the default backend (``x``
    an array or a ``jax.ShapeDtypeStruct``)."""
    text = jax.jit(fn).lower(x, *args).compile().as_text()
    return count_in_hlo(text, math.prod(x.shape))
