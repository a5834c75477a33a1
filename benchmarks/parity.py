"""Parity of the suite's methods with their official code: one table per method.

    python benchmarks/parity.py --method reco --official /work/.mirror/lorenmt+reco/repo
    python benchmarks/parity.py --method unimatch --official /tmp/UniMatch --out benchmarks/results/parity

``--official`` is a fetched copy of the method's official repository (``SECTIONS`` names it): the
bare git directory the fetch tool leaves (the files the checks read are taken from its HEAD with
``git show``), or a work tree made from it, e.g. ``git --git-dir DIR worktree add /tmp/x HEAD``
or ``mkdir /tmp/x && git --git-dir DIR archive HEAD | tar -x -C /tmp/x``. The official functions
are loaded from there at run time (`Official`): whole files with importlib, or single definitions
and statement ranges parsed out of a file (their own imports of third-party modules run, imports
of the repository's other modules do not), so nothing of theirs lives in this repository and no
missing dependency of an unrelated file stops a check.

Both implementations get identical inputs. Where they draw random numbers, the official draws
are recorded and replayed through the suite's sampling points (the ReCo loss's ``sampler`` hook;
the suite's mask or anchor sampler replaced for one call), or many independent draws are
compared as distributions: mean +- std and Welch's t, and for gradients the cosine of the two
mean gradients against a floor, the cosine between two halves of the official draws (two
samples of the same distribution with half as many draws each).

Rows: the quantity compared; columns: suite, official, |diff| (or t), verdict. ``match``: within
tolerance (|diff| <= tol, |t| < `T_MAX`, cosine at least the floor); ``known: ...``: a departure
the suite documents (a ``# NOTE:`` or an option); ``DIFFERS``: anything else, and the exit status
is 1; ``not exposed``: the official copy lacks what the check needs (the section goes on).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import functools
import importlib.util
import inspect
import math
import random
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/parity.py` puts only benchmarks/ on the path
    sys.path.insert(0, str(REPO))

from benchmarks.bench_reco_loss import blob_labels, make_inputs  # noqa: E402
from src.datasets.base import IGNORE_INDEX  # noqa: E402
from src.losses import c3 as c3_losses  # noqa: E402
from src.losses.reco import reco_loss  # noqa: E402
from src.networks.segmenter import IMAGENET_MEAN, IMAGENET_STD, Segmenter  # noqa: E402
from src.pl_modules import c3semiseg as c3_module  # noqa: E402
from src.pl_modules import cps as cps_module  # noqa: E402
from src.pl_modules import fixmatch as fixmatch_module  # noqa: E402
from src.pl_modules import ops  # noqa: E402
from src.pl_modules import unimatch_v2 as v2_module  # noqa: E402
from src.pl_modules.c3semiseg import C3SemiSeg  # noqa: E402
from src.pl_modules.cps import CPS  # noqa: E402
from src.pl_modules.fixmatch import FixMatch, UnlabeledViews  # noqa: E402
from src.pl_modules.mean_teacher import MeanTeacher  # noqa: E402
from src.pl_modules.unimatch import UniMatch  # noqa: E402
from src.pl_modules.unimatch_v2 import UniMatchV2  # noqa: E402

T_MAX = 4.0  # |Welch t| below this is a match (two-sided p about 6e-5 per row under equal means)
TINY_ENCODER = "tu-test_resnet"


# ---------------------------------------------------------------------------------------- official code
class NotExposed(LookupError):
    """The official copy lacks a file, definition or statement that a check needs."""


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


class Official:
    """Read-only access to a fetched official repository (a bare git directory or a work tree).

    Args:
        path: The repository copy.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser().resolve()
        if not self.path.is_dir():
            raise ValueError(f"--official {path}: expected a fetched repository (bare git directory or work tree)")
        self.bare = (self.path / "HEAD").is_file() and (self.path / "objects").is_dir()
        self._files = tempfile.TemporaryDirectory(prefix="parity-") if self.bare else None
        self._modules: dict[str, ModuleType] = {}
        top = self._git("rev-parse", "--show-toplevel")
        inside = self.bare or (top is not None and Path(top.strip()).resolve() == self.path)
        head = self._git("rev-parse", "HEAD") if inside else None
        self.commit = head.strip() if head else "unknown (not a git checkout)"

    def _git(self, *args: str) -> str | None:
        where = ["--git-dir", str(self.path)] if self.bare else ["-C", str(self.path)]
        try:
            return subprocess.run(["git", *where, *args], capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return None

    def file(self, relpath: str) -> Path:
        """The path of ``relpath`` on disk (taken from HEAD into a temporary folder for a bare repository)."""
        if not self.bare:
            path = self.path / relpath
            if not path.is_file():
                raise NotExposed(relpath)
            return path
        path = Path(self._files.name) / relpath
        if not path.is_file():
            text = self._git("show", f"HEAD:{relpath}")
            if text is None:
                raise NotExposed(relpath)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        return path

    def source(self, relpath: str) -> str:
        return self.file(relpath).read_text()

    def module(self, relpath: str) -> ModuleType:
        """``relpath`` imported as a module of its own (for files that import only installed packages)."""
        if relpath not in self._modules:
            name = "official_" + re.sub(r"\W", "_", relpath)
            spec = importlib.util.spec_from_file_location(name, self.file(relpath))
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            self._modules[relpath] = module
        return self._modules[relpath]

    def function(self, relpath: str, name: str) -> Any:
        found = getattr(self.module(relpath), name, None)
        if found is None:
            raise NotExposed(f"{relpath}: {name}")
        return found

    def _internal(self, node: ast.Import | ast.ImportFrom, folder: str) -> bool:
        """Whether an import statement reads the repository's own modules (from its root or ``folder``)."""
        if isinstance(node, ast.ImportFrom):
            if node.level:
                return True
            tops = [node.module.split(".")[0]]
        else:
            tops = [alias.name.split(".")[0] for alias in node.names]
        prefixes = ("",) if folder in ("", ".") else ("", f"{folder}/")
        places = [f"{prefix}{top}{suffix}" for top in tops for prefix in prefixes
                  for suffix in ("", ".py")]
        if self.bare:
            return any(self._git("cat-file", "-e", f"HEAD:{place}") is not None for place in places)
        return any((self.path / place).exists() for place in places)

    def definitions(self, relpath: str, *names: str, extra: dict[str, Any] | None = None) -> SimpleNamespace:
        """Top-level classes or functions (``Class.method`` gives a method as a plain function) of one file.

        Only the file's imports of installed packages run first (an import that fails is skipped:
        the definitions asked for may not need it); ``extra`` supplies other names they use.
        """
        path = self.file(relpath)
        tree = ast.parse(path.read_text())
        namespace: dict[str, Any] = {"__name__": "official_" + re.sub(r"\W", "_", relpath), **(extra or {})}
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)) and not self._internal(node, str(Path(relpath).parent)):
                with contextlib.suppress(ImportError):
                    exec(compile(ast.Module([node], []), str(path), "exec"), namespace)
        found = {}
        for name in names:
            owner, _, member = name.rpartition(".")
            node = next((n for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))
                         and n.name == (owner or member)), None)
            if node is not None and owner:
                node = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == member), None)
            if node is None:
                raise NotExposed(f"{relpath}: {name}")
            exec(compile(ast.Module([node], []), str(path), "exec"), namespace)
            found[member] = namespace[member]
        return SimpleNamespace(**found)

    def statements(self, relpath: str, start: str, stop: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
        """The statements of one block of ``relpath`` from the first that begins with ``start`` to the
        next that begins with ``stop`` (whitespace ignored), as ``run(namespace) -> namespace``."""
        path = self.file(relpath)
        tree = ast.parse(path.read_text())
        first, last = _squash(start), _squash(stop)
        for node in ast.walk(tree):
            for field in ("body", "orelse", "finalbody"):
                block = getattr(node, field, None)
                if not isinstance(block, list):
                    continue
                for i, statement in enumerate(block):
                    if not _squash(ast.unparse(statement)).startswith(first):
                        continue
                    for j in range(i, len(block)):
                        if _squash(ast.unparse(block[j])).startswith(last):
                            code = compile(ast.Module(block[i : j + 1], []), str(path), "exec")

                            def run(namespace: dict[str, Any], code: Any = code) -> dict[str, Any]:
                                exec(code, namespace)
                                return namespace

                            return run
        raise NotExposed(f"{relpath}: statements {start!r} .. {stop!r}")


@contextlib.contextmanager
def recorded_calls(*targets: tuple[Any, str]) -> Iterator[list[tuple[str, tuple, dict, Any]]]:
    """Log ``(owner.name, args, kwargs, result)`` of every call of each ``getattr(owner, name)`` (they still run)."""
    log: list[tuple[str, tuple, dict, Any]] = []
    with contextlib.ExitStack() as stack:
        for owner, name in targets:
            original = getattr(owner, name)

            label = f"{getattr(owner, '__name__', type(owner).__name__)}.{name}"

            def wrapper(*args: Any, _original: Any = original, _name: str = label, **kwargs: Any) -> Any:
                result = _original(*args, **kwargs)
                log.append((_name, args, kwargs, result))
                return result

            stack.enter_context(mock.patch.object(owner, name, wrapper))
        yield log


@contextlib.contextmanager
def cuda_calls_stay_put() -> Iterator[None]:
    """NOTE: C3-SemiSeg's loss moves its buffers with ``.cuda()``; here ``Tensor.cuda`` returns the tensor
    itself, so its code runs on the CPU beside the suite's."""
    with mock.patch.object(torch.Tensor, "cuda", lambda self, *args, **kwargs: self):
        yield


def seed_all(seed: int) -> None:
    """The global RNGs the official code draws from."""
    torch.manual_seed(seed)
    np.random.seed(seed)


# ---------------------------------------------------------------------------------------- rows
@dataclass
class Row:
    quantity: str
    suite: str
    official: str
    gap: str
    verdict: str


def _show(value: Any) -> str:
    """A number as 6 significant digits, up to 6 numbers as a list of 3, more as a count."""
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
        value = torch.tensor(value, dtype=torch.float64)
    if isinstance(value, Tensor):
        value = value.detach().double().flatten()
        if value.numel() == 1:
            return f"{float(value):.6g}"
        if value.numel() <= 6:
            return "[" + ", ".join(f"{float(v):.3g}" for v in value) + "]"
        return f"{value.numel()} values"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _verdict(ok: bool, known: str | None) -> str:
    if ok:
        return "match"
    return f"known: {known}" if known else "DIFFERS"


def exact(quantity: str, suite: Any, official: Any, tol: float = 1e-5, known: str | None = None) -> Row:
    """Values (numbers or tensors) equal within ``tol``; NaN equals NaN."""
    s = torch.as_tensor(suite.detach() if isinstance(suite, Tensor) else suite, dtype=torch.float64).cpu()
    o = torch.as_tensor(official.detach() if isinstance(official, Tensor) else official, dtype=torch.float64).cpu()
    if s.shape != o.shape:
        return Row(quantity, f"shape {tuple(s.shape)}", f"shape {tuple(o.shape)}", "-", _verdict(False, known))
    both_nan = s.isnan() & o.isnan()
    diff = torch.where(both_nan, 0.0, (s - o).abs()).nan_to_num(nan=math.inf)
    gap = float(diff.max()) if diff.numel() else 0.0
    return Row(quantity, _show(suite), _show(official), f"{gap:.1e}", _verdict(gap <= tol, known))


def same(quantity: str, suite: Any, official: Any, known: str | None = None) -> Row:
    return Row(quantity, str(suite), str(official), "-", _verdict(suite == official, known))


def welch_t(a: Sequence[float] | Tensor, b: Sequence[float] | Tensor) -> float:
    """Welch's t of the difference of two sample means (0 for two identical constants)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    spread = math.sqrt(float(a.var() / len(a) + b.var() / len(b)))
    difference = float(a.mean() - b.mean())
    if spread == 0:
        return 0.0 if difference == 0 else math.copysign(math.inf, difference)
    return difference / spread


def distribution(quantity: str, suite: Any, official: Any, known: str | None = None) -> Row:
    """Two samples of one quantity: mean +- std each, Welch's t, match when ``|t| < T_MAX``."""
    s, o = torch.as_tensor(suite, dtype=torch.float64), torch.as_tensor(official, dtype=torch.float64)
    t = welch_t(s, o)
    return Row(quantity, f"{float(s.mean()):.4g} ± {float(s.std()):.2g}", f"{float(o.mean()):.4g} ± {float(o.std()):.2g}",
               f"t = {t:.2f}", _verdict(abs(t) < T_MAX, known))


def mean_gradient_cosine(quantity: str, suite: Tensor, official: Tensor) -> Row:
    """``suite``, ``official``: (calls, P) gradients. The cosine of their means must reach the floor, the
    cosine of the means of the official draws' two halves (same distribution, half the draws each)."""
    half = len(official) // 2
    cosine = float(F.cosine_similarity(suite.double().mean(0), official.double().mean(0), dim=0))
    floor = float(F.cosine_similarity(official[:half].double().mean(0), official[half:].double().mean(0), dim=0))
    return Row(quantity, f"cos = {cosine:.3f}", f"split-half floor {floor:.3f}", f"{cosine - floor:+.3f}",
               _verdict(cosine >= floor, None))


@dataclass(frozen=True)
class Settings:
    samples: int = 4000  # draws of a random mask per distribution
    loss_calls: int = 200  # calls of a stochastic loss per distribution


def guarded(title: str, rows: Callable[[], Iterable[Row]]) -> list[Row]:
    """The rows of one check, or one ``not exposed`` row when the official copy lacks what it needs."""
    try:
        return list(rows())
    except NotExposed as missing:
        return [Row(title, "-", "-", "-", f"not exposed ({missing})")]


def markdown(title: str, rows: Sequence[Row]) -> str:
    lines = [f"### {title}", "", "| quantity | suite | official | abs diff or t | verdict |", "|---|---|---|---|---|"]
    lines += [f"| {r.quantity} | {r.suite} | {r.official} | {r.gap} | {r.verdict} |" for r in rows]
    counts = {key: sum(r.verdict.startswith(key) for r in rows) for key in ("match", "known", "DIFFERS", "not exposed")}
    lines += ["", ", ".join(f"{n} {key}" for key, n in counts.items())]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- shared inputs
def normalise(images: Tensor) -> Tensor:
    """[0, 1] images to the ImageNet-normalised tensors the official codes work on."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def minus_one(labels: Tensor) -> Tensor:
    """The suite's ignore label 255 as ReCo's -1."""
    return torch.where(labels == IGNORE_INDEX, -1, labels)


def box_geometry(boxes: Tensor) -> dict[str, Tensor]:
    """Height, width, top and left of one axis-aligned box per (N, H, W) bool mask (True inside)."""
    rows, cols = boxes.any(2), boxes.any(1)
    height, width = rows.sum(1).double(), cols.sum(1).double()
    top = torch.where(height > 0, rows.double().argmax(1).double(), math.nan)
    left = torch.where(width > 0, cols.double().argmax(1).double(), math.nan)
    return {"height": height, "width": width, "top": top, "left": left}


def box_rows(name: str, suite: Tensor, official: Tensor, known: dict[str, str] | None = None) -> list[Row]:
    """Distribution rows of the box geometry of two (N, H, W) bool samples (True inside the box)."""
    s, o = box_geometry(suite), box_geometry(official)
    known = known or {}
    return [distribution(f"{name}: box {key}", s[key][~s[key].isnan()], o[key][~o[key].isnan()], known.get(key))
            for key in s]


# ---------------------------------------------------------------------------------------- ReCo
RECO = "module_list.py"


def reco_confidence_ce(official: Official) -> list[Row]:
    """`ops.confidence_weighted_ce` against ``compute_unsupervised_loss`` (lorenmt/reco module_list.py:52)."""
    unsupervised = official.function(RECO, "compute_unsupervised_loss")
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(3, 5, 24, 24, generator=gen)
    labels = torch.randint(0, 5, (3, 24, 24), generator=gen)
    labels[:, :4] = IGNORE_INDEX
    labels[2, :, :12] = IGNORE_INDEX
    confidences = torch.where(labels == IGNORE_INDEX, 0.0, 0.9 + 0.1 * torch.rand(3, 24, 24, generator=gen))
    logits_s, logits_o = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss_s, _ = ops.confidence_weighted_ce(logits_s, labels, confidences, 0.97)
    loss_o = unsupervised(logits_o, minus_one(labels), confidences, 0.97)
    (loss_s + loss_o).backward()
    nothing = torch.full_like(labels, IGNORE_INDEX)
    empty_s, _ = ops.confidence_weighted_ce(logits, nothing, torch.zeros_like(confidences), 0.97)
    empty_o = unsupervised(logits, minus_one(nothing), torch.zeros_like(confidences), 0.97)
    return [
        exact("confidence-weighted CE: loss", loss_s, loss_o),
        exact("confidence-weighted CE: gradient", logits_s.grad, logits_o.grad, tol=1e-7),
        exact("confidence-weighted CE: no valid pixel", empty_s, empty_o,
              known="the suite returns 0 where the reference's empty mean is NaN (METHODS.md 3)"),
    ]


def reco_inputs(seed: int, crop: int = 64) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Representations (N, D, h, w), labels and validity (N, h, w), probabilities (N, C, h, w) of a
    2 + 2 image batch (`benchmarks.bench_reco_loss.make_inputs`)."""
    args = argparse.Namespace(seed=seed, crop=crop, num_classes=6, labeled=2, unlabeled=2, dim=32)
    rep, labels, valid, probs = make_inputs(args, torch.device("cpu"))
    return rep.detach(), labels, valid, probs


def official_reco_loss(compute: Callable, rep: Tensor, labels: Tensor, valid: Tensor, probs: Tensor,
                       num_queries: int, num_negatives: int) -> Tensor:
    """The official loss on the suite's (labels, valid) layout: one-hot labels and a (N, 1, h, w) mask."""
    one_hot = F.one_hot(torch.where(valid, labels, 0), probs.shape[1]).permute(0, 3, 1, 2).float()
    return compute(rep, one_hot, valid[:, None].float(), probs, 0.97, 0.5, num_queries, num_negatives)


def replay_reco_draws(draws: list, labels: Tensor, valid: Tensor, probs: Tensor, num_queries: int,
                      num_negatives: int) -> Callable:
    """A `src.losses.reco.Sampler` that returns the official loss's recorded draws, translated.

    The official code walks the present classes in ascending order and, for each with hard pixels,
    draws its query positions (one ``torch.randint``), then its K negative classes among the
    others, which it rotates to start after itself, and, per query and rotated class, the key
    positions (``np.random.randint`` over that class's slice of the concatenated others).
    """
    present = [c for c in range(probs.shape[1]) if bool((valid & (labels == c)).any())]
    own = probs.gather(1, torch.where(valid, labels, 0)[:, None])[:, 0]
    with_hard = [i for i, c in enumerate(present) if bool((valid & (labels == c) & (own < 0.97)).any())]
    calls = iter(draws)
    queries, classes, positions = [], [], []
    for i in with_hard:
        name, _, _, drawn = next(calls)
        assert name == "torch.randint", name
        queries.append(drawn)
        others = [(i + 1 + j) % len(present) for j in range(len(present) - 1)]
        name, *_ = next(calls)
        assert name == "Categorical.sample", name
        row_classes, row_positions = [], []
        for _ in range(num_queries):
            query_classes, query_positions = [], []
            for j in others:
                name, _, kwargs, drawn = next(calls)
                assert name == "numpy.random.randint", name
                query_classes += [j] * len(drawn)
                query_positions += (np.asarray(drawn) - kwargs["low"]).tolist()
            row_classes.append(query_classes)
            row_positions.append(query_positions)
        classes.append(row_classes)
        positions.append(row_positions)
    replay = (torch.stack(queries), torch.tensor(classes), torch.tensor(positions))
    assert replay[1].shape[-1] == num_negatives

    def sampler(hard_counts: Tensor, *_: Any) -> tuple[Tensor, Tensor, Tensor]:
        assert len(hard_counts) == len(with_hard), "the suite finds other hard classes than the replay"
        return replay

    return sampler


def reco_loss_replay(official: Official, seed: int, num_queries: int, num_negatives: int) -> list[Row]:
    """`reco_loss` against ``compute_reco_loss`` (module_list.py:65) with the official draws replayed."""
    compute = official.function(RECO, "compute_reco_loss")
    rep, labels, valid, probs = reco_inputs(seed)
    rep_o, rep_s = rep.clone().requires_grad_(), rep.clone().requires_grad_()
    seed_all(seed)
    targets = ((torch, "randint"), (torch.distributions.categorical.Categorical, "sample"), (np.random, "randint"))
    with recorded_calls(*targets) as draws:
        loss_o = official_reco_loss(compute, rep_o, labels, valid, probs, num_queries, num_negatives)
    loss_o.backward()
    sampler = replay_reco_draws(draws, labels, valid, probs, num_queries, num_negatives)
    loss_s = reco_loss(rep_s, labels, valid, probs, strong_threshold=0.97, temperature=0.5,
                       num_queries=num_queries, num_negatives=num_negatives, sampler=sampler)
    loss_s.backward()
    where = f"Q={num_queries}, K={num_negatives}, seed {seed}"
    return [exact(f"ReCo loss, replayed draws ({where})", loss_s, loss_o),
            exact(f"ReCo loss gradient, replayed draws ({where})", rep_s.grad, rep_o.grad, tol=1e-6)]


def reco_loss_distribution(official: Official, settings: Settings) -> list[Row]:
    """`reco_loss` and ``compute_reco_loss`` (module_list.py:65), each with its own draws, on one input."""
    compute = official.function(RECO, "compute_reco_loss")
    rep, labels, valid, probs = reco_inputs(0)
    num_queries, num_negatives = 32, 64
    results = {}
    for side in ("suite", "official"):
        losses, grads = [], []
        for call in range(settings.loss_calls):
            leaf = rep.clone().requires_grad_()
            if side == "official":
                seed_all(call)
                loss = official_reco_loss(compute, leaf, labels, valid, probs, num_queries, num_negatives)
            else:
                loss = reco_loss(leaf, labels, valid, probs, num_queries=num_queries, num_negatives=num_negatives,
                                 generator=torch.Generator().manual_seed(call))
            loss.backward()
            losses.append(float(loss.detach()))
            grads.append(leaf.grad.flatten())
        results[side] = torch.tensor(losses), torch.stack(grads)
    where = f"Q={num_queries}, K={num_negatives}, {settings.loss_calls} independent draws each"
    return [
        distribution(f"ReCo loss ({where})", results["suite"][0], results["official"][0]),
        distribution("ReCo loss gradient norm", results["suite"][1].norm(dim=1), results["official"][1].norm(dim=1)),
        mean_gradient_cosine("ReCo loss: cosine of mean gradients", results["suite"][1], results["official"][1]),
    ]


def reco_mixing_replay(official: Official, mode: str) -> list[Row]:
    """``generate_unsup_data`` with its masks recorded, and the suite's `mix_unlabeled` given the same masks."""
    module = official.module(RECO)
    generate = official.function(RECO, "generate_unsup_data")
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, 32, 40, generator=gen)
    labels = torch.randint(0, 4, (3, 32, 40), generator=gen)
    labels[:, :, :5] = IGNORE_INDEX
    confidences = torch.where(labels == IGNORE_INDEX, 0.0, torch.rand(3, 32, 40, generator=gen))
    mask_maker = "generate_class_mask" if mode == "classmix" else "generate_cutout_mask"
    seed_all(0)
    with recorded_calls((module, mask_maker)) as masks:
        mixed_o = generate(normalise(images), minus_one(labels), confidences.clone(), mode=mode)
    keep = torch.stack([result for *_, result in masks]).bool()
    replaced = "classmix_masks" if mode == "classmix" else "box_masks"
    with mock.patch.object(ops, replaced, lambda *args, **kwargs: keep):
        mixed_s = ops.mix_unlabeled(mode, images, labels, confidences)
    return [
        exact(f"generate_unsup_data {mode}, official masks: images", normalise(mixed_s[0]), mixed_o[0]),
        exact(f"generate_unsup_data {mode}, official masks: labels", minus_one(mixed_s[1]), mixed_o[1], tol=0),
        exact(f"generate_unsup_data {mode}, official masks: confidences", mixed_s[2], mixed_o[2], tol=0),
    ]


