"""Transitional: see :mod:`eqx_norm._core`."""

from ._core import is_zero_tangent as is_zero_tangent
