"""Test-wide settings: strict dtype promotion and rank promotion that raises, as equinox's
own suite uses; the library broadcasts explicitly, so users with these settings can use it."""

import jax
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def x64():
    """Run the test body with float64 enabled in JAX."""
    with jax.enable_x64(True):
        yield