def reco_box_distribution(official: Official, settings: Settings) -> list[Row]:
    """`ops.box_masks` against ``generate_cutout_mask`` (module_list.py:223), CutOut's and CutMix's box."""
    cutout_mask = official.function(RECO, "generate_cutout_mask")
    n, height, width = settings.samples, 48, 64
    seed_all(0)
    boxes_o = torch.stack([cutout_mask([height, width], ratio=2) == 0 for _ in range(n)])
    boxes_s = ~ops.box_masks(n, height, width, torch.Generator().manual_seed(0))
    return box_rows(f"half-area box {height}x{width}", boxes_s, boxes_o)


def reco_classmix_distribution(official: Official, settings: Settings) -> list[Row]:
    """One image with the values 0..3 and the ignore label: K = 5, floor(K/2) = 2 of them chosen."""
    class_mask = official.function(RECO, "generate_class_mask")
    n = settings.samples
    labels = torch.arange(5).repeat_interleave(8).view(1, 5, 8)  # row r holds value r
    labels[labels == 4] = IGNORE_INDEX
    seed_all(0)
    chosen_o = torch.stack([class_mask(minus_one(labels[0])).bool() for _ in range(n)])  # (n, 5, 8)
    chosen_s = ops.classmix_masks(labels.expand(n, -1, -1), torch.Generator().manual_seed(0))
    rows = [distribution("ClassMix: values chosen per image (K = 5)", chosen_s[:, :, 0].sum(1), chosen_o[:, :, 0].sum(1))]
    for row, value in enumerate(["0", "1", "2", "3", "ignore"]):
        rows.append(distribution(f"ClassMix: P(value {value} chosen)", chosen_s[:, row, 0].double(),
                                 chosen_o[:, row, 0].double()))
    return rows


