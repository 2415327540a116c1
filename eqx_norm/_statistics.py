"""Transitional: the kernels' jnp formulas import the statistics from here; they live in
:mod:`eqx_norm._core`."""

from ._core import centered_statistics as centered_statistics
