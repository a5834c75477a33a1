"""Builders of tiny datasets in their exact on-disk layouts (a few 20x16 / 24x18 images in ``tmp_path``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

FOLDER_CLASSES = ("background", "cat", "dog")


def write_rgb(path: Path, height: int, width: int, seed: int) -> np.ndarray:
    """Write a random RGB image (PNG or JPEG by suffix); return its pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG")
    return pixels


def write_label(path: Path, label: np.ndarray, palette: list[int] | None = None) -> None:
    """Write a single-channel label PNG: mode ``P`` with ``palette``, else mode ``L``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(label.astype(np.uint8))  # mode L
    if palette is not None:
        image.putpalette(palette)  # turns the L image into P with the same indices
    image.save(path)


def label_pattern(height: int, width: int, num_classes: int, seed: int) -> np.ndarray:
    """Vertical class bands in [0, num_classes) with a 255 (ignore) border row at the bottom."""
    label = ((np.arange(width)[None, :] * num_classes // width + seed) % num_classes).repeat(height, axis=0)
    label[-1] = 255
    return label.astype(np.uint8)


def make_folder_dataset(
    root: Path,
    layout: str = "subfolders",
    splits: dict[str, int] | None = None,
    num_unlabeled_train: int = 0,
) -> Path:
    """A folder dataset with ``FOLDER_CLASSES`` and 20x16 images.

    Args:
        root: Where to write it.
        layout: ``subfolders`` (images/<split>/, labels/<split>/), ``lists`` (flat images/ and
            labels/ with splits/<split>.txt) or ``both`` (split subfolders and lists, like msrc21).
        splits: Images per split; names are ``<split>_<k>``.
        num_unlabeled_train: Extra train images without a label, named ``train_u<k>``.
    """
    splits = splits or {"train": 3, "val": 2}
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(FOLDER_CLASSES) + "\n")
    for split, count in splits.items():
        sub = "" if layout == "lists" else split
        names = [f"{split}_{k}" for k in range(count)]
        extra = [f"{split}_u{k}" for k in range(num_unlabeled_train)] if split == "train" else []
        for k, name in enumerate(names + extra):
            write_rgb(root / "images" / sub / f"{name}.png", 16, 20, seed=k)
            if name in names:
                write_label(root / "labels" / sub / f"{name}.png", label_pattern(16, 20, len(FOLDER_CLASSES), k))
        if layout in ("lists", "both"):
            (root / "splits").mkdir(exist_ok=True)
            # Written in reverse so that tests see the loader sort them.
            (root / "splits" / f"{split}.txt").write_text("\n".join(reversed(names + extra)) + "\n")
    return root


def voc_palette() -> list[int]:
    """The 256-colour VOC palette: the bits of an index spread over the high bits of R, G and B."""
    palette = []
    for index in range(256):
        r = g = b = 0
        code = index
        for shift in range(7, -1, -1):
            r |= (code & 1) << shift
            g |= ((code >> 1) & 1) << shift
            b |= ((code >> 2) & 1) << shift
            code >>= 3
        palette += [r, g, b]
    return palette


VOC_TRAIN = ("2007_000032", "2007_000039")
VOC_VAL = ("2007_000033", "2007_000042")
VOC_SBD_ONLY = ("2008_000002",)  # in train_aug only: no SegmentationClass label


def make_voc(root: Path, nested: bool = True, aug_list: str | None = "imagesets") -> Path:
    """A VOC2012 tree with 24x18 JPEGs, palette labels and SBD grayscale labels.

    Args:
        root: Where to write it.
        nested: Write ``root/VOCdevkit/VOC2012`` (else ``root`` is VOC2012 itself).
        aug_list: Where ``train_aug.txt`` goes: ``imagesets`` (ImageSets/Segmentation/),
            ``voc_root`` (VOC2012/) or None (not written). It uses the community two-path lines.

    Returns:
        The VOC2012 folder.
    """
    voc = root / "VOCdevkit" / "VOC2012" if nested else root
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    palette = voc_palette()
    for k, name in enumerate(VOC_TRAIN + VOC_VAL + VOC_SBD_ONLY):
        write_rgb(voc / "JPEGImages" / f"{name}.jpg", 18, 24, seed=k)
        label = label_pattern(18, 24, 21, 3 * k)
        if name not in VOC_SBD_ONLY:
            write_label(voc / "SegmentationClass" / f"{name}.png", label, palette=palette)
        # SBD labels differ from VOC's so that tests can tell which folder was read.
        write_label(voc / "SegmentationClassAug" / f"{name}.png", (label + 1) % 21)
    (lists / "train.txt").write_text("\n".join(VOC_TRAIN) + "\n")
    (lists / "val.txt").write_text("\n".join(VOC_VAL) + "\n")
    (lists / "trainval.txt").write_text("\n".join(VOC_TRAIN + VOC_VAL) + "\n")
    aug_ids = VOC_TRAIN + VOC_SBD_ONLY
    aug_lines = "".join(f"/JPEGImages/{n}.jpg /SegmentationClassAug/{n}.png\n" for n in aug_ids)
    if aug_list == "imagesets":
        (lists / "train_aug.txt").write_text(aug_lines)
    elif aug_list == "voc_root":
        (voc / "train_aug.txt").write_text(aug_lines)
    return voc


# Raw Cityscapes labelIds in the first row of every fixture label, and the train ids they map to.
CITYSCAPES_LABEL_IDS = (7, 8, 26, 33, 0, 1, 255, 6, 24, 31, 3, 29)
CITYSCAPES_TRAIN_IDS = (0, 1, 13, 18, 255, 255, 255, 255, 11, 16, 255, 255)
CITYSCAPES_SAMPLES = {
    "train": [
        ("aachen", "aachen_000000_000019"),
        ("aachen", "aachen_000001_000019"),
        ("bochum", "bochum_000000_000313"),
    ],
    "val": [("frankfurt", "frankfurt_000000_000294")],
}


def make_cityscapes(root: Path) -> Path:
    """leftImg8bit / gtFine trees of 24x18 images; labels hold ``CITYSCAPES_LABEL_IDS`` in row 0."""
    for split, samples in CITYSCAPES_SAMPLES.items():
        for k, (city, name) in enumerate(samples):
            write_rgb(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png", 18, 24, seed=k)
            label = np.full((18, 24), 7, dtype=np.uint8)  # road
            label[0, : len(CITYSCAPES_LABEL_IDS)] = CITYSCAPES_LABEL_IDS
            label[10:, 12:] = 26  # car
            write_label(root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png", label)
    return root
