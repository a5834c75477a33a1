"""Benchmark tables from hand-made run records (no training)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import matplotlib.pyplot as plt
import numpy as np

from benchmarks.report import (
    SIGNAL_RULE, _method_order, budget_positions, delta_curves, delta_table, format_cell, load_frame, main,
    method_curves, miou_figure, protocol_criteria, runs_frame, suite_order, summary_table, write_report,
)
from benchmarks.run import ALL_LABELS, budget_name


def record(method: str, labels: int, seed: int, miou: float | None, status: str = "ok", **extra: Any) -> dict[str, Any]:
    return {
        "method": method,
        "labels": labels,
        "seed": seed,
        "status": status,
        "error": None if status == "ok" else "exit code 1\nValueError: data.num_labeled=9999 is too large",
        "val_miou_last": miou,
        "val_miou_at_80pct": None if miou is None else miou - 2.0,
        "val_miou_best": None if miou is None else miou + 1.0,
        "test_miou": None if miou is None else miou - 1.0,
        "steps": 1500,
        "val_iou_last": {"background": 90.0, "disc": 10.0},
        "dataset": "synthetic",
        "profile": "default",
        "settings_hash": f"hash-{method}",
        "protocol": {"dataset": "synthetic", "crop_size": 64, "encoder": "resnet18", "max_steps": 1500},
        **extra,
    }


def write_runs(directory: Path, records: list[dict[str, Any]], methods: list[str] | None = None) -> Path:
    for r in records:
        run = f"{r['method']}/labels{budget_name(r['labels'])}/seed{r['seed']}"
        path = directory / "runs" / run / "result.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r))
    if methods:
        (directory / "grid.json").write_text(json.dumps({"methods": methods}))
    return directory


RECORDS = [
    record("supervised", 5, 0, 40.0),
    record("supervised", 5, 1, 42.0),
    record("supervised", 5, 2, 44.0),
    record("supervised", 15, 0, 50.0),
    record("supervised", 15, 1, 52.0),  # seed 2 missing
    record("reco", 5, 0, 60.0),
    record("reco", 5, 1, None, status="failed"),
    record("reco", 5, 2, 64.0),
    record("reco", 15, 0, 70.0),
    record("reco", 15, 1, 71.0),
    record("reco", 15, 2, 72.0),
]


def test_format_cell() -> None:
    assert format_cell(pd.Series([40.0, 42.0, 44.0]), 0, 3) == "42.0 ± 2.0"
    assert format_cell(pd.Series([50.0, 52.0]), 0, 3) == "51.0 ± 1.4 (n=2)"
    assert format_cell(pd.Series([60.0]), 1, 2) == "60.0 (n=1, 1 failed)"
    assert format_cell(pd.Series([], dtype=float), 2, 2) == "– (n=0, 2 failed)"


def test_tables_list_methods_in_the_suite_order_whatever_the_grids() -> None:
    order = suite_order()
    assert order[0] == "supervised"
    methods = ["unimatch", "recon+supervised", "zzz", "c3semiseg", "supervised", "reco"]
    expected = ["supervised", "recon+supervised", "reco", "unimatch", "c3semiseg", "zzz"]
    assert _method_order(methods, order) == expected


def test_a_missing_budget_breaks_the_plotted_line() -> None:
    frame = pd.DataFrame({"method": ["a", "a", "b", "b", "b"], "labels": [5, 60, 5, 15, 60],
                          "val_miou_last": [10.0, 50.0, 12.0, 30.0, 52.0]})
    curves = method_curves(frame, "val_miou_last", [5, 15, 60])
    assert list(curves["a"].index) == [5, 15, 60]
    assert curves["a"]["mean"].isna().tolist() == [False, True, False]
    assert curves["b"]["mean"].tolist() == [12.0, 30.0, 52.0]


def test_summary_table_mean_std_missing_and_failed() -> None:
    frame = runs_frame(RECORDS)
    table = summary_table(frame, "val_miou_last", method_order=["supervised", "reco"])
    assert list(table.index) == ["supervised", "reco"]
    assert list(table.columns) == [5, 15]
    assert table.loc["supervised", 5] == "42.0 ± 2.0"
    assert table.loc["supervised", 15] == "51.0 ± 1.4 (n=2)"
    # The failed seed is not averaged in as a zero or a NaN, and it is counted.
    assert table.loc["reco", 5] == "62.0 ± 2.8 (n=2, 1 failed)"
    assert table.loc["reco", 15] == "71.0 ± 1.0"
    best = summary_table(frame, "val_miou_best")
    assert best.loc["reco", 15] == "72.0 ± 1.0"


def test_write_report_files(tmp_path: Path) -> None:
    directory = write_runs(tmp_path / "res", RECORDS, methods=["supervised", "reco"])
    stream = io.StringIO()
    text = write_report([directory], directory, stream=stream)
    assert stream.getvalue() == text
    summary = (directory / "summary.md").read_text()
    assert summary == text
    first = summary.splitlines()[0]
    assert "synthetic" in first and "default" in first and "last step" in first and "seeds 0,1,2" in first
    assert "| supervised | 42.0 ± 2.0 | 51.0 ± 1.4 (n=2) |" in summary
    assert "| reco | 62.0 ± 2.8 (n=2, 1 failed) | 71.0 ± 1.0 |" in summary
    assert "Test mIoU" in summary and "| supervised | 41.0 ± 2.0 |" in summary
    assert "1 failed run(s)" in summary and "reco labels=5 seed=1: ValueError: data.num_labeled=9999" in summary
    # Δ over supervised: 62 − 42 and 71 − 51, both beyond 2 pooled stds (2 × 2.45 and 2 × 1.22).
    assert "| reco | +20.0* | +20.0* |" in summary and SIGNAL_RULE in summary
    runs = pd.read_csv(directory / "runs.csv")
    assert len(runs) == len(RECORDS)
    assert {"val_iou/background", "val_iou/disc", "crop_size", "encoder", "config_hash"} <= set(runs.columns)
    assert (runs["status"] == "failed").sum() == 1
    assert (directory / "miou_vs_labels.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_diagnostic_columns_are_empty_for_runs_without_pseudo_labels(tmp_path: Path) -> None:
    diagnostics = {"diag_pseudo_acc": 0.8, "diag_pseudo_miou": 61.5, "diag_mask_ratio": 0.25, "diag_mask_acc": 0.9}
    directory = write_runs(tmp_path / "res", [record("supervised", 5, 0, 40.0), record("fixmatch", 5, 0, 50.0, **diagnostics)])
    write_report([directory], directory, stream=io.StringIO())
    runs = pd.read_csv(directory / "runs.csv").set_index("method")
    assert runs.loc["fixmatch", list(diagnostics)].tolist() == list(diagnostics.values())
    assert runs.loc["supervised", list(diagnostics)].isna().all()  # empty cells, not 0


def test_report_cli_combines_directories(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Seeds 0 and 1 from one directory, seed 2 from another, the way parallel machines would split them.
    first = write_runs(tmp_path / "a", [r for r in RECORDS if r["seed"] < 2])
    second = write_runs(tmp_path / "b", [r for r in RECORDS if r["seed"] == 2])
    assert main([str(first), str(second)]) == 2  # where should the combined tables go?
    assert "--out" in capsys.readouterr().err
    assert main([str(first), str(second), "--out", str(tmp_path / "all"), "--best"]) == 0
    summary = (tmp_path / "all" / "summary.md").read_text()
    assert "best validation mIoU" in summary
    assert "| supervised | 43.0 ± 2.0 | 52.0 ± 1.4 (n=2) |" in summary
    assert main([str(tmp_path / "missing")]) == 2


def test_mixed_settings_are_flagged(tmp_path: Path) -> None:
    other = record("supervised", 15, 2, 53.0, settings_hash="other")
    directory = write_runs(tmp_path / "res", [*RECORDS, other])
    text = write_report([directory], directory, stream=io.StringIO())
    assert "different settings" in text and "supervised" in text.split("different settings")[1]


def test_committed_runs_csv_combines_with_new_runs(tmp_path: Path) -> None:
    # An earlier session's table (run directories gone, runs.csv kept), then new seeds and one rerun.
    earlier = write_runs(tmp_path / "earlier", [r for r in RECORDS if r["seed"] == 0])
    write_report([earlier], earlier, stream=io.StringIO())
    for path in sorted((earlier / "runs").rglob("result.json")):
        path.unlink()
    rerun = record("reco", 15, 0, 80.0)  # the later directory's copy wins
    later = write_runs(tmp_path / "later", [*(r for r in RECORDS if r["seed"] > 0), rerun])
    with pytest.warns(UserWarning, match="more than once"):
        text = write_report([earlier, later], tmp_path / "all", stream=io.StringIO())
    runs = pd.read_csv(tmp_path / "all" / "runs.csv")
    assert len(runs) == len(RECORDS)
    assert runs.loc[(runs["method"] == "reco") & (runs["labels"] == 15) & (runs["seed"] == 0), "val_miou_last"].item() == 80.0
    assert "| supervised | 42.0 ± 2.0 | 51.0 ± 1.4 (n=2) |" in text
    assert "| reco | 62.0 ± 2.8 (n=2, 1 failed) | 74.3 ± 4.9 |" in text
    assert "val_iou/background" in runs.columns


def test_budget_all_is_named_all_and_comes_last(tmp_path: Path) -> None:
    records = [
        record("supervised", ALL_LABELS, 0, 80.0), record("supervised", 15, 0, 50.0), record("supervised", 5, 0, 40.0),
        record("reco", ALL_LABELS, 0, None, status="failed"), record("reco", 5, 0, 60.0),
    ]
    directory = write_runs(tmp_path / "res", records)
    assert (directory / "runs" / "supervised" / "labelsall" / "seed0" / "result.json").is_file()
    text = write_report([directory], directory, stream=io.StringIO())
    assert "| method | 5 | 15 | all |" in text
    assert "| supervised | 40.0 | 50.0 | 80.0 |" in text and "| reco | 60.0 | – | – (n=0, 1 failed) |" in text
    assert "- reco labels=all seed=0:" in text
    runs = pd.read_csv(directory / "runs.csv", dtype={"labels": str})
    assert runs[["method", "labels"]].values.tolist() == [
        ["reco", "5"], ["reco", "all"], ["supervised", "5"], ["supervised", "15"], ["supervised", "all"],
    ]
    # Read back from runs.csv alone (the run directories gone), `all` is the same budget again.
    for path in (directory / "runs").rglob("result.json"):
        path.unlink()
    frame = load_frame([directory])
    assert frame["labels"].tolist() == [5, ALL_LABELS, 5, 15, ALL_LABELS]
    assert list(summary_table(frame, "val_miou_last").columns) == [5, 15, ALL_LABELS]
    # On the plot's log axis `all` is one step right of the largest budget.
    assert budget_positions([5, 60, ALL_LABELS]) == {5: 5.0, 60: 60.0, ALL_LABELS: 120.0}
    assert budget_positions([ALL_LABELS]) == {ALL_LABELS: 2.0}


def test_runs_csv_has_val_miou_at_80pct_and_older_tables_without_it_still_load(tmp_path: Path) -> None:
    runs = runs_frame(RECORDS).set_index(["method", "labels", "seed"])
    assert runs.loc[("supervised", 5, 0), "val_miou_at_80pct"] == 38.0
    assert pd.isna(runs.loc[("reco", 5, 1), "val_miou_at_80pct"])  # failed
    # A table written before the column existed, its run directories gone.
    old = tmp_path / "old"
    old.mkdir()
    runs_frame(RECORDS).drop(columns="val_miou_at_80pct").to_csv(old / "runs.csv", index=False)
    frame = load_frame([old])
    assert len(frame) == len(RECORDS) and frame["val_miou_at_80pct"].isna().all()
    new = write_runs(tmp_path / "new", [record("supervised", 60, 0, 70.0)])
    text = write_report([old, new], tmp_path / "all", stream=io.StringIO())
    assert "| supervised | 42.0 ± 2.0 | 51.0 ± 1.4 (n=2) | 70.0 (n=1) |" in text
    combined = pd.read_csv(tmp_path / "all" / "runs.csv")
    assert combined.loc[combined["labels"] == 60, "val_miou_at_80pct"].tolist() == [68.0]
    assert combined["val_miou_at_80pct"].isna().sum() == len(RECORDS)


def frame_of(cells: dict[tuple[str, int | str], list[float]], gap_80pct: float = 0.0, gap_best: float = 0.0,
             **gaps: tuple[float, float]) -> pd.DataFrame:
    """Runs, one per value of each (method, labels) cell, seeds 0, 1, ...; at 80 % = last − gap_80pct and
    best = last + gap_best, or per budget name in ``gaps`` as (gap_80pct, gap_best)."""
    rows = []
    for (method, labels), values in cells.items():
        at_80pct, best = gaps.get(f"labels{labels}", (gap_80pct, gap_best))
        budget = ALL_LABELS if labels == "all" else labels
        rows += [{"method": method, "labels": budget, "seed": seed, "status": "ok", "val_miou_last": v,
                  "val_miou_at_80pct": v - at_80pct, "val_miou_best": v + best} for seed, v in enumerate(values)]
    return pd.DataFrame(rows)


def test_delta_over_supervised_marks_exactly_the_differences_beyond_two_pooled_stds() -> None:
    # Every std is sqrt(2), so the pooled std is sqrt(2) and the threshold 2 sqrt(2) = 2.83.
    frame = frame_of({
        ("supervised", 5): [10.0, 12.0], ("supervised", 15): [20.0, 22.0],
        ("above", 5): [12.9, 14.9],  # Δ +2.9
        ("below", 5): [12.8, 14.8],  # Δ +2.8
        ("negative", 5): [7.1, 9.1],  # Δ −2.9
        ("one_seed", 5): [40.0], ("one_seed", 15): [40.0, 40.0],  # Δ +29 at 5 from one seed; std 1 at 15
    })
    deltas = delta_curves(method_curves(frame, "val_miou_last", [5, 15]))
    assert deltas["above"].loc[5, "delta"] == pytest.approx(2.9)
    assert deltas["above"].loc[5, "pooled_std"] == pytest.approx(np.sqrt(2.0))
    assert deltas["one_seed"].loc[15, "pooled_std"] == pytest.approx(1.0)  # sqrt((0 + 2) / 2)
    table = delta_table(frame, "val_miou_last", method_order=suite_order())
    assert table.to_dict("index") == {
        "above": {5: "+2.9*", 15: "–"},
        "below": {5: "+2.8", 15: "–"},
        "negative": {5: "\u22122.9*", 15: "–"},
        "one_seed": {5: "+29.0", 15: "+19.0*"},
    }
    assert delta_table(frame[frame["method"] != "supervised"], "val_miou_last").empty


def test_the_plot_has_a_delta_panel_when_supervised_runs_are_there() -> None:
    frame = frame_of({("supervised", 5): [10.0, 12.0], ("reco", 5): [20.0, 21.0], ("reco", 15): [30.0, 31.0]})
    figure = miou_figure(frame, "val_miou_last", "title", suite_order())
    try:
        assert len(figure.axes) == 2
        assert "pooled std" in figure.axes[1].get_ylabel()
    finally:
        plt.close(figure)
    figure = miou_figure(frame[frame["method"] == "reco"], "val_miou_last", "title")
    try:
        assert len(figure.axes) == 1
    finally:
        plt.close(figure)


def results(frame: pd.DataFrame) -> dict[tuple[str, str], str]:
    table = protocol_criteria(frame)
    return dict(zip(zip(table.index, table["labels"]), table["result"]))


def test_protocol_criteria_pass_and_fail_per_budget() -> None:
    frame = frame_of(
        {("supervised", 5): [40.0, 41.0, 42.0], ("supervised", "all"): [70.0, 74.0, 78.0],
         ("reco", 5): [0.0, 90.0]},  # other methods are not the baseline's protocol
        labels5=(0.5, 2.0), labelsall=(1.5, 0.2),
    )
    failed = {"method": "supervised", "labels": 5, "seed": 9, "status": "failed", "val_miou_last": np.nan}
    frame = pd.concat([frame, pd.DataFrame([failed])], ignore_index=True)
    assert results(frame) == {
        ("converged: 80 % vs last", "5"): "pass",  # 0.5 <= 1
        ("converged: best − last", "5"): "fail",  # 2.0 > 1.5
        ("converged: 80 % vs last", "all"): "fail",  # 1.5 > 1
        ("converged: best − last", "all"): "pass",  # 0.2 <= 1.5
        ("headroom: all", "all"): "fail",  # 74 < 75
        ("headroom: 5 vs all", "5"): "pass",  # 41 <= 74 − 25
        ("noise: std over seeds", "5"): "pass",  # 1.0 <= 2
        ("noise: std over seeds", "all"): "fail",  # 4.0 > 2
    }
    table = protocol_criteria(frame).set_index("labels", append=True)
    assert table.loc[("converged: best − last", "5"), "figure"] == "mean 2.00, max 2.00"
    assert table.loc[("noise: std over seeds", "all"), "figure"] == "4.00 (n=3)"
    assert table.loc[("headroom: 5 vs all", "5"), "figure"] == "mean 41.0, all − it 33.0"


def test_protocol_criteria_without_the_data_are_not_measured(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    frame = frame_of({("supervised", 5): [40.0, 41.0], ("supervised", 15): [50.0]})
    frame["val_miou_at_80pct"] = np.nan  # a table written before the column existed
    assert results(frame) == {
        ("converged: 80 % vs last", "5"): "not measured",
        ("converged: best − last", "5"): "pass",
        ("converged: 80 % vs last", "15"): "not measured",
        ("converged: best − last", "15"): "pass",
        ("headroom: all", "all"): "not measured",
        ("headroom: 5 vs all", "5"): "not measured",
        ("noise: std over seeds", "5"): "pass",
        ("noise: std over seeds", "15"): "not measured",  # one seed
    }
    assert set(results(frame[frame["method"] != "supervised"]).values()) == {"not measured"}
    # The command prints the table and writes nothing.
    directory = write_runs(tmp_path / "res", RECORDS)
    assert main([str(directory), "--criteria"]) == 0
    out = capsys.readouterr().out
    assert "| headroom: all | all | no runs | ≥ 75.0 | not measured |" in out
    assert "| noise: std over seeds | 5 | 2.00 (n=3) | ≤ 2.0 | pass |" in out
    assert not (directory / "summary.md").exists() and not (directory / "runs.csv").exists()