def reco_ema(official: Official) -> list[Row]:
    """Six EMA updates of one student's copy: the official ``EMA`` object and the suite's `update_teacher`."""
    ema_class = official.function(RECO, "EMA")
    torch.manual_seed(0)
    module = MeanTeacher(num_classes=3, encoder_name=TINY_ENCODER, channels_last=False)
    ema = ema_class(module.student, 0.99)
    gen = torch.Generator().manual_seed(0)
    for step in range(6):
        with torch.no_grad():  # an optimizer step and a forward's BatchNorm statistics
            for tensor in [*module.student.parameters(), *module.student.buffers()]:
                if tensor.dtype.is_floating_point:
                    tensor.add_(torch.randn(tensor.shape, generator=gen))
        ema.update(module.student)
        module.update_teacher(step)  # base.on_train_batch_end passes global_step - 1: 0 after the first step
    params = lambda net: torch.cat([p.detach().flatten() for p in net.parameters()])  # noqa: E731
    buffers = lambda net: torch.cat([b.flatten().double() for b in net.buffers()])  # noqa: E731
    return [exact("EMA teacher parameters after 6 updates", params(module.teacher), params(ema.model), tol=1e-5),
            exact("EMA teacher BatchNorm buffers after 6 updates", buffers(module.teacher), buffers(ema.model), tol=0)]


def reco_rows(official: Official, settings: Settings) -> list[Row]:
    """lorenmt/reco module_list.py: the losses, the mixing of ``generate_unsup_data`` and the ``EMA``."""
    rows = guarded("confidence-weighted CE", lambda: reco_confidence_ce(official))
    for seed, queries, negatives in ((0, 32, 64), (1, 32, 64), (2, 256, 512)):
        rows += guarded("ReCo loss, replayed draws", functools.partial(reco_loss_replay, official, seed, queries,
                                                                       negatives))
    rows += guarded("ReCo loss, independent draws", lambda: reco_loss_distribution(official, settings))
    for mode in ("cutout", "cutmix", "classmix"):
        rows += guarded(f"generate_unsup_data {mode}", functools.partial(reco_mixing_replay, official, mode))
    rows += guarded("half-area boxes", lambda: reco_box_distribution(official, settings))
    rows += guarded("ClassMix masks", lambda: reco_classmix_distribution(official, settings))
    rows += guarded("EMA", lambda: reco_ema(official))
    return rows


