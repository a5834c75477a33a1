"""benchmarks/bench_step.py: one method measured in a subprocess, and the ratio table."""

import json
import subprocess
import sys

from benchmarks.bench_step import PARTS, floors, table
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
    assert "| reco | 250.0 | 2.5 | – | – | 64.0 |" in text  # no floor measured
    assert "| supervised | 100.0 | 1.0 |" in text


def test_floor_is_the_supervised_step_on_as_many_images_plus_the_no_grad_forwards():
    rows = [
        {"method": "supervised", "step_s": 0.1, "forward_s": 0.03},
        {"method": "cutmix", "step_s": 0.3, "forward_s": None},
        {"method": "unimatch", "step_s": 0.6, "forward_s": None},
        {"method": "unknown", "step_s": 0.6, "forward_s": None},
    ]
    floor = floors(rows, {1: 0.1, 2: 0.18, 4: 0.35})
    # supervised: itself; cutmix: student on 2B plus the teacher's forward on B; UniMatch: 4B + 1.
    assert floor == {"supervised": 0.1, "cutmix": 0.18 + 0.03, "unimatch": 0.35 + 0.03}
    text = table([{**r, "images_per_s": 1.0, **dict.fromkeys(PARTS, 0.0), "peak_memory_mib": 1.0} for r in rows], floor)
    assert "| cutmix | 300.0 | 3.0 | 210.0 | 1.43 |" in text
