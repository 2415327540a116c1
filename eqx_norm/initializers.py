"""Initializer factories for the learnable parameters of every eqx_norm layer.

Each initializer is a small immutable object called as ``init(key, shape, dtype)``,
the protocol of :mod:`jax.nn.initializers`, so ours can be passed wherever JAX, Flax
or Equinox code expects an initializer, and theirs wherever eqx_norm expects one.
Deterministic initializers ignore the key; random ones require it.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from eqx_norm.initializers import OneInit, Normal
    >>> OneInit(2.0)(None, (3,), jnp.float32)
    Array([2., 2., 2.], dtype=float32)
    >>> Normal(stddev=0.02)(jax.random.key(0), (2, 2)).shape
    (2, 2)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PRNGKeyArray

__all__ = [
    "Constant",
    "Initializer",
    "Normal",
    "OneInit",
    "TruncatedNormal",
    "Uniform",
    "ZeroInit",
]

Shape = int | Sequence[int]
DTypeLike = Any


def _finite_real(value: Any, argument: str, owner: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{owner}: `{argument}` must be a real number, got {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"{owner}: `{argument}` must be finite, got {value!r}.")
    return float(value)


class Initializer:
    """Base class: ``init(key, shape, dtype=float32) -> Array``.

    Subclasses are frozen dataclasses. ``requires_key`` says whether the key is used.
    """

    requires_key: ClassVar[bool] = False

    def __call__(
        self, key: PRNGKeyArray | None, shape: Shape, dtype: DTypeLike = jnp.float32
    ) -> Array:
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if self.requires_key and key is None:
            raise ValueError(
                f"{self!r} is a random initializer and needs a PRNG key, got key=None. "
                "Pass one, e.g. `key=jax.random.key(0)`."
            )
        return self._generate(key, shape, jnp.dtype(dtype))

    def _generate(self, key: PRNGKeyArray | None, shape: tuple[int, ...], dtype: Any) -> Array:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Constant(Initializer):
    """Every element equal to ``value``.

    Example:
        >>> Constant(0.5)(None, (2,))
        Array([0.5, 0.5], dtype=float32)
    """

    value: float

    def __post_init__(self) -> None:
        _finite_real(self.value, "value", type(self).__name__)

    def _generate(self, key, shape, dtype):
        return jnp.full(shape, self.value, dtype)


@dataclasses.dataclass(frozen=True)
class ZeroInit(Initializer):
    """All zeros: the default for ``beta``.

    Example:
        >>> ZeroInit()(None, (2,))
        Array([0., 0.], dtype=float32)
    """

    def _generate(self, key, shape, dtype):
        return jnp.zeros(shape, dtype)


@dataclasses.dataclass(frozen=True)
class OneInit(Constant):
    """Every element equal to ``value`` (default 1): the default for ``gamma``.

    Example:
        >>> OneInit()(None, (2,))
        Array([1., 1.], dtype=float32)
    """

    value: float = 1.0


@dataclasses.dataclass(frozen=True)
class Normal(Initializer):
    """Independent samples from ``N(mean, stddev**2)``.

    Example:
        >>> import jax
        >>> Normal(1.0, 0.1)(jax.random.key(0), (4,)).shape
        (4,)
    """

    mean: float = 0.0
    stddev: float = 1.0
    requires_key: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _finite_real(self.mean, "mean", "Normal")
        if _finite_real(self.stddev, "stddev", "Normal") <= 0:
            raise ValueError(f"Normal: `stddev` must be positive, got {self.stddev!r}.")

    def _generate(self, key, shape, dtype):
        return self.mean + self.stddev * jax.random.normal(key, shape, dtype)


@dataclasses.dataclass(frozen=True)
class Uniform(Initializer):
    """Independent samples from ``U[minval, maxval)``.

    Example:
        >>> import jax
        >>> Uniform(-1.0, 1.0)(jax.random.key(0), (4,)).shape
        (4,)
    """

    minval: float = 0.0
    maxval: float = 1.0
    requires_key: ClassVar[bool] = True

    def __post_init__(self) -> None:
        low = _finite_real(self.minval, "minval", "Uniform")
        high = _finite_real(self.maxval, "maxval", "Uniform")
        if not low < high:
            raise ValueError(
                f"Uniform: `minval` must be less than `maxval`, got minval={low}, maxval={high}."
            )

    def _generate(self, key, shape, dtype):
        return jax.random.uniform(key, shape, dtype, self.minval, self.maxval)


@dataclasses.dataclass(frozen=True)
class TruncatedNormal(Initializer):
    """``mean + stddev * z`` with ``z`` a standard normal truncated to ``[lower, upper]``.

    Example:
        >>> import jax
        >>> TruncatedNormal(stddev=0.02)(jax.random.key(0), (4,)).shape
        (4,)
    """

    mean: float = 0.0
    stddev: float = 1.0
    lower: float = -2.0
    upper: float = 2.0
    requires_key: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _finite_real(self.mean, "mean", "TruncatedNormal")
        if _finite_real(self.stddev, "stddev", "TruncatedNormal") <= 0:
            raise ValueError(f"TruncatedNormal: `stddev` must be positive, got {self.stddev!r}.")
        low = _finite_real(self.lower, "lower", "TruncatedNormal")
        high = _finite_real(self.upper, "upper", "TruncatedNormal")
        if not low < high:
            raise ValueError(
                "TruncatedNormal: `lower` must be less than `upper`, "
                f"got lower={low}, upper={high}."
            )

    def _generate(self, key, shape, dtype):
        z = jax.random.truncated_normal(key, self.lower, self.upper, shape, dtype)
        return self.mean + self.stddev * z


InitializerLike = Initializer | type[Initializer] | Callable[..., Any] | Array | np.ndarray

_ACCEPTED = (
    "an initializer instance (e.g. `OneInit(2.0)`), an initializer class whose arguments all "
    "have defaults (e.g. `ZeroInit`), a callable `(key, shape, dtype) -> Array` (e.g. "
    "`jax.nn.initializers.ones`), or an array of shape {shape}"
)


def _check_real(dtype: np.dtype, given: str) -> None:
    """A TypeError unless ``dtype`` is real (integer or floating): casting a complex, boolean
    or string array to the parameter dtype would drop or invent values."""
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(f"{given}; a parameter's initial values must be real numbers.")


def constant_value(initializer: Any) -> float | None:
    """The value every element of ``initializer`` takes, if it is a constant initializer
    (an instance, or a class with default arguments, of :class:`ZeroInit`,
    :class:`OneInit` or :class:`Constant`); None for any other."""
    if isinstance(initializer, type) and issubclass(initializer, (ZeroInit, OneInit)):
        initializer = initializer()
    if isinstance(initializer, ZeroInit):
        return 0.0
    if isinstance(initializer, Constant):
        return float(initializer.value)
    return None


def make_parameter(
    initializer: InitializerLike,
    *,
    argument: str,
    key: PRNGKeyArray | None,
    shape: tuple[int, ...],
    dtype: DTypeLike,
) -> Array:
    """Build one parameter array of exactly ``shape`` and ``dtype`` from ``initializer``.

    ``argument`` names the constructor argument in error messages.
    """
    accepted = _ACCEPTED.format(shape=shape)
    if isinstance(initializer, (jax.Array, np.ndarray)):
        if initializer.shape != shape:
            raise ValueError(
                f"`{argument}` is an array of shape {initializer.shape}, but the parameter has "
                f"shape {shape}; arrays are never broadcast, pass one of shape {shape}."
            )
        _check_real(initializer.dtype, f"`{argument}` is an array of dtype {initializer.dtype}")
        return jnp.asarray(initializer, dtype=dtype)
    if isinstance(initializer, type):
        if not issubclass(initializer, Initializer):
            raise TypeError(f"`{argument}` must be {accepted}; got the class {initializer!r}.")
        try:
            initializer = initializer()
        except TypeError as err:
            raise TypeError(
                f"`{argument}`: the class {initializer.__name__} needs arguments ({err}); "
                f"pass an instance instead, e.g. `{initializer.__name__}(...)`."
            ) from None
    if not callable(initializer):
        hint = ""
        if isinstance(initializer, (int, float, np.number)) and not isinstance(initializer, bool):
            hint = f" For a constant, pass `Constant({initializer!r})`."
        raise TypeError(f"`{argument}` must be {accepted}; got {initializer!r}.{hint}")
    if isinstance(initializer, Initializer):
        if initializer.requires_key and key is None:
            raise ValueError(
                f"`{argument}`={initializer!r} is random and needs a PRNG key, got key=None. "
                "Pass `key=jax.random.key(...)` to the layer."
            )
        value = initializer(key, shape, dtype)
    else:
        try:
            value = initializer(key, shape, dtype)
        except Exception as err:
            if key is not None:
                raise
            raise ValueError(
                f"`{argument}`={initializer!r} failed when called with key=None ({err!r}). "
                "If it is a random initializer, pass `key=jax.random.key(...)` to the layer."
            ) from err
    returned = f"`{argument}`={initializer!r} returned"
    try:
        value = jnp.asarray(value)
    except (TypeError, ValueError):
        raise TypeError(f"{returned} {value!r:.80}, not an array of shape {shape}.") from None
    _check_real(value.dtype, f"{returned} an array of dtype {value.dtype}")
    if value.shape != shape:
        raise ValueError(
            f"`{argument}`={initializer!r} returned an array of shape {value.shape}, expected "
            f"shape {shape}: an initializer must honour the `shape` it is called with."
        )
    return value.astype(dtype)
