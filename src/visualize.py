"""Figures of a trained checkpoint.

``python -m src.visualize relations --ckpt RUN/checkpoints/best.ckpt --out relations.png`` draws how the
representation head relates the classes (ReCo, or supervised with ``model.reco_weight > 0``): the cosine
similarity of the class prototypes, the mean representation of each class's pixels of the validation
set by its ground truth, as a heatmap in average-linkage order under its dendrogram. The validation set
is the checkpoint's own: its datamodule is rebuilt from the settings the checkpoint saved. Training
logs the same figure to TensorBoard (``val/class_relations``) at each image-grid validation.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

from src.datamodules import SegmentationDataModule
from src.datasets.base import DatasetError
from src.pl_modules.base import SemiSupervisedModule
from src.pl_modules.relations import prototype_similarity, prototype_sums, relation_figure
from src.predict import load_module


def load_datamodule(checkpoint_path: str, root: str | None = None) -> SegmentationDataModule:
    """The datamodule a checkpoint's run trained with, from the settings Lightning saved in it.

    Args:
        checkpoint_path: A checkpoint written by ``python -m src.train`` (or `benchmarks/run.py`).
        root: The dataset folder, where it is no longer where the run read it.
    """
    # mmap: only the small settings are read here, not the weights.
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False, mmap=True)
    settings = checkpoint.get(SegmentationDataModule.CHECKPOINT_HYPER_PARAMS_KEY) or {}
    # LightningCLI records the class it built; Lightning's loader needs it named, as the base is abstract.
    # Like Lightning's own check, only a class already imported is accepted.
    module_name, _, class_name = str(settings.get("_class_path", "")).rpartition(".")
    datamodule_class = getattr(sys.modules.get(module_name), class_name, None)
    if not (isinstance(datamodule_class, type) and issubclass(datamodule_class, SegmentationDataModule)):
        raise ValueError(
            f"--ckpt {checkpoint_path}: no datamodule of the suite saved in it (a run of python -m src.train has one)"
        )
    overrides = {"root": root} if root is not None else {}
    return datamodule_class.load_from_checkpoint(checkpoint_path, weights_only=False, **overrides)


@torch.no_grad()
def class_relations(
    module: SemiSupervisedModule, batches: Iterable[dict[str, Tensor]], device: str = "cpu"
) -> tuple[Tensor, Tensor]:
    """Cosine similarity (C, C) of the class prototypes over ``batches`` and each class's pixel count (C,).

    Args:
        module: A method with a representation head, in eval mode, on ``device``.
        batches: Evaluation batches (``image`` uint8 or float, ``mask``) as the datamodule's loaders give them.
        device: Where ``module`` is.
    """
    totals: tuple[Tensor, Tensor] | None = None
    for batch in batches:
        batch = module.on_after_batch_transfer(module.transfer_batch_to_device(batch, torch.device(device), 0), 0)
        sums, counts = prototype_sums(
            module.student, module.rep_head, batch["image"], batch["mask"], module.num_classes, module.ignore_index
        )
        totals = (sums, counts) if totals is None else (totals[0] + sums, totals[1] + counts)
    if totals is None or not totals[1].any():
        raise ValueError("the validation set has no labelled pixel to make class prototypes from")
    return prototype_similarity(*totals).cpu(), totals[1].cpu()


def relations(checkpoint_path: str, out: str, root: str | None = None, device: str = "cpu") -> Tensor:
    """Write the class-relation figure of a checkpoint's validation set to ``out``; returns the similarity."""
    module = load_module(checkpoint_path, device)
    if not module.uses_representation:
        raise ValueError(
            f"--ckpt {checkpoint_path}: method {module.name!r} has no representation head "
            "(reco has one, and supervised with model.reco_weight > 0)"
        )
    datamodule = load_datamodule(checkpoint_path, root)
    datamodule.setup("validate")
    similarity, counts = class_relations(module, datamodule.val_dataloader(), device)
    step = torch.load(checkpoint_path, map_location="cpu", weights_only=False, mmap=True).get("global_step", 0)
    split = f"{datamodule.dataset_name} {datamodule.hparams.val_split}"
    title = f"{module.name}, step {step}: class prototypes on {split} ({int(counts.sum())} pixels)"
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    relation_figure(similarity, module.class_names, title).savefig(path, dpi=100)
    return similarity


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    figures = parser.add_subparsers(dest="figure", required=True)
    relations_parser = figures.add_parser("relations", help="class-prototype similarity of the representation head")
    relations_parser.add_argument("--ckpt", required=True, help="checkpoint of a method with a representation head")
    relations_parser.add_argument("--out", required=True, help="PNG file to write")
    relations_parser.add_argument("--root", default=None, help="dataset folder, if it moved since training")
    relations_parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        similarity = relations(args.ckpt, args.out, args.root, args.device)
    except (ValueError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    present = int((~similarity.diagonal().isnan()).sum())
    print(f"wrote {args.out}: class relations of {present} of {similarity.shape[0]} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
