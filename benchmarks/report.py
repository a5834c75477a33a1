"""Tables and a plot from benchmark result directories.

    python benchmarks/report.py results/synthetic-default [more dirs ...] [--best] [--out DIR] [--criteria]

Reads every ``runs/<method>/labels<N>/seed<S>/result.json`` under the given directories (or a
directory's ``runs.csv`` when its run directories are gone; a run in several directories counts
once, the copy from the last directory given) and writes, into ``--out`` (default: the one
directory given):

- ``runs.csv``: one row per run (metrics, per-class IoU, protocol switches, cost, provenance);
  the validation mIoU at the last step, at the validation nearest to 80 % of the steps (equal to
  the last one for a run that had converged) and the best one;
- ``summary.md``: mIoU by method x label budget as ``mean ± std`` over seeds (sample std; a
  cell with fewer seeds than the grid shows ``n``; failed runs are left out and counted);
- ``miou_vs_labels.png``: one line per method over the label budgets (log axis), std as error bars;
  beside it each method's difference to ``supervised`` (Δ mIoU), pooled std as error bars.

The budget ``all`` (every train image labeled, ``labelsall/``) comes last in the tables, and in
the plot one step right of the largest budget (at twice it: the records do not give the pool size).

The metric is the validation mIoU at the last step, or the best one with ``--best``. A second
table gives each method's Δ over ``supervised`` and marks those that exceed the seed noise
(`exceeds_seed_noise`). When the runs were tested, another table gives the test mIoU of the
best-validation checkpoint.

    python benchmarks/report.py DIR [more dirs ...] --criteria

prints, and writes nothing, whether the supervised runs meet the embedded benchmark's protocol
criteria (`ProtocolCriteria`: converged, headroom, seed noise).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import textwrap
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/report.py` puts only benchmarks/ on the path
    sys.path.insert(0, str(REPO))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from benchmarks.run import ALL_LABELS, PROTOCOL_COLUMNS, budget_name, parse_budget  # noqa: E402
from src.utils import atomic_write_bytes, atomic_write_text  # noqa: E402

METRICS = {
    "val_miou_last": "validation mIoU at the last step",
    "val_miou_at_80pct": "validation mIoU nearest to 80 % of the steps",
    "val_miou_best": "best validation mIoU",
    "test_miou": "test mIoU",
}
# Pseudo-label diagnostics at the last validation (src/pl_modules/diagnostics.py); empty for methods without.
DIAGNOSTIC_COLUMNS = ("diag_pseudo_acc", "diag_pseudo_miou", "diag_mask_ratio", "diag_mask_acc")
# The method every other is compared with (Δ table and panel, protocol criteria).
BASELINE = "supervised"
# A difference counts as signal when it exceeds this many pooled seed stds (`exceeds_seed_noise`).
SIGNAL_STDS = 2.0
# The rule as summary.md states it under the Δ table.
SIGNAL_RULE = (
    f"`*`: the difference exceeds the seed noise, |Δ| > {SIGNAL_STDS:g} × pooled std, where pooled std = "
    "√((s_method² + s_supervised²) / 2) of the sample stds over seeds at that budget, and both have ≥ 2 seeds."
)


def load_results(dirs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Every run record under ``dirs`` (``runs/*/*/*/result.json``)."""
    records = []
    for directory in map(Path, dirs):
        if not directory.is_dir():
            raise FileNotFoundError(f"no result directory {directory}")
        for path in sorted(directory.glob("runs/*/*/*/result.json")):
            try:
                records.append(json.loads(path.read_text()))
            except ValueError:
                warnings.warn(f"{path}: not valid JSON, skipped", stacklevel=2)
    return records


def load_frame(dirs: Sequence[str | Path]) -> pd.DataFrame:
    """One row per run from ``dirs``, in order (a later directory's copy of a run wins).

    A directory without run records but with a ``runs.csv`` (a committed summary whose run
    directories are gone) contributes that table's rows.
    """
    frames = []
    for directory in map(Path, dirs):
        records = load_results([directory])
        if records:
            frames.append(runs_frame(records))
        elif (directory / "runs.csv").is_file():
            frames.append(read_runs_csv(directory / "runs.csv"))
    frames = [frame for frame in frames if not frame.empty]
    return dedupe(pd.concat(frames, ignore_index=True)) if frames else pd.DataFrame()


