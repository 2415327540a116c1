"""`python benchmarks/run.py --quick` runs and writes a well-formed report (no speed asserts)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # long: the quick loop (-m "not slow") skips it

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_writes_json_and_markdown(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    markdown = (tmp_path / "results.md").read_text()
    assert markdown in result.stdout  # the table is printed, too

    assert set(report["allocators"]) == {"default", "fault-free"}
    for allocator, data in report["allocators"].items():
        assert f"## Allocator: {allocator}" in markdown
        assert data["cases"], allocator
        for case in data["cases"]:
            names = {t["impl"] for t in case["timings"]}
            assert {"eqx_norm", "torch", "copy: jit x+1", "copy: np.add(out=)"} <= names
            if case["family"] in ("layer_norm", "rms_norm"):  # both implementations timed
                assert "eqx_norm (xla)" in names, names
            for timing in case["timings"]:
                assert 0 < timing["p25_ms"] <= timing["median_ms"] <= timing["p75_ms"]
            ours = case["compiled"]["eqx_norm"]
            assert ours["temp_bytes"] >= 0 and ours["compile_s"] > 0
            assert f"| {case['case']} | fwd+bwd |" in markdown

    # the report says which implementation the default eqx_norm row ran
    assert report["machine"]["kernel"] in markdown
    accuracy = report["allocators"]["default"]["accuracy"]
    assert {(row["dtype"], row["impl"]) for row in accuracy} >= {
        ("float32", "eqx_norm"),
        ("float32", "eqx_norm (xla)"),
        ("float32", "torch"),
        ("bfloat16", "torch"),
    }
    for row in accuracy:
        for key in ("y_abs", "dx_rel", "dgamma_rel", "dbeta_rel"):
            assert math.isfinite(row[key]) or row["impl"] == "flax.nnx", row
