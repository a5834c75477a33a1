"""Tables and a plot from benchmark result directories.

    python benchmarks/report.py results/synthetic-default [more dirs ...] [--best] [--out DIR]

Reads every ``runs/<method>/labels<N>/seed<S>/result.json`` under the given directories (or a
directory's ``runs.csv`` when its run directories are gone; a run in several directories counts
once, the copy from the last directory given) and writes, into ``--out`` (default: the one
directory given):

- ``runs.csv``: one row per run (metrics, per-class IoU, protocol switches, cost, provenance);
  the validation mIoU at the last step, at the validation nearest to 80 % of the steps (equal to
  the last one for a run that had converged) and the best one;
- ``summary.md``: mIoU by method x label budget as ``mean ± std`` over seeds (sample std; a
  cell with fewer seeds than the grid shows ``n``; failed runs are left out and counted);
- ``miou_vs_labels.png``: one line per method over the label budgets (log axis), std as error bars.

The budget ``all`` (every train image labeled, ``labelsall/``) comes last in the tables, and in
the plot one step right of the largest budget (at twice it: the records do not give the pool size).

The metric is the validation mIoU at the last step, or the best one with ``--best``. When
the runs were tested, a second table gives the test mIoU of the best-validation checkpoint.
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
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/report.py` puts only benchmarks/ on the path
    sys.path.insert(0, str(REPO))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from benchmarks.run import ALL_LABELS, budget_name, parse_budget  # noqa: E402
from src.utils import atomic_write_bytes, atomic_write_text  # noqa: E402

METRICS = {
    "val_miou_last": "validation mIoU at the last step",
    "val_miou_at_80pct": "validation mIoU nearest to 80 % of the steps",
    "val_miou_best": "best validation mIoU",
    "test_miou": "test mIoU",
}
# Pseudo-label diagnostics at the last validation (src/pl_modules/diagnostics.py); empty for methods without.
DIAGNOSTIC_COLUMNS = ("diag_pseudo_acc", "diag_pseudo_miou", "diag_mask_ratio", "diag_mask_acc")
PROTOCOL_COLUMNS = (
    "dataset", "split_source", "split_strategy", "partial_labels", "crop_size", "batch_size_labeled",
    "batch_size_unlabeled", "eval_mode", "eval_resize", "test_split", "arch", "encoder", "max_steps", "precision",
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


def method_curves(ok: pd.DataFrame, metric: str, budgets: Sequence[int]) -> dict[str, pd.DataFrame]:
    """Per method, ``mean``/``std``/``count`` of ``metric`` at every budget: NaN where it has no run,
    so that its plotted line breaks there instead of joining the budgets on either side."""
    return {
        method: group.groupby("labels")[metric].agg(["mean", "std", "count"]).reindex(budgets)
        for method, group in ok.groupby("method")
    }


def budget_positions(budgets: Sequence[int]) -> dict[int, float]:
    """x of each budget on the plot's log axis: its size; ``all`` one step right of the largest
    budget, at twice it (the records do not give the train pool's size)."""
    largest = max([b for b in budgets if b != ALL_LABELS], default=1)
    return {b: float(largest * 2 if b == ALL_LABELS else b) for b in budgets}


def plot_miou(frame: pd.DataFrame, metric: str, title: str, method_order: Sequence[str] = ()) -> bytes:
    """PNG of mean ``metric`` against the label budget (log axis), one line per method, std error bars."""
    ok = frame[(frame["status"] == "ok") & frame[metric].notna()]
    figure, axis = plt.subplots(figsize=(6, 4))
    budgets = sorted(ok["labels"].unique(), key=_budget_order) if not ok.empty else []
    position = budget_positions(budgets)
    curves = method_curves(ok, metric, budgets)
    for method in _method_order(list(curves), method_order):
        stats = curves[method]
        x = [position[b] for b in stats.index]
        axis.errorbar(x, stats["mean"], yerr=stats["std"].fillna(0.0), marker="o", capsize=3, label=method)
    axis.set_xscale("log")
    if budgets:
        axis.set_xticks([position[b] for b in budgets], [budget_name(b) for b in budgets])
        axis.minorticks_off()
    axis.set_xlabel("labeled images")
    axis.set_ylabel("mIoU (%)")
    axis.set_title(textwrap.fill(title, 70), fontsize=9)
    axis.grid(alpha=0.3)
    if budgets:
        axis.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    return buffer.getvalue()


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
    args = parser.parse_args(argv)
    if args.out is None and len(args.dirs) > 1:
        print("error: several directories given: choose where the combined tables go with --out DIR", file=sys.stderr)
        return 2
    try:
        write_report(args.dirs, args.out or args.dirs[0], best=args.best)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