# ---------------------------------------------------------------------------------------- FixMatch, UniMatch
DEEPLAB = "model/semseg/deeplabv3plus.py"


class OfficialForward(nn.Module):
    """The official ``DeepLabV3Plus.forward`` run on a suite `Segmenter`.

    Its ``backbone.base_forward`` returns the encoder maps at stride 4 and more (their ResNet's
    c1..c4, ``model/backbone/resnet.py`` ``base_forward``); its ``_decode(c1, c4)`` runs the suite's
    decoder and head on the full map list, the maps it was not given (finer, and c2, c3) clean.
    """

    def __init__(self, network: Segmenter, forward: Callable) -> None:
        super().__init__()
        self.network = network
        self._official_forward = forward
        self.backbone = SimpleNamespace(base_forward=self._base_forward)
        self._maps: list[Tensor] = []
        self._first = 0
        self.decoded: list[tuple[int, Tensor]] = []  # the last (index, map) pairs `_decode` was given

    def forward(self, images: Tensor, need_fp: bool = False) -> Any:
        return self._official_forward(self, images, need_fp)

    def _base_forward(self, images: Tensor) -> list[Tensor]:
        x, _, _ = self.network._prepare(images)
        self._maps = self.network.model.encoder(x)
        self._first = next(i for i, f in enumerate(self._maps) if 4 * f.shape[-1] <= x.shape[-1])
        return self._maps[self._first :]

    def _decode(self, c1: Tensor, c4: Tensor) -> Tensor:
        self.decoded = [(self._first, c1), (len(self._maps) - 1, c4)]
        copies = len(c1) // len(self._maps[0])
        maps = [torch.cat([f] * copies) for f in self._maps]
        maps[self._first], maps[-1] = c1, c4
        return self.network.model.segmentation_head(self.network.model.decoder(maps))


def dropped_maps(maps: Sequence[tuple[int, Tensor]], input_width: int) -> str:
    """The (index, map) pairs of a doubled decoder input whose clean and perturbed halves differ."""
    names = [f"#{i} (s{input_width // f.shape[-1]})" for i, f in maps if not torch.equal(*f.chunk(2))]
    return ", ".join(names) or "none"


def fp_level_rows(official: Official) -> list[Row]:
    """Which encoder maps the feature-perturbed stream drops: `Segmenter.forward_perturbed` against the
    official ``DeepLabV3Plus.forward`` (LiheYoung/UniMatch model/semseg/deeplabv3plus.py:38-46) on the
    same network, per architecture."""
    forward = official.definitions(DEEPLAB, "DeepLabV3Plus.forward").forward
    rows = []
    for arch, levels in (("DeepLabV3Plus", "reference"), ("Unet", "reference"), ("FPN", "reference"),
                         ("Unet", "all")):
        torch.manual_seed(0)
        segmenter = Segmenter(3, arch, TINY_ENCODER).train()
        images = torch.rand(2, 3, 64, 64)
        seen: list[list[tuple[int, Tensor]]] = []
        hook = segmenter.model.decoder.register_forward_pre_hook(
            lambda module, args: seen.append(list(enumerate(args[0]))))
        segmenter.forward_perturbed(images, 0.5, levels)
        hook.remove()
        adapter = OfficialForward(segmenter, forward)
        adapter(images, True)
        known = "fp_levels='all', a documented option, drops every map a U-Net reads" if levels == "all" else None
        rows.append(same(f"feature perturbation: encoder maps dropped, {arch}, fp_levels={levels}",
                         dropped_maps(seen[0], 64), dropped_maps(adapter.decoded, 64), known))
    return rows


def cutmix_box_distribution(official: Official, settings: Settings) -> list[Row]:
    """`ops.cutmix_boxes` against ``obtain_cutmix_box`` (LiheYoung/UniMatch dataset/transform.py:66)."""
    obtain = official.definitions("dataset/transform.py", "obtain_cutmix_box").obtain_cutmix_box
    n, size = settings.samples, 64
    seed_all(0)
    random.seed(0)  # the official box draws whether to apply from the random module
    boxes_o = torch.stack([obtain(size, p=0.5) for _ in range(n)]).bool()
    boxes_s = ops.cutmix_boxes(n, size, size, torch.Generator().manual_seed(0), p=0.5)
    applied_s, applied_o = boxes_s.flatten(1).any(1), boxes_o.flatten(1).any(1)
    rows = [distribution("CutMix box: applied", applied_s.double(), applied_o.double())]
    return rows + box_rows(f"CutMix box {size}x{size} (applied ones)", boxes_s[applied_s], boxes_o[applied_o])


def weak_to_strong_step(official: Official, method: type[FixMatch], script: str) -> list[Row]:
    """One training step of FixMatch / UniMatch on the same network and inputs, the official step's
    statements (``script``, from the mix batch's eval-mode prediction to the total loss) beside the
    suite's ``compute_losses`` with its views fixed."""
    forward = official.definitions(DEEPLAB, "DeepLabV3Plus.forward").forward
    step = official.statements(script, "with torch.no_grad(): model.eval()", "loss = ")
    ratio = official.statements(script, "mask_ratio =", "mask_ratio =")
    cfg = yaml.safe_load(official.source("configs/pascal.yaml"))
    two_views = method.num_strong_views == 2
    torch.manual_seed(0)
    module = method(num_classes=3, arch="DeepLabV3Plus", encoder_name=TINY_ENCODER, channels_last=False,
                    confidence_threshold=cfg["conf_thresh"], mix_source="view").train()
    with torch.no_grad():  # a confident network, so that both sides of the threshold occur
        module.student.model.segmentation_head[0].weight.mul_(40)
    model = OfficialForward(copy.deepcopy(module.student), forward)
    views = method.num_strong_views
    gen = torch.Generator().manual_seed(0)
    image = lambda: torch.rand(2, 3, 64, 64, generator=gen)  # noqa: E731
    images_l, weak, mix = image(), image(), image()
    strong, sources = [image() for _ in range(views)], [image() for _ in range(views)]
    mask_x = torch.randint(0, 3, (2, 64, 64), generator=gen)
    mask_x[:, :6] = IGNORE_INDEX
    ignore_mask = torch.zeros(2, 64, 64, dtype=torch.long)
    ignore_mask[0, :, 50:] = IGNORE_INDEX  # padding of a shrunk crop
    ignore_mask_mix = torch.zeros_like(ignore_mask)
    ignore_mask_mix[1, 40:] = IGNORE_INDEX
    obtain = official.definitions("dataset/transform.py", "obtain_cutmix_box").obtain_cutmix_box
    seed_all(3)
    random.seed(3)
    boxes = [torch.stack([obtain(64, p=1.0) for _ in range(2)]) for _ in range(views)]
    namespace = {"torch": torch, "model": model, "cfg": cfg, "img_x": images_l, "mask_x": mask_x, "img_u_w": weak,
                 "img_u_w_mix": mix, "ignore_mask": ignore_mask, "ignore_mask_mix": ignore_mask_mix,
                 "criterion_l": nn.CrossEntropyLoss(**cfg["criterion"]["kwargs"]),
                 "criterion_u": nn.CrossEntropyLoss(reduction="none")}
    suffixes = ["1", "2"] if two_views else [""]  # fixmatch.py names its one view img_u_s, cutmix_box
    for k, suffix in enumerate(suffixes):
        namespace.update({f"img_u_s{suffix}": strong[k].clone(), f"img_u_s{suffix}_mix": sources[k],
                          f"cutmix_box{suffix}": boxes[k]})
    torch.manual_seed(7)  # the dropout draws, in the same order on both sides
    step(namespace)
    ratio(namespace)
    namespace["loss"].backward()

    pasted = [ops.mix_by_mask(box.bool(), source, view) for box, source, view in zip(boxes, sources, strong)]
    nothing = torch.full_like(mask_x, IGNORE_INDEX)
    fixed = UnlabeledViews(weak, nothing, ignore_mask != IGNORE_INDEX, pasted, [box.bool() for box in boxes], mix,
                           nothing, ignore_mask_mix != IGNORE_INDEX)
    module.make_views = lambda unlabeled: fixed  # what FixMatch.make_views builds, from these draws
    torch.manual_seed(7)
    losses = module.compute_losses({"labeled": {"image": images_l, "mask": mask_x}, "unlabeled": {"image": weak}})
    losses["loss"].backward()

    rows = [exact("strong view 1 after the CutMix paste", pasted[0], namespace[f"img_u_s{suffixes[0]}"], tol=0),
            exact("supervised loss", losses["loss_sup"], namespace["loss_x"])]
    if two_views:
        rows += [exact("strong-view loss, mean of the two views", losses["loss_strong"],
                       (namespace["loss_u_s1"] + namespace["loss_u_s2"]) / 2),
                 exact("feature-perturbed loss", losses["loss_fp"], namespace["loss_u_w_fp"])]
    else:
        rows.append(exact("strong-view loss", losses["loss_unsup"], namespace["loss_u_s"]))
    student = dict(module.student.named_parameters())
    grads_o = torch.cat([p.grad.flatten() for name, p in model.network.named_parameters()])
    grads_s = torch.cat([student[name].grad.flatten() for name, _ in model.network.named_parameters()])
    stats = lambda net: torch.cat([b.flatten().double() for n, b in net.named_buffers() if "running" in n])  # noqa: E731
    return rows + [
        exact(f"total loss (weights of {script})", losses["loss"], namespace["loss"]),
        exact("mask ratio (confident share of the weak view's valid pixels)", losses["mask_ratio"],
              namespace["mask_ratio"]),
        exact("gradient of every student parameter", grads_s, grads_o, tol=1e-6),
        exact("BatchNorm running statistics after the step", stats(module.student), stats(model.network), tol=1e-6),
    ]


