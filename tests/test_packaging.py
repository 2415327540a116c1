"""The package is built by the book: one version, typed, a py3 wheel with the kernel in it.

* ``eqx_norm.__version__`` is the installed distribution's version, which is
  pyproject.toml's (an editable install older than pyproject.toml fails here: reinstall);
* ``py.typed`` marks the package as typed (PEP 561), so type checkers read its annotations;
* the wheel (slow: it compiles the kernel) is tagged ``py3-none-<platform>`` (the kernel
  library links no libpython, so one wheel serves every CPython 3) and holds ``py.typed``
  and the library under ``eqx_norm/kernels/cpu/``, without the C++ sources and headers.
"""

import importlib.metadata
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import eqx_norm

REPO = Path(__file__).resolve().parents[1]


def _pyproject_version() -> str:
    project = REPO.joinpath("pyproject.toml").read_text().split("[project]", 1)[1]
    return re.search(r'^version = "([^"]+)"', project, re.MULTILINE)[1]


def test_one_version():
    assert eqx_norm.__version__ == importlib.metadata.version("eqx_norm")
    assert eqx_norm.__version__ == _pyproject_version(), (
        "the installed metadata is older than pyproject.toml: reinstall "
        "(pip install -e . --no-deps --no-build-isolation)"
    )


def test_typed():
    assert Path(eqx_norm.__file__).with_name("py.typed").is_file()


@pytest.mark.slow  # compiles the kernel
def test_wheel(tmp_path):
    command = [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps"]
    command += ["--no-build-isolation", "-w", str(tmp_path / "dist")]
    command += ["-C", f"build-dir={tmp_path / 'build'}"]  # not the repository's build/
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    version = _pyproject_version()
    assert re.fullmatch(rf"eqx_norm-{re.escape(version)}-py3-none-[\w.]+\.whl", wheel.name)
    names = zipfile.ZipFile(wheel).namelist()
    assert "eqx_norm/py.typed" in names
    assert any(re.fullmatch(r"eqx_norm/kernels/cpu/[^/]*eqx_norm_cpu[^/]*", n) for n in names)
    assert not [n for n in names if n.endswith((".cc", ".h"))]
    assert (
        "Tag: py3-none-"
        in zipfile.ZipFile(wheel).read(f"eqx_norm-{version}.dist-info/WHEEL").decode()
    )
