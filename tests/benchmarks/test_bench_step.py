"""benchmarks/bench_step.py: one method measured in a subprocess, and the ratio table."""

import json
import subprocess
import sys

import pytest

from benchmarks.bench_step import (PARTS, child_command, floor_job, floor_key, floor_rounds, floors, median_round,
                                   method_job, table)
from src.pl_modules import METHODS
from src.pl_modules.timing import StepFloor
from tests.conftest import REPO, SMOKE

TINY = ["--config", SMOKE, "--crop", "32", "--steps", "2", "--warmup", "1", "--workers", "0", "--threads", "1"]


def measure_one(method: str) -> dict:
    return measure_job(method_job(method, 8))


def measure_job(job) -> dict:
    done = subprocess.run(child_command(job, TINY), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.split("RESULT ", 1)[1])


def test_one_method_breakdown():
    result = measure_one("cutmix")
    assert result["method"] == "cutmix" and result["peak_memory_mib"] > 0
    # A mean-teacher step runs the teacher and the mixing; it has no contrastive loss.
    assert result["teacher"] > 0 and result["mix+aug"] > 0 and result["contrast"] == 0
    assert result["step_s"] >= result["teacher"] + result["mix+aug"] + result["data"]
    assert result["images_per_s"] == 16 / result["step_s"]


def test_c3_parts_are_timed_not_left_in_rest():
    # C3 builds its own views and runs its own teacher and contrastive loss (from step 0 here).
    result = measure_one("c3semiseg")
    assert result["teacher"] > 0 and result["mix+aug"] > 0 and result["contrast"] > 0


@pytest.mark.parametrize("method, passes", [
    ("cutmix", [8, 8]),  # the mean-teacher family keeps BatchNorm statistics per stream: labeled, unlabeled
    ("reco", [8, 8]),  # the same, with its representation head on both
    ("c3semiseg", [16]),  # labeled + strong unlabeled in one cross-set mixed pass, with its projection head
    ("fixmatch", [16, 8]),  # [labeled; weak], then the strong view
    ("unimatch", [16, 16]),  # [labeled; weak] with its feature-perturbed stream, then both strong views
])
def test_floor_step_runs_the_network_as_the_method_does(method, passes):
    # The floor's step: as many images with gradient, in the same passes, through the same heads and
    # perturbed streams, with a zero loss on the heads (their losses never run), and as many
    # no-gradient forwards of one batch (the teacher's).
    seen = measure_one(method)
    floor = measure_job(floor_job(floor_key(method), f"floor of {method}", 8))
    assert seen["grad_passes"] == floor["grad_passes"] == passes
    assert seen["eval_passes"] == floor["eval_passes"] == [8] * METHODS[method].step_floor.eval_forwards == [8]
    assert seen["head_trained"] == floor["head_trained"] == (method in ("reco", "c3semiseg"))
    assert seen["perturbed_per_step"] == floor["perturbed_per_step"] == (method == "unimatch")
    assert floor["contrast"] == 0


def test_plain_supervised_step_has_no_head_and_no_perturbed_stream():
    plain = measure_one("supervised")
    assert plain["grad_passes"] == [8] and not plain["head_trained"] and plain["perturbed_per_step"] == 0
    assert plain["eval_passes"] == [] and floor_key("supervised") == floor_key("recon") == "1"


def test_floor_keys_name_passes_eval_forwards_and_variant():
    assert floor_key("reco") == "1,1:1+head" and StepFloor.from_key("1,1:1+head") == StepFloor((1, 1), 1, "head")
    assert floor_key("unimatch") == "2,2:1+fp" and StepFloor.from_key("2,1:1") == StepFloor((2, 1), 1, "")
    assert StepFloor.from_key("1") == StepFloor((1,), 0, "") and floor_key("unknown") is None


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