def fixmatch_rows(official: Official, settings: Settings) -> list[Row]:
    """LiheYoung/UniMatch fixmatch.py:132-166 (its FixMatch baseline)."""
    rows = guarded("training step", lambda: weak_to_strong_step(official, FixMatch, "fixmatch.py"))
    return rows + guarded("CutMix boxes", lambda: cutmix_box_distribution(official, settings))


def unimatch_rows(official: Official, settings: Settings) -> list[Row]:
    """LiheYoung/UniMatch unimatch.py:135-188 and model/semseg/deeplabv3plus.py:45."""
    rows = guarded("training step", lambda: weak_to_strong_step(official, UniMatch, "unimatch.py"))
    rows += guarded("feature perturbation", lambda: fp_level_rows(official))
    return rows + guarded("CutMix boxes", lambda: cutmix_box_distribution(official, settings))


# ---------------------------------------------------------------------------------------- C3-SemiSeg
C3_TRAINER = "trainer/Ctrainer.py"
C3_LOSSES = "utils/losses.py"


def c3_consistency(official: Official) -> list[Row]:
    """`soft_consistency_loss` against the consistency statement (Amandaynzhou/C3-SemiSeg trainer/Ctrainer.py:348)."""
    consistency = official.statements(C3_TRAINER, "loss = (- teacher_seg * log_probs", "loss = (- teacher_seg")
    gen = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(3, 19, 16, 24, generator=gen)
    teacher = (2 * torch.randn(3, 19, 16, 24, generator=gen)).softmax(1)
    kept = torch.rand(3, 16, 24, generator=gen) < 0.6
    logits_s, logits_o = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss_s = c3_losses.soft_consistency_loss(logits_s, teacher, kept, class_mean=True)
    namespace = consistency({"teacher_seg": teacher, "log_probs": F.log_softmax(logits_o, dim=1),
                             "ignore_mask_unlabeled": kept[:, None].float()})
    (loss_s + namespace["loss"]).backward()
    return [exact("soft consistency loss", loss_s, namespace["loss"]),
            exact("soft consistency gradient", logits_s.grad, logits_o.grad, tol=1e-8)]


def c3_thresholds(official: Official) -> list[Row]:
    """`update_class_thresholds` and `class_balanced_mask` against ``update_ema_cb_threshold`` and
    ``get_cb_threshould_mask`` (dataloaders/cityscapes.py:318, 346; 19 classes are hard-coded there)."""
    found = official.definitions("dataloaders/cityscapes.py", "PseudoCityScapesDataset.update_ema_cb_threshold",
                                 "PseudoCityScapesDataset.get_cb_threshould_mask")
    num_classes, rows = 19, []
    gen = torch.Generator().manual_seed(0)
    bias = torch.zeros(num_classes)
    bias[:7] = 4.0  # 7 classes are predicted somewhere, the others keep their thresholds
    for gamma, start in ((0.0, 0.9), (1.0, 0.9), (0.0, 0.0)):
        state = SimpleNamespace(end_percent=0.8, cls_conf_threshold=[start] * num_classes)
        thresholds = torch.full((num_classes,), start, dtype=torch.float64)
        for _ in range(4):
            probs = (3 * torch.randn(2, num_classes, 16, 16, generator=gen) + bias.view(1, -1, 1, 1)).softmax(1)
            found.update_ema_cb_threshold(state, probs, ema=0.9, gamma=gamma)
            confidences, predictions = probs.max(1)
            thresholds = c3_losses.update_class_thresholds(thresholds, confidences, predictions, 0.8, gamma, 0.9)
        rows.append(exact(f"class-balanced thresholds after 4 updates (gamma {gamma}, start {start})", thresholds,
                          torch.tensor(state.cls_conf_threshold), tol=1e-7))
    mask_o = found.get_cb_threshould_mask(state, probs)[:, 0].bool()
    mask_s = c3_losses.class_balanced_mask(confidences, predictions, thresholds.float())
    rows.append(exact("class-balanced mask", mask_s, mask_o, tol=0))
    return rows


def c3_contrast_inputs(seed: int) -> dict[str, Tensor]:
    """Labeled + unlabeled batch: full-size labels (255 on unkept pixels), logits, embeddings, keys."""
    gen = torch.Generator().manual_seed(seed)
    labels = blob_labels(4, 64, 4, gen)
    labels[2:][torch.rand(2, 64, 64, generator=gen) < 0.2] = IGNORE_INDEX  # pseudo-labels under the thresholds
    logits = torch.randn(4, 4, 64, 64, generator=gen) + 3 * F.one_hot(labels.clamp(max=3), 4).permute(0, 3, 1, 2)
    embeddings = torch.randn(4, 8, 16, 16, generator=gen)
    keys = torch.randn(4, 8, 16, 16, generator=gen)
    return {"labels": labels, "logits": logits, "embeddings": embeddings, "keys": keys}


def c3_contrast(official: Official, cross_set: bool, seed: int = 0) -> list[Row]:
    """The pixel contrastive loss: official anchors replayed into the suite's loss, and the anchor rule.

    The anchors the official loss draws are read back by running it once on index-coded features
    (pixel i's feature is (i + 1, 1), normalised), under the same seed as the real call.
    """
    contrast = official.definitions(C3_LOSSES, "PixelContrastLoss").PixelContrastLoss(temperature=0.15, neg_num=20)
    predict = official.statements(C3_TRAINER, "pred_seg = torch.nn.functional.interpolate(pred_seg.float()",
                                  "pred_seg = torch.max(pred_seg, dim=1)[1]")
    inputs = c3_contrast_inputs(seed)
    labels, logits = inputs["labels"], inputs["logits"]
    if not cross_set:  # the labeled-only self-contrast of the supervised phase
        labels, logits = labels[:2], logits[:2]
        inputs = {k: v[:2] for k, v in inputs.items()}
    predictions = predict({"torch": torch, "pred_seg": logits, "feat_emb_label": inputs["embeddings"]})["pred_seg"]
    number, _, height, width = inputs["embeddings"].shape
    coded = torch.stack([torch.arange(1, number * height * width + 1).double().view(number, height, width),
                         torch.ones(number, height, width, dtype=torch.float64)], 1)
    keyword = {"labels": labels, "predict": predictions}

    def call(features: Tensor, keys: Tensor) -> Any:
        seed_all(11)
        with cuda_calls_stay_put():
            return contrast(feats=features, feats_t=keys if cross_set else None, **keyword)

    # The last argument of the contrast functions is the rows' classes; their first the anchors.
    with mock.patch.object(type(contrast), "_contrastive_pair" if cross_set else "_contrastive",
                           lambda self, anchors, *rest: (anchors, rest[-1])):
        anchors, classes = call(coded, coded)
    pixels = (anchors[..., 0] / anchors[..., 1]).round().long() - 1  # (A, V) raster indices
    classes = classes.long()
    embeddings_s = inputs["embeddings"].clone().requires_grad_()
    embeddings_o = inputs["embeddings"].clone().requires_grad_()
    keys_s = inputs["keys"].detach() if cross_set else embeddings_s
    loss_o = call(embeddings_o, inputs["keys"])
    with mock.patch.object(c3_losses, "sample_anchors", lambda *args, **kwargs: (pixels, classes)):
        loss_s, _ = c3_losses.contrastive_from_logits(embeddings_s, keys_s, labels, logits, 20, 0.15,
                                                      exclude_class_zero=True)
    (loss_s + loss_o).backward()
    kind = "cross-set" if cross_set else "labeled-only"
    small_labels = c3_losses.downsample_nearest(labels, (height, width))
    suite_pixels, suite_classes = c3_losses.sample_anchors(small_labels, predictions, 20, exclude_class_zero=True,
                                                           generator=torch.Generator().manual_seed(0))
    default_rows = len(c3_losses.sample_anchors(small_labels, predictions, 20)[1])

    def rows_of(pixels: Tensor, classes: Tensor) -> list[tuple[int, int]]:
        return [(int(p) // (height * width), int(c)) for p, c in zip(pixels[:, 0], classes)]

    def hard_counts(pixels: Tensor, classes: Tensor) -> list[int]:
        wrong = predictions.flatten()[pixels] != classes[:, None]
        return wrong.sum(1).tolist()

    flat_labels = small_labels.flatten()
    return [
        exact(f"{kind} contrastive loss, official anchors", loss_s, loss_o),
        exact(f"{kind} contrastive gradient, official anchors", embeddings_s.grad, embeddings_o.grad, tol=1e-7),
        same(f"{kind} anchors: (image, class) rows", rows_of(suite_pixels, suite_classes), rows_of(pixels, classes)),
        same(f"{kind} anchors: hard (mispredicted) anchors per row", hard_counts(suite_pixels, suite_classes),
             hard_counts(pixels, classes)),
        same(f"{kind} anchors: every anchor carries its row's class",
             bool((flat_labels[suite_pixels] == suite_classes[:, None]).all()),
             bool((flat_labels[pixels] == classes[:, None]).all())),
        same(f"{kind} anchors: no pixel twice in a row",
             all(len(set(r.tolist())) == len(r) for r in suite_pixels), all(len(set(r.tolist())) == len(r) for r in pixels)),
        same(f"{kind} anchor rows with the suite's default", default_rows, len(classes),
             known="exclude_class_zero=False: class 0 may be an anchor class (the reference's x > 0 filter, "
                   "treated as a bug)"),
    ]


def c3_cross_set_cutmix(official: Official) -> list[Row]:
    """Permutation, CutMix and un-mixing of the student batch: the official statements of
    ``_forward_semi_train`` and ``_forward_cutmix`` beside `ops.cross_set_cutmix_forward`, same box and seed."""
    misc = official.definitions("utils/misc.py", "generate_ignore_region_cutmix")
    trainer = official.definitions(C3_TRAINER, "CTrainer._forward_cutmix", extra=vars(misc))
    mixing = official.statements(C3_TRAINER, "total_num = num_unlabeled + num_labeled",
                                 "pred_seg = pred_seg[idx_unshuffle]")
    generator_class = official.definitions("dataloaders/transforms.py", "MaskGenerator", "BoxMaskGenerator")
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)).eval()
    gen = torch.Generator().manual_seed(0)
    labeled, unlabeled = torch.rand(2, 3, 32, 48, generator=gen), torch.rand(2, 3, 32, 48, generator=gen)
    np.random.seed(0)
    box = generator_class.BoxMaskGenerator().generate_params(2, (32, 48))  # (2, 1, H, W), 0 inside the box
    stub = SimpleNamespace(args=SimpleNamespace(cutmix_ablation=False), contrastive=False, device="cpu",
                           cutmix_generator=SimpleNamespace(generate_params=lambda *args, **kwargs: box))
    stub._forward_cutmix = functools.partial(trainer._forward_cutmix, stub)
    stub.student = network
    torch.manual_seed(5)
    with cuda_calls_stay_put(), torch.no_grad():
        namespace = mixing({"torch": torch, "self": stub, "labeled_data": labeled, "unlabeled_data_student": unlabeled,
                            "num_labeled": 2, "num_unlabeled": 2, "epoch": 1})
    keep = torch.from_numpy(box[:, 0]) == 1
    torch.manual_seed(5)
    with mock.patch.object(ops, "box_masks", lambda *args, **kwargs: keep), torch.no_grad():
        logits_s, _ = ops.cross_set_cutmix_forward(lambda x: (network(x), None), torch.cat([labeled, unlabeled]))
    return [exact("cross-set CutMix: un-mixed, un-permuted outputs (official box and permutation)", logits_s,
                  namespace["pred_seg"], tol=1e-6)]


