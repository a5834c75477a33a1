"""benchmarks/bench_step.py: one method measured in a subprocess, and the ratio table."""

import json
import subprocess
import sys

from benchmarks.bench_step import PARTS, table
from tests.conftest import REPO, SMOKE


def test_one_method_breakdown():
    done = subprocess.run(
        [sys.executable, "benchmarks/bench_step.py", "--config", SMOKE, "--crop", "32", "--steps", "2",
         "--warmup", "1", "--workers", "0", "--threads", "1", "--methods", "cutmix", "--one", "cutmix"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert result["method"] == "cutmix" and result["peak_memory_mib"] > 0
    # A mean-teacher step runs the teacher and the mixing; it has no ReCo loss.
    assert result["teacher"] > 0 and result["mix+aug"] > 0 and result["reco"] == 0
    assert result["step_s"] >= result["teacher"] + result["mix+aug"] + result["data"]
    assert result["images_per_s"] == 16 / result["step_s"]


def test_table_ratios_to_supervised():
    rows = [
        {"method": "supervised", "step_s": 0.1, "images_per_s": 80.0, **dict.fromkeys(PARTS, 0.02),
         "peak_memory_mib": 100.0},
        {"method": "reco", "step_s": 0.25, "images_per_s": 64.0, **dict.fromkeys(PARTS, 0.05),
         "peak_memory_mib": 150.0},
    ]
    text = table(rows)
    assert "| reco | 250.0 | 2.5 | 64.0 |" in text
    assert "| supervised | 100.0 | 1.0 |" in text
