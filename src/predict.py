"""Predict masks for a folder of images with a trained checkpoint.

``python -m src.predict --ckpt RUN/checkpoints/best.ckpt --input DIR --output DIR``
writes, for every image ``DIR/name.jpg``, the raw class-index mask ``OUTPUT/masks/name.png``
(uint8, one value per class) and a coloured version ``OUTPUT/color/name.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image

from src.datasets.base import DatasetError, read_image
from src.pl_modules import METHODS
from src.pl_modules.base import SemiSupervisedModule
from src.pl_modules.visualize import palette

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def load_module(checkpoint_path: str, device: str = "cpu") -> SemiSupervisedModule:
    """Load any method's checkpoint (the method is named inside it)."""
    path = Path(checkpoint_path)
    if not path.is_file():
        raise ValueError(f"--ckpt {checkpoint_path}: no such checkpoint file")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    method = checkpoint.get("method")
    if method not in METHODS:
        raise ValueError(f"--ckpt {checkpoint_path}: unknown method {method!r} in checkpoint; expected one of {sorted(METHODS)}")
    module = METHODS[method].load_from_checkpoint(path, map_location=device)
    return module.eval()


@torch.no_grad()
def predict_folder(module: SemiSupervisedModule, input_dir: str, output_dir: str, device: str = "cpu") -> int:
    """Write index and colour masks for every image of ``input_dir``; returns the number written."""
    source = Path(input_dir)
    if not source.is_dir():
        raise ValueError(f"--input {input_dir}: not a folder")
    files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"--input {input_dir}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    masks_dir, color_dir = Path(output_dir) / "masks", Path(output_dir) / "color"
    masks_dir.mkdir(parents=True, exist_ok=True)
    color_dir.mkdir(parents=True, exist_ok=True)
    colours = palette(module.num_classes)
    for file in files:
        image = torch.from_numpy(read_image(file).copy()).permute(2, 0, 1)[None].float().div(255).to(device)
        prediction = module.predict_logits(module.eval_network(), image).argmax(dim=1)[0]
        mask = prediction.to(torch.uint8).cpu().numpy()
        Image.fromarray(mask, mode="L").save(masks_dir / f"{file.stem}.png")
        Image.fromarray(colours[mask]).save(color_dir / f"{file.stem}.png")
    return len(files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint of any method (best.ckpt or last.ckpt)")
    parser.add_argument("--input", required=True, help="folder of images")
    parser.add_argument("--output", required=True, help="folder for masks/ and color/")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        module = load_module(args.ckpt, args.device)
        count = predict_folder(module, args.input, args.output, args.device)
    except (ValueError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {count} masks to {Path(args.output) / 'masks'} and colour masks to {Path(args.output) / 'color'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