def c3_box_distribution(official: Official, settings: Settings) -> list[Row]:
    """`ops.box_masks` against ``BoxMaskGenerator`` with its defaults (dataloaders/transforms.py:1012)."""
    generator_class = official.definitions("dataloaders/transforms.py", "MaskGenerator", "BoxMaskGenerator")
    n, height, width = settings.samples, 48, 64
    np.random.seed(0)
    boxes_o = torch.from_numpy(generator_class.BoxMaskGenerator().generate_params(n, (height, width))[:, 0] == 0)
    boxes_s = ~ops.box_masks(n, height, width, torch.Generator().manual_seed(0))
    note = "ReCo's half-area box, where the reference draws a log-uniform aspect (NOTE in ops.cross_set_cutmix_forward)"
    rows = box_rows(f"cross-set CutMix box {height}x{width}", boxes_s, boxes_o,
                    known={key: note for key in ("height", "width", "top", "left")})
    area = lambda boxes: boxes.flatten(1).double().mean(1)  # noqa: E731
    return rows + [distribution("cross-set CutMix box: area fraction", area(boxes_s), area(boxes_o), known=note)]


def c3_schedules(official: Official) -> list[Row]:
    """`ops.sigmoid_rampup` against ``sigmoid_rampup`` (utils/lr_scheduler.py:64), and the decays of
    `C3SemiSeg.update_teacher` against ``_update_teacher`` (trainer/Ctrainer.py:633), whose counter
    advances by the world size before each update (Ctrainer.py:208, 221)."""
    rampup = official.function("utils/lr_scheduler.py", "sigmoid_rampup")
    update = official.definitions(C3_TRAINER, "CTrainer._update_teacher")._update_teacher
    points = [0, 1, 250, 999, 1000, 1500, 4000, 16000, 20000]
    rows = [exact("sigmoid ramp-up over 16000 (0 ... 20000)", [ops.sigmoid_rampup(p, 16000) for p in points],
                  [rampup(p, 16000) for p in points], tol=1e-12)]
    torch.manual_seed(0)
    start = 3
    module = C3SemiSeg(num_classes=3, encoder_name=TINY_ENCODER, channels_last=False, unlabeled_start_step=start)
    decays_s: list[float] = []
    with mock.patch.object(c3_module, "ema_update", lambda teacher, student, decay: decays_s.append(decay)):
        for step in range(start, start + 6):
            module.update_teacher(step)
    decays_s = decays_s[::2]  # the network, then its projection head, with one decay
    for world_size in (1, 4):
        decays_o: list[float] = []
        stub = SimpleNamespace(ema=True, start_ema_iter=start * world_size, args=SimpleNamespace(world_size=world_size),
                               contrastive=False, ema_alpha=0.99, student=None, teacher=None,
                               _copy_model=lambda student, teacher: decays_o.append(0.0),
                               _ema_=lambda teacher, student, alpha: decays_o.append(alpha))
        for iteration in range(start + 1, start + 7):  # the counter runs ahead by world_size before each update
            update(stub, iteration * world_size)
        rows.append(exact(f"EMA teacher decay, first 6 unlabeled-phase steps (world size {world_size})",
                          torch.tensor(decays_s), torch.tensor(decays_o), tol=1e-9))
    return rows


def c3_rows(official: Official, settings: Settings) -> list[Row]:
    """Amandaynzhou/C3-SemiSeg as far as its unfinished release allows (METHODS.md 6): its losses, thresholds,
    cross-set CutMix and schedules run on their own; its training step does not (see the results README)."""
    rows = guarded("soft consistency", lambda: c3_consistency(official))
    rows += guarded("class-balanced thresholds", lambda: c3_thresholds(official))
    rows += guarded("cross-set contrast", lambda: c3_contrast(official, cross_set=True))
    rows += guarded("labeled-only contrast", lambda: c3_contrast(official, cross_set=False))
    rows += guarded("cross-set CutMix", lambda: c3_cross_set_cutmix(official))
    rows += guarded("cross-set CutMix box", lambda: c3_box_distribution(official, settings))
    return rows + guarded("ramp-up and EMA", lambda: c3_schedules(official))


# ---------------------------------------------------------------------------------------- UniMatch V2
V2_SCRIPT, V2_DPT = "unimatch_v2.py", "model/semseg/dpt.py"
# A random-init 6-block, 64-wide ViT (timm's test_vit) with a small DPT head, on 56-pixel crops.
TINY_VIT = {"arch": "DPT", "encoder_name": "tu-test_vit",
            "model_options": {"patch_size": 14, "decoder_intermediate_channels": [16, 16, 32, 32],
                              "decoder_fusion_channels": 16}}


def official_complementary_masks(official: Official) -> Callable[[int, int], Tensor]:
    """``masks(batch, width)``: the channel factors the official ``DPT.forward`` multiplies its token maps by
    under ``comp_drop`` (LiheYoung/UniMatch-V2 model/semseg/dpt.py:148-161), drawn from the global RNG by
    its own code on a stand-in backbone whose tokens are ones."""
    forward = official.definitions(V2_DPT, "DPT.forward").forward

    def masks(batch: int, width: int) -> Tensor:
        seen: list[Tensor] = []

        def head(features: Iterable[Tensor], patch_h: int, patch_w: int) -> Tensor:
            seen.append(next(iter(features))[:, 0])  # (batch, 1, width) ones times the mask
            return torch.zeros(batch, 1, patch_h, patch_w)

        stub = SimpleNamespace(binomial=torch.distributions.binomial.Binomial(probs=0.5), encoder_size="small",
                               intermediate_layer_idx={"small": [0]}, head=head,
                               backbone=SimpleNamespace(get_intermediate_layers=lambda x, idx: [torch.ones(batch, 1, width)]))
        with cuda_calls_stay_put():
            forward(stub, torch.zeros(batch, 3, 14, 14), comp_drop=True)
        return seen[0]

    return masks


