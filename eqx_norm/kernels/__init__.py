"""The compiled CPU kernels and their JAX bindings: ``_library`` loads the library built
from ``cpu/`` and registers its FFI targets, ``_binding`` is the one primitive pair,
``rows`` (LayerNorm/RMSNorm, the fused residual) and ``groups`` (GroupNorm/InstanceNorm)
what each kernel adds; the pure-JAX path serves wherever one cannot (``unavailable_reason``).
"""
