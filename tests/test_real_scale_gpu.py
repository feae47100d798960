"""benchmarks/real_scale_gpu.py --smoke: the GPU accuracy script, end to end on the CPU
(a timm ViT trained from scratch for a few steps, built N = 3, evaluated)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "real_scale_gpu.py"


@pytest.mark.slow
@pytest.mark.fleet
def test_smoke_trains_builds_and_reports(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "real_scale_gpu.json").read_text())
    assert report["smoke"] is True and report["model"] == "deit_tiny_patch16_224"
    assert report["original"]["device"] == "cpu" and report["original"]["epochs"] == 1
    (build,) = report["builds"]
    assert build["N"] == 3
    assert 0.0 <= build["original_accuracy"] <= 1.0 and 0.0 <= build["fused_accuracy"] <= 1.0
    assert build["size_cut"] > 1.0 and build["slowest_submodel_ms"] > 0
    table = (tmp_path / "real_scale_gpu.md").read_text()
    assert "| 3 |" in table and "trained from scratch on 64 Fashion-MNIST images" in table