def complementary_dropout_rows(official: Official, settings: Settings) -> list[Row]:
    """`complementary_dropout_scales` against the official masks, batches of 4 images x 2 views, width 64."""
    masks = official_complementary_masks(official)
    batches = max(settings.samples // 8, 4)
    seed_all(0)
    official_draws = torch.stack([masks(8, 64) for _ in range(batches)])  # (batches, 8, 64)
    gen = torch.Generator().manual_seed(0)
    suite_draws = torch.stack([v2_module.complementary_dropout_scales(4, 64, 0.5, generator=gen)
                               for _ in range(batches)])

    def properties(draws: Tensor) -> tuple[bool, list[float], Tensor, Tensor]:
        first, second = draws.chunk(2, dim=1)  # (batches, 4, 64) each
        clean = (first == 1).all(-1)  # (batches, 4)
        kept = (first[~clean] == 2).double().mean(-1)  # per dropped pair, the share the first view keeps
        return bool(torch.equal(first + second, torch.full_like(first, 2.0))), draws.unique().tolist(), clean, kept

    (comp_s, values_s, clean_s, kept_s), (comp_o, values_o, clean_o, kept_o) = properties(suite_draws), \
        properties(official_draws)
    return [
        same("Complementary Dropout: second view's factors = 2 - first view's", comp_s, comp_o),
        same("Complementary Dropout: factors used", values_s, values_o),
        distribution("Complementary Dropout: pairs left clean per batch of 4", clean_s.sum(1), clean_o.sum(1)),
        distribution("Complementary Dropout: share of a dropped pair's channels the first view keeps", kept_s,
                     kept_o),
    ]


def unimatch_v2_step(official: Official) -> list[Row]:
    """One UniMatch V2 step (LiheYoung/UniMatch-V2 unimatch_v2.py:170-204) on copies of the suite's student
    and teacher, beside the suite's ``compute_losses`` with its views fixed and its Complementary Dropout
    masks drawn by the official code. With two images per batch the reference's partner, ``flip(0)``,
    is the suite's ``roll(-1)``."""
    step = official.statements(V2_SCRIPT, "with torch.no_grad(): pred_u_w = model_ema(img_u_w)",
                               "loss = (loss_x + loss_u_s) / 2.0")
    ratio = official.statements(V2_SCRIPT, "mask_ratio =", "mask_ratio =")
    cfg = yaml.safe_load(official.source("configs/pascal.yaml"))
    masks = official_complementary_masks(official)
    torch.manual_seed(0)
    module = UniMatchV2(num_classes=3, channels_last=False, confidence_threshold=cfg["conf_thresh"], **TINY_VIT)
    module.train()  # the teacher is a copy of the student: about 3/4 of its weak-view pixels reach 0.95
    student, teacher = copy.deepcopy(module.student), copy.deepcopy(module.teacher).eval()
    drawn: list[Tensor] = []

    def model(images: Tensor, comp_drop: bool = False) -> Tensor:
        if not comp_drop:
            return student(images)
        drawn.append(masks(len(images), student.encoder_width))
        return student.forward_channel_scaled(images, drawn[-1])

    gen = torch.Generator().manual_seed(0)
    image = lambda: torch.rand(2, 3, 56, 56, generator=gen)  # noqa: E731
    images_l, weak, strong = image(), image(), [image(), image()]
    mask_x = torch.randint(0, 3, (2, 56, 56), generator=gen)
    mask_x[:, :6] = IGNORE_INDEX
    ignore_mask = torch.zeros(2, 56, 56, dtype=torch.long)
    ignore_mask[0, :, 44:] = IGNORE_INDEX
    obtain = official.definitions("dataset/transform.py", "obtain_cutmix_box").obtain_cutmix_box
    seed_all(3)
    random.seed(3)
    boxes = [torch.stack([obtain(56, p=1.0) for _ in range(2)]) for _ in range(2)]
    namespace = {"torch": torch, "model": model, "model_ema": teacher, "cfg": cfg, "img_x": images_l, "mask_x": mask_x,
                 "img_u_w": weak, "img_u_s1": strong[0].clone(), "img_u_s2": strong[1].clone(),
                 "ignore_mask": ignore_mask, "cutmix_box1": boxes[0], "cutmix_box2": boxes[1],
                 "criterion_l": nn.CrossEntropyLoss(**cfg["criterion"]["kwargs"]),
                 "criterion_u": nn.CrossEntropyLoss(reduction="none")}
    seed_all(7)
    step(namespace)
    ratio(namespace)
    namespace["loss"].backward()

    pasted = [ops.mix_by_mask(box.bool(), view.roll(-1, 0), view) for box, view in zip(boxes, strong)]
    fixed = UnlabeledViews(weak, torch.full_like(mask_x, IGNORE_INDEX), ignore_mask != IGNORE_INDEX, pasted,
                           [box.bool() for box in boxes], None, None, None)
    module.make_views = lambda unlabeled: fixed  # what FixMatch.make_views builds with mix_source="batch"
    # The suite's masks come from the official code too, from the same RNG state (smp's DPT head has a
    # dropout, so both sides must draw alike): the same masks, and the same draws after them.
    replayed: list[Tensor] = []

    def official_scales(num_pairs: int, channels: int, *args: Any, **kwargs: Any) -> Tensor:
        replayed.append(masks(2 * num_pairs, channels))
        return replayed[-1]

    seed_all(7)
    with mock.patch.object(v2_module, "complementary_dropout_scales", official_scales):
        losses = module.compute_losses({"labeled": {"image": images_l, "mask": mask_x}, "unlabeled": {"image": weak}})
    losses["loss"].backward()
    # Parameters the step does not reach (a ViT's unused tokens) have no gradient on either side: zeros.
    grads = lambda net: torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()  # noqa: E731
                                   for p in net.parameters()])
    stats = lambda net: torch.cat([b.flatten().double() for n, b in net.named_buffers() if "running" in n])  # noqa: E731
    return [
        exact("strong view 1 after the CutMix paste", pasted[0], namespace["img_u_s1"], tol=0),
        exact("Complementary Dropout masks, replayed", replayed[0], drawn[0], tol=0),
        exact("supervised loss", losses["loss_sup"], namespace["loss_x"]),
        exact("strong-view loss, mean of the two views", losses["loss_unsup"], namespace["loss_u_s"]),
        exact(f"total loss (weights of {V2_SCRIPT})", losses["loss"], namespace["loss"]),
        exact("mask ratio (confident share of the weak view's valid pixels)", losses["mask_ratio"],
              namespace["mask_ratio"]),
        exact("gradient of every student parameter", grads(module.student), grads(student), tol=1e-6),
        exact("BatchNorm running statistics after the step", stats(module.student), stats(student), tol=1e-6),
    ]


def unimatch_v2_partner(official: Official) -> list[Row]:
    """Whose pixels a strong view's CutMix box shows, in a batch of 4: the official paste statement
    (unimatch_v2.py:175) against `FixMatch.make_views` with ``mix_source="batch"``, each on images
    whose pixels hold their batch index, with a box over the whole image."""
    paste = official.statements(V2_SCRIPT, "img_u_s1[cutmix_box1", "img_u_s1[cutmix_box1")
    index = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 14, 14)
    everywhere = torch.ones(4, 14, 14)
    official_partner = paste({"img_u_s1": index.clone(), "cutmix_box1": everywhere})["img_u_s1"][:, 0, 0, 0]
    torch.manual_seed(0)
    module = UniMatchV2(num_classes=3, channels_last=False, **TINY_VIT)
    same_view = lambda images, given, *args, **kwargs: (images, given, torch.ones_like(given, dtype=torch.bool))  # noqa: E731
    with mock.patch.object(fixmatch_module, "weak_view", same_view), \
            mock.patch.object(fixmatch_module, "strong_photometric", lambda images, *args, **kwargs: images), \
            mock.patch.object(fixmatch_module, "cutmix_boxes", lambda *args, **kwargs: everywhere.bool()):
        suite_partner = module.make_views({"image": index.contiguous()}).strong[0][:, 0, 0, 0]
    return [same("CutMix partner of images 0..3 in a batch of 4", [int(i) for i in suite_partner],
                 [int(i) for i in official_partner],
                 known="i + 1 mod B, where the reference flips the batch (NOTE in unimatch_v2.py)")]


def unimatch_v2_ema(official: Official) -> list[Row]:
    """Six teacher updates: the official statements (unimatch_v2.py:221-226) against `UniMatchV2.update_teacher`."""
    update = official.statements(V2_SCRIPT, "ema_ratio = min(1 - 1 / (iters + 1)",
                                 "for buffer, buffer_ema in zip(model.buffers(), model_ema.buffers())")
    torch.manual_seed(0)
    module = UniMatchV2(num_classes=3, channels_last=False, **TINY_VIT)
    teacher = copy.deepcopy(module.teacher)
    gen = torch.Generator().manual_seed(0)
    for step in range(6):
        with torch.no_grad():  # an optimizer step and a forward's BatchNorm statistics
            for tensor in [*module.student.parameters(), *module.student.buffers()]:
                tensor.add_(torch.randn(tensor.shape, generator=gen) if tensor.dtype.is_floating_point else 1)
        update({"model": module.student, "model_ema": teacher, "iters": step})
        module.update_teacher(step)
    params = lambda net: torch.cat([p.detach().flatten() for p in net.parameters()])  # noqa: E731
    buffers = lambda net, floating: torch.cat([b.flatten().double() for b in net.buffers()  # noqa: E731
                                               if b.dtype.is_floating_point == floating])
    return [
        exact("EMA teacher parameters after 6 updates", params(module.teacher), params(teacher), tol=1e-5),
        exact("EMA teacher BatchNorm statistics after 6 updates", buffers(module.teacher, True), buffers(teacher, True),
              tol=1e-5),
        exact("EMA teacher BatchNorm batch counters after 6 updates", buffers(module.teacher, False),
              buffers(teacher, False), known="integer buffers are copied, the reference averages them as floats "
                                             "(NOTE in unimatch_v2.py); nothing reads them"),
    ]


def unimatch_v2_rows(official: Official, settings: Settings) -> list[Row]:
    """LiheYoung/UniMatch-V2: unimatch_v2.py, model/semseg/dpt.py (Complementary Dropout), dataset/transform.py."""
    rows = guarded("training step", lambda: unimatch_v2_step(official))
    rows += guarded("CutMix partner", lambda: unimatch_v2_partner(official))
    rows += guarded("Complementary Dropout", lambda: complementary_dropout_rows(official, settings))
    rows += guarded("EMA teacher", lambda: unimatch_v2_ema(official))
    return rows + guarded("CutMix boxes", lambda: cutmix_box_distribution(official, settings))


# ---------------------------------------------------------------------------------------- CPS
CPS_PLAIN, CPS_CUTMIX = "exp.voc/voc8.res50v3+.CPS", "exp.voc/voc8.res50v3+.CPS+CutMix"


