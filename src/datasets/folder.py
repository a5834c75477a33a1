"""Your own data in the suite's folder layout (``../shared/data/msrc21`` is stored this way too).

::

    root/classes.txt                       one class name per line, in index order
    root/images/[<split>/]NAME.png|jpg|jpeg  RGB images (suffix in any case)
    root/labels/[<split>/]NAME.png         single-channel class indices, 255 = ignore
    root/splits/<split>.txt                optional: the split's NAMEs, one per line

A split is the list ``splits/<split>.txt`` when it exists, else every image of the folder
``images/<split>/``. Images are looked up in ``images/<split>/`` when that folder exists, else
flat in ``images/`` (the same for labels), so split lists work with flat folders and with split
subfolders alike.

Train images without a label file are unlabeled images: they join the unlabeled pool, so an
unlabeled pool needs no dummy masks. In any other split every image needs a label. A label
without an image is an error in every split (it is usually a typo in a name).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from src.datasets.base import DatasetError, SegmentationDataset, read_image, read_mask

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
LABEL_SUFFIX = ".png"
# Label files in a lossy format would silently corrupt class indices, so they are refused
# rather than skipped (skipping would turn the images into unlabeled ones).
LOSSY_LABEL_SUFFIXES = (".jpg", ".jpeg")
# Only the train split may hold images without labels (the unlabeled pool).
UNLABELED_SPLIT = "train"


def _files_by_stem(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """Files directly in ``folder`` whose suffix (any case) is in ``suffixes``, keyed by stem."""
    files: dict[str, Path] = {}
    if not folder.is_dir():
        return files
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in suffixes or not path.is_file():
            continue
        if path.stem in files:
            raise DatasetError(
                f"{folder}: {files[path.stem].name} and {path.name} have the same name {path.stem!r} "
                "(expected one file per name)"
            )
        files[path.stem] = path
    return files


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def _strip_image_suffix(token: str) -> str:
    """``images/train/a.png`` -> ``a``; a bare name keeps its dots (``img.v2`` stays whole)."""
    name = Path(token).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _read_classes(path: Path) -> tuple[str, ...]:
    if not path.is_file():
        raise DatasetError(f"{path}: not found (expected a classes.txt with one class name per line, in index order)")
    names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    # 255 is the ignore index, so at most 255 classes fit in a uint8 label.
    if not 1 <= len(names) <= 255:
        raise DatasetError(f"{path}: expected 1 to 255 class names, found {len(names)}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DatasetError(f"{path}: class names {duplicates} appear more than once (expected unique names)")
    return names


def _read_split_list(path: Path) -> list[str]:
    """Names listed in a split file (blank lines and ``#`` comments skipped)."""
    names: list[str] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name = _strip_image_suffix(line.split()[0])
        if name in seen:
            raise DatasetError(f"{path}:{number}: {name!r} is already listed on line {seen[name]}")
        seen[name] = number
        names.append(name)
    return names


class FolderDataset(SegmentationDataset):
    """Images and label PNGs with matching names, split by subfolders or by list files.

    Args:
        root: The dataset folder (holding ``classes.txt``, ``images/`` and ``labels/``).
        split: A split name: a ``splits/<split>.txt`` list or an ``images/<split>/`` folder.
    """

    name = "folder"

    def __init__(self, root: str, split: str = "train") -> None:
        super().__init__(split)
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(
                f"data.root {self.root}: folder not found (expected a folder with classes.txt, images/ and labels/)"
            )
        self.classes = _read_classes(self.root / "classes.txt")

        images_root, labels_root = self.root / "images", self.root / "labels"
        list_file = self.root / "splits" / f"{split}.txt"
        if not list_file.is_file() and not (images_root / split).is_dir():
            raise DatasetError(
                f"{self.root}: no split {split!r} (expected {list_file} or the folder {images_root / split}/); "
                f"found {self._splits_found() or 'no splits'}"
            )
        image_dir = images_root / split if (images_root / split).is_dir() else images_root
        label_dir = labels_root / split if (labels_root / split).is_dir() else labels_root
        images = _files_by_stem(image_dir, IMAGE_SUFFIXES)
        labels = _files_by_stem(label_dir, (LABEL_SUFFIX,))
        lossy = _files_by_stem(label_dir, LOSSY_LABEL_SUFFIXES)
        if lossy:
            first = next(iter(lossy.values()))
            raise DatasetError(f"{first}: labels must be PNG (JPEG compression changes class indices)")
        self._check_orphan_labels(labels, images, image_dir, label_dir)

        if list_file.is_file():
            names = _read_split_list(list_file)
            for name in names:
                if name not in images:
                    raise DatasetError(
                        f"{list_file}: {name!r} has no image {image_dir}/{name}{{{','.join(IMAGE_SUFFIXES)}}}"
                    )
            # Sorted, like the folder case, so that the order never depends on how a list was written.
            names = sorted(names)
        else:
            names = sorted(images)
        if not names:
            raise DatasetError(f"{list_file if list_file.is_file() else image_dir}: split {split!r} has no images")

        self.ids = names
        self.image_files = [images[n] for n in names]
        self.label_files: list[Path | None] = [labels.get(n) for n in names]
        missing = [n for n, label in zip(names, self.label_files) if label is None]
        if missing and split != UNLABELED_SPLIT:
            expected = (labels_root / split if image_dir != images_root else label_dir) / f"{missing[0]}{LABEL_SUFFIX}"
            raise DatasetError(
                f"{images[missing[0]]}: image without a label (expected {expected}); every {split!r} image needs "
                f"one, only {UNLABELED_SPLIT!r} may hold unlabeled images ({len(missing)} such images)"
            )
        if len(missing) == len(names):
            raise DatasetError(
                f"{label_dir}: no label for any of the {len(names)} {split!r} images "
                f"(expected NAME{LABEL_SUFFIX} files named like the images)"
            )

    def _splits_found(self) -> list[str]:
        folders = [p.name for p in _subfolders(self.root / "images")]
        lists = [p.stem for p in (self.root / "splits").glob("*.txt")]
        return sorted(set(folders) | set(lists))

    def _check_orphan_labels(
        self, labels: dict[str, Path], images: dict[str, Path], image_dir: Path, label_dir: Path
    ) -> None:
        known = set(images)
        if label_dir == self.root / "labels" and image_dir != self.root / "images":
            # Flat labels beside per-split image folders hold the labels of every split.
            for folder in [self.root / "images", *_subfolders(self.root / "images")]:
                known |= set(_files_by_stem(folder, IMAGE_SUFFIXES))
        orphans = sorted(set(labels) - known)
        if orphans:
            raise DatasetError(
                f"{labels[orphans[0]]}: label without an image (expected {image_dir}/{orphans[0]} with a suffix in "
                f"{IMAGE_SUFFIXES}; {len(orphans)} such labels)"
            )

    def load_image(self, index: int) -> np.ndarray:
        return read_image(self.image_files[index])

    def load_mask(self, index: int) -> np.ndarray | None:
        path = self.label_files[index]
        return None if path is None else read_mask(path)

    def has_mask(self, index: int) -> bool:
        # Answered from the file list: the base class would decode the mask.
        return self.label_files[index] is not None

    def describe(self, index: int) -> str:
        return str(self.label_files[index] or self.image_files[index])
