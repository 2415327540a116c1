"""The compiled CPU kernels and their JAX bindings.

``_library`` loads the shared library built from ``cpu/`` and registers its FFI targets;
``rows`` binds the LayerNorm/RMSNorm kernel. The pure-JAX path in :mod:`eqx_norm._xla`
serves wherever a kernel cannot (see ``unavailable_reason``).
"""