def read_runs_csv(path: Path) -> pd.DataFrame:
    """A ``runs.csv`` as `runs_frame` makes it: budgets as numbers (``all`` is `ALL_LABELS`), every metric column."""
    frame = pd.read_csv(path)
    frame["labels"] = frame["labels"].map(parse_budget)
    # Tables written before a metric was recorded lack its column.
    return frame.reindex(columns=[*frame.columns, *(m for m in METRICS if m not in frame.columns)])


def dedupe(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with one row per (method, labels, seed), the last copy of each, sorted by that key (``all`` last)."""
    columns = ["method", "labels", "seed"]
    duplicated = frame.duplicated(columns, keep="last")
    if duplicated.any():
        twice = frame.loc[duplicated, columns].to_dict("records")
        warnings.warn(f"runs found more than once, the last copy is used: {twice}", stacklevel=2)
        frame = frame.loc[~duplicated]
    return frame.sort_values(columns, kind="stable", key=_labels_last).reset_index(drop=True)


def _budget_order(labels: int) -> float:
    """Sort key of a label budget: by size, ``all`` after every number."""
    return math.inf if labels == ALL_LABELS else labels


def _labels_last(column: pd.Series) -> pd.Series:
    return column.map(_budget_order) if column.name == "labels" else column


def runs_frame(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per run; a run found twice (same method, budget, seed) keeps its last copy."""
    rows = []
    for record in records:
        protocol = record.get("protocol") or {}
        error = (record.get("error") or "").strip().splitlines()
        resumed = record.get("resumed_from") or {}
        row = {
            "method": record["method"],
            "labels": parse_budget(record["labels"]),
            "seed": int(record["seed"]),
            "status": record.get("status", "failed"),
            "val_miou_last": record.get("val_miou_last"),
            "val_miou_at_80pct": record.get("val_miou_at_80pct"),
            "val_miou_best": record.get("val_miou_best"),
            "best_step": record.get("best_step"),
            "test_miou": record.get("test_miou"),
            **{name: record.get(name) for name in DIAGNOSTIC_COLUMNS},
            "steps": record.get("steps"),
            **{name: protocol.get(name) for name in PROTOCOL_COLUMNS},
            "dataset": protocol.get("dataset") or record.get("dataset"),  # a run that failed early has no protocol
            "wall_time_s": record.get("wall_time_s"),
            "fit_time_s": record.get("fit_time_s"),
            "peak_rss_bytes": record.get("peak_rss_bytes"),
            "peak_cuda_memory_bytes": record.get("peak_cuda_memory_bytes"),
            "resumed_from_step": resumed.get("step"),
            "git_commit": record.get("git_commit"),
            "config_hash": record.get("config_hash"),
            "settings_hash": record.get("settings_hash"),
            "profile": record.get("profile"),
            "error": error[-1] if error else None,
            "run_dir": record.get("run_dir"),
        }
        row.update({f"val_iou/{name}": v for name, v in (record.get("val_iou_last") or {}).items()})
        row.update({f"test_iou/{name}": v for name, v in (record.get("test_iou") or {}).items()})
        rows.append(row)
    frame = pd.DataFrame(rows)
    return frame if frame.empty else dedupe(frame)


def format_cell(values: pd.Series, num_failed: int, expected_n: int) -> str:
    """``mean ± std`` of one cell (sample std), with ``n`` when seeds are missing and the failures."""
    values = values.dropna()
    n = len(values)
    notes = []
    if n < expected_n:
        notes.append(f"n={n}")
    if num_failed:
        notes.append(f"{num_failed} failed")
    if n == 0:
        text = "–"
    elif n == 1:
        text = f"{values.iloc[0]:.1f}"
    else:
        text = f"{values.mean():.1f} ± {values.std(ddof=1):.1f}"
    return f"{text} ({', '.join(notes)})" if notes else text


def summary_table(frame: pd.DataFrame, metric: str, method_order: Sequence[str] = ()) -> pd.DataFrame:
    """Method x label budget table of ``metric`` as strings; failed runs excluded and counted."""
    expected_n = frame["seed"].nunique()
    ok = frame["status"] == "ok"
    cells = {}
    for (method, labels), group in frame.groupby(["method", "labels"]):
        group_ok = ok.loc[group.index]
        cells[(method, labels)] = format_cell(group.loc[group_ok, metric], int((~group_ok).sum()), expected_n)
    table = pd.Series(cells).unstack(level=1)
    table = table.reindex(
        columns=sorted(table.columns, key=_budget_order), index=_method_order(table.index, method_order)
    )
    table.index.name, table.columns.name = "method", "labels"
    return table.fillna("–")


def _method_order(methods: Sequence[str], preferred: Sequence[str]) -> list[str]:
    """``preferred`` first, each name followed by its two-stage variants (``recon+supervised`` after ``supervised``)."""
    order: list[str] = []
    for name in preferred:
        variants = sorted(m for m in methods if "+" in m and m.rpartition("+")[2] == name)
        order += [m for m in (name, *variants) if m in methods and m not in order]
    return order + sorted(m for m in methods if m not in order)


def suite_order() -> list[str]:
    """The methods in the suite's registry order (supervised first), the order of every table."""
    from src.pl_modules import METHODS

    return list(METHODS)


def markdown_table(table: pd.DataFrame) -> str:
    """A small GitHub markdown table (no `tabulate` dependency)."""
    header = [table.index.name or "", *(budget_name(c) for c in table.columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(table.columns)) + "|"]
    for method, row in table.iterrows():
        lines.append("| " + " | ".join([str(method), *map(str, row.tolist())]) + " |")
    return "\n".join(lines)


def finished_curves(frame: pd.DataFrame, metric: str) -> tuple[list[int], dict[str, pd.DataFrame]]:
    """The label budgets of the runs that finished (status ``ok``) and recorded ``metric``, in order,
    and each method's `method_curves` of those runs over them."""
    ok = frame[(frame["status"] == "ok") & frame[metric].notna()]
    budgets = sorted(ok["labels"].unique(), key=_budget_order)
    return budgets, method_curves(ok, metric, budgets)


def method_curves(ok: pd.DataFrame, metric: str, budgets: Sequence[int]) -> dict[str, pd.DataFrame]:
    """Per method, ``mean``/``std``/``count`` of ``metric`` at every budget: NaN where it has no run,
    so that its plotted line breaks there instead of joining the budgets on either side."""
    return {
        method: group.groupby("labels")[metric].agg(["mean", "std", "count"]).reindex(budgets)
        for method, group in ok.groupby("method")
    }


def exceeds_seed_noise(delta: pd.Series, pooled_std: pd.Series, enough_seeds: pd.Series) -> pd.Series:
    """The rule for "a difference is signal": ``|delta| > SIGNAL_STDS x pooled_std``, with >= 2 seeds on both sides.

    Args:
        delta: Mean of a method minus mean of the baseline, per budget.
        pooled_std: ``sqrt((s_method² + s_baseline²) / 2)`` of the sample stds over seeds.
        enough_seeds: Whether both the method and the baseline have at least 2 seeds.
    """
    return enough_seeds & (delta.abs() > SIGNAL_STDS * pooled_std)


def delta_curves(curves: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Per method other than `BASELINE`, at every budget of ``curves`` (`method_curves`): ``delta``
    (its mean minus the baseline's), ``pooled_std`` and ``signal`` (`exceeds_seed_noise`); empty
    without a baseline."""
    base = curves.get(BASELINE)
    if base is None:
        return {}
    deltas = {}
    for method, stats in curves.items():
        if method == BASELINE:
            continue
        delta = stats["mean"] - base["mean"]
        pooled_std = ((stats["std"] ** 2 + base["std"] ** 2) / 2) ** 0.5
        enough_seeds = (stats["count"] >= 2) & (base["count"] >= 2)
        signal = exceeds_seed_noise(delta, pooled_std, enough_seeds)
        deltas[method] = pd.DataFrame({"delta": delta, "pooled_std": pooled_std, "signal": signal})
    return deltas


def format_delta(delta: float, signal: bool) -> str:
    """``+3.1`` or ``−0.4`` (a minus sign, not a hyphen), ``*`` when it is signal, ``–`` when unknown."""
    if pd.isna(delta):
        return "–"
    return f"{delta:+.1f}".replace("-", "\u2212") + ("*" if signal else "")


def delta_table(frame: pd.DataFrame, metric: str, method_order: Sequence[str] = ()) -> pd.DataFrame:
    """Method x label budget table of each method's Δ ``metric`` over `BASELINE` (`format_delta`);
    no rows without a baseline or another method."""
    budgets, curves = finished_curves(frame, metric)
    deltas = delta_curves(curves)
    cells = {method: [format_delta(d, s) for d, s in zip(v["delta"], v["signal"])] for method, v in deltas.items()}
    table = pd.DataFrame.from_dict(cells, orient="index", columns=budgets)
    table = table.reindex(index=_method_order(list(cells), method_order))
    table.index.name, table.columns.name = "method", "labels"
    return table


def budget_positions(budgets: Sequence[int]) -> dict[int, float]:
    """x of each budget on the plot's log axis: its size; ``all`` one step right of the largest
    budget, at twice it (the records do not give the train pool's size)."""
    largest = max([b for b in budgets if b != ALL_LABELS], default=1)
    return {b: float(largest * 2 if b == ALL_LABELS else b) for b in budgets}


def miou_figure(frame: pd.DataFrame, metric: str, title: str, method_order: Sequence[str] = ()) -> Figure:
    """Mean ``metric`` against the label budget (log axis), one line per method, std error bars; and
    beside it, when there is a `BASELINE` and another method, each method's Δ over the baseline with
    pooled-std error bars, a filled marker where the Δ exceeds the seed noise."""
    budgets, curves = finished_curves(frame, metric)
    position = budget_positions(budgets)
    deltas = delta_curves(curves)
    methods = _method_order(list(curves), method_order)
    color = {method: f"C{i % 10}" for i, method in enumerate(methods)}
    figure, axes = plt.subplots(1, 2 if deltas else 1, figsize=(11, 4) if deltas else (6.5, 4), squeeze=False)
    axis, delta_axis = axes[0, 0], (axes[0, 1] if deltas else None)
    for i, method in enumerate(methods):
        # Nudge each method sideways a little so that error bars at one budget do not hide each other.
        x = [position[b] * 1.03 ** (i - (len(methods) - 1) / 2) for b in budgets]
        stats = curves[method]
        axis.errorbar(x, stats["mean"], yerr=stats["std"].fillna(0.0), marker="o", capsize=3, color=color[method],
                      label=method)
        if method in deltas:
            delta = deltas[method]
            delta_axis.errorbar(x, delta["delta"], yerr=delta["pooled_std"].fillna(0.0), marker="o", capsize=3,
                                color=color[method], markerfacecolor="white")
            signal = delta["signal"].to_numpy()
            delta_axis.plot([xi for xi, s in zip(x, signal) if s], delta["delta"][signal], "o", color=color[method],
                            zorder=3)  # over the hollow marker errorbar draws
    axis.set_ylabel("mIoU (%), bars ± std over seeds")
    if delta_axis is not None:
        delta_axis.axhline(0.0, color="black", linewidth=0.8)
        delta_axis.set_ylabel(f"Δ mIoU over {BASELINE} (points), bars ± pooled std")
        delta_axis.set_title(f"filled: |Δ| > {SIGNAL_STDS:g} × pooled std (exceeds the seed noise)", fontsize=9)
    for each in axes[0]:
        each.set_xscale("log")
        if budgets:
            each.set_xticks([position[b] for b in budgets], [budget_name(b) for b in budgets])
            each.minorticks_off()
        each.set_xlabel("labeled images")
        each.grid(alpha=0.3)
    figure.suptitle(textwrap.fill(title, 120 if deltas else 70), fontsize=9)
    if budgets:
        axes[0, -1].legend(*axis.get_legend_handles_labels(), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    return figure


def plot_miou(frame: pd.DataFrame, metric: str, title: str, method_order: Sequence[str] = ()) -> bytes:
    """`miou_figure` as a PNG."""
    figure = miou_figure(frame, metric, title, method_order)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")  # "tight" keeps the outside legend
    plt.close(figure)
    return buffer.getvalue()


@dataclass(frozen=True)
class ProtocolCriteria:
    """Issue 21's protocol criteria for the embedded (synthetic) benchmark, on the ``supervised`` runs.

    A benchmark that meets them has converged by its last step, leaves the label budgets room
    below full supervision, and has seed noise small enough to tell methods apart. All figures
    are validation mIoU in points; ``labels`` budgets are checked one by one.

    Args:
        max_last_vs_80pct: Converged: |mean at 80 % of the steps − mean at the last step| at most this.
        max_best_minus_last: Converged: mean over seeds of (best − last) at most this.
        min_miou_all: Headroom: mean at ``all`` (every image labeled) at least this.
        small_budget: Headroom: the budget compared with ``all``.
        min_gap_to_all: Headroom: mean at ``small_budget`` at most the mean at ``all`` minus this.
        max_seed_std: Noise: sample std over seeds at most this, at every budget.
    """

    max_last_vs_80pct: float = 1.0
    max_best_minus_last: float = 1.5
    min_miou_all: float = 75.0
    small_budget: int = 5
    min_gap_to_all: float = 25.0
    max_seed_std: float = 2.0


PROTOCOL_CRITERIA = ProtocolCriteria()


def protocol_criteria(frame: pd.DataFrame, criteria: ProtocolCriteria = PROTOCOL_CRITERIA) -> pd.DataFrame:
    """Each protocol criterion on the finished `BASELINE` runs of ``frame``, per budget.

    Figures are of ``val_miou_last`` unless a criterion names another column; "80 % vs last"
    compares the means over the seeds that recorded both. A criterion without the data to decide
    it (no ``all`` runs, no ``val_miou_at_80pct``, one seed) is ``not measured``, never ``pass``.

    Args:
        frame: Runs as `load_frame` makes them.
        criteria: The thresholds.

    Returns:
        One row per check and budget, indexed by ``criterion``, with columns ``labels`` (its name),
        ``figure``, ``rule`` and ``result`` (``pass``, ``fail`` or ``not measured``).
    """
    runs = frame[(frame["method"] == BASELINE) & (frame["status"] == "ok")]
    runs = runs.assign(
        at_80pct_gap=runs["val_miou_at_80pct"] - runs["val_miou_last"],
        best_gap=runs["val_miou_best"] - runs["val_miou_last"],
    )
    # Without any run, one row per per-budget check (budget None selects nothing) says "not measured".
    budgets = sorted(runs["labels"].unique(), key=_budget_order) or [None]
    rows = []

    def values(labels: int | None, column: str) -> pd.Series:
        return runs.loc[runs["labels"] == labels, column].dropna()

    def check(criterion: str, labels: int | None, figure: str, rule: str, passed: bool | None) -> None:
        result = "not measured" if passed is None else "pass" if passed else "fail"
        rows.append({"criterion": criterion, "labels": "–" if labels is None else budget_name(labels),
                     "figure": figure, "rule": rule, "result": result})

    for labels in budgets:
        gap = values(labels, "at_80pct_gap")
        measured = len(gap) > 0
        check("converged: 80 % vs last", labels,
              f"|mean Δ| {abs(gap.mean()):.2f} (n={len(gap)})" if measured else "no val_miou_at_80pct",
              f"≤ {criteria.max_last_vs_80pct:.1f}",
              abs(gap.mean()) <= criteria.max_last_vs_80pct if measured else None)
        gap = values(labels, "best_gap")
        measured = len(gap) > 0
        check("converged: best − last", labels,
              f"mean {gap.mean():.2f}, max {gap.max():.2f}" if measured else "no runs",
              f"mean ≤ {criteria.max_best_minus_last:.1f}",
              gap.mean() <= criteria.max_best_minus_last if measured else None)
    at_all, small = values(ALL_LABELS, "val_miou_last"), values(criteria.small_budget, "val_miou_last")
    check("headroom: all", ALL_LABELS, f"mean {at_all.mean():.1f}" if len(at_all) else "no runs",
          f"≥ {criteria.min_miou_all:.1f}", at_all.mean() >= criteria.min_miou_all if len(at_all) else None)
    measured = len(at_all) > 0 and len(small) > 0
    gap_figure = f"mean {small.mean():.1f}, all − it {at_all.mean() - small.mean():.1f}"
    missing = criteria.small_budget if len(at_all) else "all"
    check(f"headroom: {criteria.small_budget} vs all", criteria.small_budget,
          gap_figure if measured else f"no runs at {missing}",
          f"≤ mean at all − {criteria.min_gap_to_all:.1f}",
          small.mean() <= at_all.mean() - criteria.min_gap_to_all if measured else None)
    for labels in budgets:
        miou = values(labels, "val_miou_last")
        measured = len(miou) >= 2
        check("noise: std over seeds", labels,
              f"{miou.std(ddof=1):.2f} (n={len(miou)})" if measured else f"n={len(miou)}",
              f"≤ {criteria.max_seed_std:.1f}", miou.std(ddof=1) <= criteria.max_seed_std if measured else None)
    return pd.DataFrame(rows).set_index("criterion")


def criteria_report(frame: pd.DataFrame, criteria: ProtocolCriteria = PROTOCOL_CRITERIA) -> str:
    """`protocol_criteria` as a markdown table under a one-line heading, with the counts of each result."""
    table = protocol_criteria(frame, criteria)
    counts = table["result"].value_counts()
    counts = ", ".join(f"{counts[r]} {r}" for r in ("pass", "fail", "not measured") if r in counts)
    heading = f"Protocol criteria of the embedded benchmark, {BASELINE} runs, validation mIoU (points): {counts}"
    return f"{heading}\n\n{markdown_table(table)}"


def _describe(values: Any) -> str:
    values = [str(v) for v in dict.fromkeys(values) if v is not None]
    return ", ".join(values) if values else "?"


def write_report(
    dirs: Sequence[str | Path], out: str | Path, best: bool = False, stream: IO[str] | None = None
) -> str:
    """Write ``runs.csv``, ``summary.md`` and ``miou_vs_labels.png`` into ``out``; print and return the summary."""
    stream = stream or sys.stdout
    frame = load_frame(dirs)
    out = Path(out)
    method_order = suite_order()
    metric = "val_miou_best" if best else "val_miou_last"
    if frame.empty:
        text = f"no results under {', '.join(map(str, dirs))}\n"
        print(text, file=stream, end="")
        return text
    runs = frame.assign(labels=frame["labels"].map(budget_name))  # `all` by name, as the tables say
    atomic_write_text(out / "runs.csv", runs.to_csv(index=False))
    seeds = ",".join(map(str, sorted(frame["seed"].unique())))
    header = (
        f"Dataset {_describe(frame['dataset'])}, profile {_describe(frame['profile'])}: {METRICS[metric]} (%), "
        f"mean ± std over seeds {seeds}"
    )
    parts = [f"# {header}", "", markdown_table(summary_table(frame, metric, method_order))]
    deltas = delta_table(frame, metric, method_order)
    if not deltas.empty:
        parts += ["", f"Δ over {BASELINE}, mean of the method − mean of {BASELINE} (points):", "",
                  markdown_table(deltas), "", SIGNAL_RULE]
    if frame["test_miou"].notna().any():
        parts += ["", "Test mIoU of the best-validation checkpoint (%):", "",
                  markdown_table(summary_table(frame, "test_miou", method_order))]
    failed = frame[frame["status"] != "ok"]
    if not failed.empty:
        parts += ["", f"{len(failed)} failed run(s), left out of the means:"]
        parts += [f"- {r.method} labels={budget_name(r.labels)} seed={r.seed}: {r.error}" for r in failed.itertuples()]
    mixed = frame.groupby("method")["settings_hash"].nunique()
    if (mixed > 1).any():
        parts += ["", f"Warning: runs made with different settings are mixed for {sorted(mixed[mixed > 1].index)} "
                  "(see settings_hash in runs.csv)."]
    text = "\n".join(parts) + "\n"
    atomic_write_text(out / "summary.md", text)
    title = f"{_describe(frame['dataset'])} ({_describe(frame['profile'])}): {METRICS[metric]}, seeds {seeds}"
    atomic_write_bytes(out / "miou_vs_labels.png", plot_miou(frame, metric, title, method_order))
    print(text, file=stream, end="")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/report.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", help="result directories (each holds runs/<method>/labels<N>/seed<S>/)")
    parser.add_argument("--best", action="store_true", help="best validation mIoU instead of the last step's")
    parser.add_argument("--out", default=None, help="where to write the tables (default: the one directory given)")
    parser.add_argument("--criteria", action="store_true",
                        help="print whether the supervised runs meet the protocol criteria; write nothing")
    args = parser.parse_args(argv)
    if args.out is None and len(args.dirs) > 1 and not args.criteria:
        print("error: several directories given: choose where the combined tables go with --out DIR", file=sys.stderr)
        return 2
    try:
        if args.criteria:
            frame = load_frame(args.dirs)
            print(criteria_report(frame) if not frame.empty else f"no results under {', '.join(args.dirs)}")
        else:
            write_report(args.dirs, args.out or args.dirs[0], best=args.best)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
