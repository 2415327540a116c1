"""Test-wide settings: strict dtype promotion, as equinox's own suite uses."""

import jax
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def x64():
    """Run the test body with float64 enabled in JAX."""
    with jax.enable_x64(True):
        yield
