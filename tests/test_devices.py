"""LayerNorm across 8 simulated CPU devices: pmap, sharded jit, shard_map, training steps.

The checks live in tests/_multidevice_checks.py and run in one pytest subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (helpers.run_on_simulated_devices):
the flag only works if it is set before jax is imported, and this way the rest of the
suite (and each xdist worker) keeps its single device. A failing check is shown here with
the subprocess's pytest report.
"""

from pathlib import Path

import pytest
from helpers import assert_checks_pass_on_simulated_devices

pytestmark = pytest.mark.slow  # long: the quick loop (-m "not slow") skips it

CHECKS = Path(__file__).resolve().parent / "_multidevice_checks.py"


def test_layer_norm_on_eight_devices():
    # ~15 s on 2 busy cores; the timeout only stops a hang
    assert_checks_pass_on_simulated_devices(CHECKS, devices=8, timeout=300)