def cps_step(official: Official, cutmix: bool) -> list[Row]:
    """One CPS step on the same two networks and inputs: the official loop's statements (``train.py``,
    from the first forward to the supervised losses, then the total) beside the suite's ``compute_losses``.

    The suite's unlabeled rescale-crop is replaced by the identity for the call (the reference's
    happens in its data loader), and with CutMix its boxes by the official mask; the second
    unlabeled batch of the reference is the suite's partner batch, ``roll(-1)`` of the first.
    """
    folder = CPS_CUTMIX if cutmix else CPS_PLAIN
    script = f"{folder}/train.py"
    forward = official.definitions(f"{folder}/network.py", "Network.forward").forward
    first = "batch_mix_masks = mask_params" if cutmix else "b, c, h, w = imgs.shape"
    step = official.statements(script, first, "loss_sup_r = loss_sup_r / engine.world_size")
    total = official.statements(script, "loss = loss_sup + loss_sup_r + cps_loss", "loss = loss_sup + loss_sup_r")
    criterion = official.statements(script, "criterion = nn.CrossEntropyLoss", "criterion = nn.CrossEntropyLoss")
    config = official.statements(f"{folder}/config.py", "C.cps_weight =", "C.cps_weight =")({"C": SimpleNamespace()})["C"]
    torch.manual_seed(0)
    module = CPS(num_classes=3, arch="Unet", encoder_name=TINY_ENCODER, channels_last=False, cutmix=cutmix,
                 cps_weight=config.cps_weight).train()
    branches = [copy.deepcopy(module.student), copy.deepcopy(module.student_b)]
    stub = SimpleNamespace(training=True, branch1=lambda x: (None, branches[0](x)),
                           branch2=lambda x: (None, branches[1](x)))
    gen = torch.Generator().manual_seed(0)
    images_l, images_u = torch.rand(2, 3, 64, 64, generator=gen), torch.rand(2, 3, 64, 64, generator=gen)
    masks_l = torch.randint(0, 3, (2, 64, 64), generator=gen)
    masks_l[:, :6] = IGNORE_INDEX
    namespace = {"torch": torch, "nn": nn, "model": functools.partial(forward, stub), "imgs": images_l, "gts": masks_l,
                 "dist": SimpleNamespace(all_reduce=lambda *args, **kwargs: None, ReduceOp=SimpleNamespace(SUM=None)),
                 "engine": SimpleNamespace(world_size=1), "config": config}
    criterion(namespace)
    box = torch.zeros(2, 64, 64, dtype=torch.bool)
    if cutmix:
        np.random.seed(0)
        generators = official.definitions(f"{folder}/mask_gen.py", "MaskGenerator", "BoxMaskGenerator")
        mask = generators.BoxMaskGenerator((0.25, 0.5), n_boxes=3, invert=True).generate_params(2, (64, 64))
        box = torch.from_numpy(mask[:, 0] == 1)
        namespace.update(unsup_imgs_0=images_u, unsup_imgs_1=images_u.roll(-1, 0),
                         mask_params=torch.from_numpy(mask).float())
    else:
        namespace.update(unsup_imgs=images_u)
    step(namespace)
    total(namespace)
    namespace["loss"].backward()

    def identity_view(images: Tensor, given: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor, Tensor]:
        return images, given, torch.ones_like(given, dtype=torch.bool)

    boxes = iter([box] + [torch.zeros_like(box)] * 2)  # the suite XORs three boxes: the official mask, then none
    with mock.patch.object(cps_module, "weak_view", identity_view), \
            mock.patch.object(cps_module, "cutmix_boxes", lambda *args, **kwargs: next(boxes)):
        losses = module.compute_losses({"labeled": {"image": images_l, "mask": masks_l},
                                        "unlabeled": {"image": images_u}})
    losses["loss"].backward()
    networks = (module.student, module.student_b)
    grads = lambda nets: torch.cat([p.grad.flatten() for net in nets for p in net.parameters()])  # noqa: E731
    stats = lambda nets: torch.cat([b.flatten().double() for net in nets for n, b in net.named_buffers()  # noqa: E731
                                    if "running" in n])
    kind = "CPS+CutMix" if cutmix else "CPS"
    default = inspect.signature(CPS).parameters["cps_weight"].default
    rows = [
        same(f"{kind}: cps_weight, the suite's default and the reference's config", default, config.cps_weight,
             known="the suite defaults to the plain CPS config's weight (its docstring cites both)"),
        exact(f"{kind}: supervised loss, both networks", losses["loss_sup"], namespace["loss_sup"] + namespace["loss_sup_r"]),
        exact(f"{kind}: weighted cross pseudo-supervision loss (weight {config.cps_weight})",
              module.hparams.cps_weight * losses["loss_unsup"], namespace["cps_loss"]),
        exact(f"{kind}: total loss", losses["loss"], namespace["loss"]),
        exact(f"{kind}: gradient of every parameter of both networks", grads(networks), grads(branches), tol=1e-6),
    ]
    known = ("the partner is the batch neighbour, labelled in the same forward, not a second loader's batch "
             "(NOTE in cps.py); the reference also runs the mixed before the labeled forwards") if cutmix else None
    rows.append(exact(f"{kind}: BatchNorm running statistics after the step", stats(networks), stats(branches),
                      tol=1e-6, known=known))
    return rows


def cps_mask_distribution(official: Official, settings: Settings) -> list[Row]:
    """The suite's three XOR-ed `ops.cutmix_boxes` against ``BoxMaskGenerator`` as CutMix/train.py:55 builds
    it (charlesCXK/TorchSemiSeg exp.voc/voc8.res50v3+.CPS+CutMix/mask_gen.py:24)."""
    generators = official.definitions(f"{CPS_CUTMIX}/mask_gen.py", "MaskGenerator", "BoxMaskGenerator")
    n, size = settings.samples, 64
    np.random.seed(0)
    mixed_o = torch.from_numpy(generators.BoxMaskGenerator((0.25, 0.5), n_boxes=3, invert=True)
                               .generate_params(n, (size, size))[:, 0] == 1)
    area = (cps_module.CUTMIX_AREA[0] / cps_module.CUTMIX_BOXES, cps_module.CUTMIX_AREA[1] / cps_module.CUTMIX_BOXES)
    gen = torch.Generator().manual_seed(0)
    mixed_s = functools.reduce(torch.logical_xor, (ops.cutmix_boxes(n, size, size, gen, p=1.0, area_range=area)
                                                   for _ in range(cps_module.CUTMIX_BOXES)))
    note = "the suite's boxes draw the aspect uniformly in [0.3, 3.3], the reference's log-uniformly (NOTE in cps.py)"
    fraction = lambda mixed: mixed.flatten(1).double().mean(1)  # noqa: E731
    return [distribution(f"CutMix mask {size}x{size}: mixed fraction (three boxes, XOR)", fraction(mixed_s),
                         fraction(mixed_o), known=note)]


def cps_rows(official: Official, settings: Settings) -> list[Row]:
    """charlesCXK/TorchSemiSeg exp.voc/voc8.res50v3+.CPS and .CPS+CutMix (train.py, network.py, mask_gen.py)."""
    rows = guarded("CPS step", lambda: cps_step(official, cutmix=False))
    rows += guarded("CPS+CutMix step", lambda: cps_step(official, cutmix=True))
    return rows + guarded("CutMix mask", lambda: cps_mask_distribution(official, settings))


# ---------------------------------------------------------------------------------------- sections and CLI
@dataclass(frozen=True)
class Section:
    """One method's parity checks: the official repository they read and the function that makes the rows."""

    repository: str
    rows: Callable[[Official, Settings], list[Row]]


SECTIONS: dict[str, Section] = {
    "reco": Section("lorenmt/reco", reco_rows),
    "fixmatch": Section("LiheYoung/UniMatch", fixmatch_rows),
    "unimatch": Section("LiheYoung/UniMatch", unimatch_rows),
    "c3semiseg": Section("Amandaynzhou/C3-SemiSeg", c3_rows),
    "cps": Section("charlesCXK/TorchSemiSeg", cps_rows),
    "unimatch_v2": Section("LiheYoung/UniMatch-V2", unimatch_v2_rows),
}


def suite_commit() -> str:
    """This repository's HEAD, marked when tracked files have local changes."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return None

    head = git("rev-parse", "HEAD")
    if head is None:
        return "unknown"
    return head.strip() + (" with local changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", required=True, help=f"one of {', '.join(SECTIONS)}")
    parser.add_argument("--official", required=True, help="fetched copy of its official repository")
    parser.add_argument("--samples", type=int, default=Settings.samples, help="draws per mask distribution")
    parser.add_argument("--loss-calls", type=int, default=Settings.loss_calls, help="calls per loss distribution")
    parser.add_argument("--out", help="also write the table to OUT/<method>.md")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.method not in SECTIONS:
        raise SystemExit(f"--method {args.method!r}: expected one of {', '.join(SECTIONS)}")
    if args.samples < 4 or args.loss_calls < 4:
        raise SystemExit(f"--samples and --loss-calls must be >= 4, got {args.samples} and {args.loss_calls}")
    section = SECTIONS[args.method]
    official = Official(args.official)
    rows = section.rows(official, Settings(args.samples, args.loss_calls))
    title = f"{args.method} vs {section.repository} @ {official.commit[:12]}"
    table = markdown(title, rows)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        command = "python benchmarks/parity.py " + " ".join(argv)
        header = (f"Official commit: {official.commit}. Suite commit: {suite_commit()}. "
                  f"torch {torch.__version__}, numpy {np.__version__}.\nCommand: `{command}`\n\n")
        (out / f"{args.method}.md").write_text(header + table + "\n")
    return 1 if any(r.verdict == "DIFFERS" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