def test_each_method_takes_the_step_of_its_floor_key():
    rows = [{"method": m, "step_s": step} for m, step in
            (("supervised", 0.1), ("cutmix", 0.3), ("unimatch", 0.6), ("unknown", 0.6), ("reco", 0.4))]
    rounds = {r["method"]: [r] for r in rows}
    rounds.update({f"floor {key}": [{"step_s": step}] for key, step in
                   (("1,1:1", 0.21), ("1,1:1+head", 0.23), ("2,2:1+fp", 0.38), ("2,1:1", 9.0))})
    methods = [r["method"] for r in rows]
    floor, ratio = floors(rounds, methods)
    assert floor == {"supervised": 0.1, "cutmix": 0.21, "unimatch": 0.38, "reco": 0.23}  # no rule, no floor
    assert ratio == pytest.approx({"supervised": 1.0, "cutmix": 0.3 / 0.21, "unimatch": 0.6 / 0.38, "reco": 0.4 / 0.23})
    # A floor run in lockstep with its method comes first; recon's floor (key "1") is supervised's step.
    rounds["floor of reco"] = [{"step_s": 0.25}]
    assert floor_rounds({**rounds, "recon": [{"step_s": 0.2}]}, ["reco", "recon"]) == {
        "reco": [{"step_s": 0.25}], "recon": [{"method": "supervised", "step_s": 0.1}]}
    text = table([{**r, "images_per_s": 1.0, **dict.fromkeys(PARTS, 0.0), "peak_memory_mib": 1.0} for r in rows], floor)
    assert "| cutmix | 300.0 | 3.0 | 210.0 | 1.43 |" in text
    # Peak memory with and without what a method adds to its floor (ReCo: with and without its loss).
    text = table([{**r, "images_per_s": 1.0, **dict.fromkeys(PARTS, 0.0), "peak_memory_mib": 150.4} for r in rows],
                 floor, floor_memory={"reco": 120.6})
    assert "| reco | 400.0 | 4.0 | 230.0 | 1.74 | 1.0 | 0.0 | 0.0 | 0.0 | 0.0 | 0.0 | 150 | 121 |" in text
    assert "| 150 | – |" in text  # no floor measured, no floor peak


def test_rounds_keep_each_methods_median_round(tmp_path):
    runs = [{"step_s": 0.3, "teacher": 3}, {"step_s": 0.1, "teacher": 1}, {"step_s": 0.2, "teacher": 2}]
    assert median_round(runs) == {"step_s": 0.2, "teacher": 2}  # the whole round, its parts included
    assert median_round(runs[:2])["step_s"] == 0.1  # an even count keeps the lower middle
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/bench_step.py", "--config", SMOKE, "--crop", "32", "--steps", "1", "--warmup", "1",
         "--workers", "0", "--threads", "1", "--methods", "supervised", "--rounds", "2", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    saved = json.loads(out.read_text())
    assert len(saved["rounds"]["supervised"]) == 2
    assert saved["results"][0]["step_s"] == min(saved["rounds"]["supervised"])
    assert "(median of 2 rounds;" in done.stdout


def test_paired_ratio_is_the_median_of_each_rounds_method_over_its_adjacent_floor():
    # Round 2 is a slow spell for the method and its floor alike: paired, it does not move the ratio.
    def steps(*values):
        return [{"step_s": v} for v in values]

    rounds = {
        "supervised": steps(0.1, 0.2, 0.1),
        "cutmix": steps(0.25, 0.50, 0.30),
        "floor of cutmix": steps(0.22, 0.42, 0.23),
        "unknown": steps(1.0, 1.0, 1.0),
    }
    floor, ratio = floors(rounds, ["supervised", "cutmix", "unknown"], paired=True)
    assert set(floor) == {"supervised", "cutmix"}  # no floor rule, no ratio
    assert floor["cutmix"] == pytest.approx(0.23)  # median of 0.22, 0.42, 0.23
    # rounds: 0.25 / 0.22 = 1.14, 0.50 / 0.42 = 1.19, 0.30 / 0.23 = 1.30 (unpaired: 0.30 / 0.23 = 1.30)
    assert ratio["cutmix"] == pytest.approx(0.50 / 0.42)
    assert ratio["supervised"] == 1.0
    text = table([{"method": m, **r[0], "images_per_s": 1.0, **dict.fromkeys(PARTS, 0.0), "peak_memory_mib": 1.0}
                  for m, r in rounds.items() if m in ("supervised", "cutmix")], floor, ratio)
    assert "| cutmix | 250.0 | 2.5 | 230.0 | 1.19 |" in text


def test_paired_run_measures_each_method_in_lockstep_with_its_floor(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/bench_step.py", "--config", SMOKE, "--crop", "32", "--steps", "3", "--warmup", "1",
         "--workers", "0", "--threads", "1", "--methods", "cutmix", "--paired", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    order = [line.split(", ", 1)[1].split(":")[0] for line in done.stderr.splitlines() if line.startswith("round ")]
    assert order == ["supervised", "cutmix", "floor of cutmix"]
    saved = json.loads(out.read_text())
    cutmix = next(r for r in saved["results"] if r["method"] == "cutmix")
    assert saved["paired"] and cutmix["floor_s"] == saved["rounds"]["floor of cutmix"][0]
    assert cutmix["x_floor"] == cutmix["step_s"] / cutmix["floor_s"]
    assert cutmix["floor_peak_memory_mib"] > 0 and "| floor peak MiB |" in done.stdout
    # The two processes took turns: their timed steps alternate, and no two overlap in time.
    steps = sorted([(*w, "method") for w in saved["windows"]["cutmix"][0]]
                   + [(*w, "floor") for w in saved["windows"]["floor of cutmix"][0]])
    assert [who for _, _, who in steps] == ["method", "floor"] * 3
    assert all(later[0] >= earlier[1] for earlier, later in zip(steps, steps[1:]))
