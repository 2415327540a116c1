"""LayerNorm across 8 simulated CPU devices: pmap, sharded jit, shard_map, training steps.

The checks live in tests/_multidevice_checks.py and run in one pytest subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``: the flag only works if it is set
before jax is imported, and this way the rest of the suite (and each xdist worker) keeps
its single device. A failing check is shown here with the subprocess's pytest report.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # long: the quick loop (-m "not slow") skips it

TESTS = Path(__file__).resolve().parent
CHECKS = TESTS / "_multidevice_checks.py"


def test_layer_norm_on_eight_devices():
    flags = [
        f
        for f in os.environ.get("XLA_FLAGS", "").split()
        if "xla_force_host_platform_device_count" not in f
    ]
    env = dict(
        os.environ,
        XLA_FLAGS=" ".join([*flags, "--xla_force_host_platform_device_count=8"]),
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]),
    )
    command = [sys.executable, "-m", "pytest", "-q", "-rA", str(CHECKS)]
    result = subprocess.run(
        [*command, "-p", "no:cacheprovider", "-p", "no:xdist"],
        env=env,
        cwd=TESTS.parent,
        capture_output=True,
        text=True,
        timeout=180,  # ~15 s on 2 busy cores; this only stops a hang
    )
    report = result.stdout[-8000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    # every check ran and passed: nothing skipped (a skip means the 8 devices were missing)
    checks = len(re.findall(r"^def test_", CHECKS.read_text(), flags=re.MULTILINE))
    parametrized = len(re.findall(r"^PASSED ", result.stdout, flags=re.MULTILINE))
    assert parametrized >= checks > 0, report
    assert re.fullmatch(
        rf"{parametrized} passed in [\d.]+s( \(.*\))?", result.stdout.splitlines()[-1]
    ), report
