"""Any smp architecture and encoder by name, as one module that takes [0, 1] images.

This is the only place that touches smp internals. `Segmenter` adds what every method
needs around an smp model:
- ImageNet normalisation inside the forward, so augmentation code works on [0, 1] images;
- padding of any input size to a multiple of the encoder's output stride (reflect),
  logits cropped back, so evaluation runs on full images of any size;
- `forward_features`, which also returns the decoder features (the input of smp's
  segmentation head) for a representation head such as ReCo's.

Weights never come from the network: ``encoder_weights`` is None (random init) or the
path of a local file holding an encoder (or whole-model) state dict.
"""

from __future__ import annotations

from pathlib import Path

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def available_architectures() -> list[str]:
    return sorted(cls.__name__ for cls in smp.MODEL_ARCHITECTURES_MAPPING.values())


def _check_encoder(encoder_name: str) -> None:
    if encoder_name.startswith("tu-"):
        import timm

        if not timm.is_model(encoder_name[3:]):
            raise ValueError(f"unknown encoder_name {encoder_name!r}: timm has no model {encoder_name[3:]!r}")
        return
    if encoder_name not in smp.encoders.encoders:
        names = sorted(smp.encoders.encoders)
        raise ValueError(
            f"unknown encoder_name {encoder_name!r}; expected one of smp's encoders (e.g. {', '.join(names[:8])}, ...) "
            "or a timm model as 'tu-<name>'"
        )


def load_encoder_weights(model: nn.Module, path: str) -> None:
    """Load a local state dict into ``model.encoder`` (keys may carry an ``encoder.`` prefix)."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(
            f"encoder_weights={path!r}: expected None or the path of a local weights file "
            "(nothing is downloaded; e.g. a torchvision resnet state dict saved with torch.save)"
        )
    state = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    prefix = "encoder."
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    missing, unexpected = model.encoder.load_state_dict(state, strict=False)
    # Classifier weights (fc.*) of an ImageNet checkpoint are expected leftovers.
    unexpected = [k for k in unexpected if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(
            f"encoder_weights={path!r} does not match encoder: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )


class Segmenter(nn.Module):
    """An smp segmentation model on [0, 1] images of any size.

    Args:
        num_classes: Number of output classes.
        arch: smp architecture name, e.g. ``DeepLabV3Plus``, ``Unet``, ``FPN`` (case-insensitive).
        encoder_name: smp encoder name (``resnet18``) or a timm one (``tu-resnet10t``).
        encoder_weights: None for random init, or the path of a local weights file.
        model_options: Extra keyword arguments for the smp architecture
            (e.g. ``decoder_channels``, ``encoder_depth``).
    """

    def __init__(
        self,
        num_classes: int,
        arch: str = "DeepLabV3Plus",
        encoder_name: str = "resnet18",
        encoder_weights: str | None = None,
        model_options: dict | None = None,
    ) -> None:
        super().__init__()
        if arch.lower() not in smp.MODEL_ARCHITECTURES_MAPPING:
            raise ValueError(f"unknown arch {arch!r}; expected one of {available_architectures()}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        _check_encoder(encoder_name)
        self.model = smp.create_model(
            arch.lower(),
            encoder_name=encoder_name,
            encoder_weights=None,
            classes=num_classes,
            **(model_options or {}),
        )
        if encoder_weights is not None:
            load_encoder_weights(self.model, encoder_weights)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.stride = self._input_divisor()

    def _input_divisor(self) -> int:
        if not getattr(self.model, "requires_divisible_input_shape", True):
            return 1
        return int(getattr(self.model.encoder, "output_stride", 32))

    @property
    def feature_channels(self) -> int:
        """Channels of the decoder features returned by `forward_features`."""
        return self.model.segmentation_head[0].in_channels

    def _prepare(self, images: Tensor) -> tuple[Tensor, int, int]:
        height, width = images.shape[-2:]
        x = (images - self.mean) / self.std
        pad_h, pad_w = -height % self.stride, -width % self.stride
        if pad_h or pad_w:
            # Reflect needs the pad to be smaller than the side; tiny images fall back to replicate.
            mode = "reflect" if pad_h < height and pad_w < width else "replicate"
            x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
        return x, height, width

    def forward_features(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Logits (B, C, H, W) at input size and decoder features (B, F, h, w) of the padded input.

        The features keep the decoder's own stride (4 for DeepLabV3+, 1 for U-Net) and
        cover the padded input; `crop_features` maps them back to the input extent.
        """
        x, height, width = self._prepare(images)
        features = self.model.decoder(self.model.encoder(x))
        logits = self.model.segmentation_head(features)
        return logits[..., :height, :width], features

    def forward_perturbed(self, images: Tensor, dropout_p: float = 0.5) -> tuple[Tensor, Tensor]:
        """Logits (B, C, H, W) of a clean and a feature-perturbed stream from one encoder pass (UniMatch).

        The encoder features the decoder reads (all but the input itself, which smp lists first)
        are decoded twice, as one doubled batch: as they are, and through channel dropout
        (``Dropout2d(dropout_p)``, on even in eval mode, like the reference's freshly built
        module). The decoder's BatchNorm thus sees both streams (METHODS.md 8 step 3).
        """
        x, height, width = self._prepare(images)
        features = self.model.encoder(x)
        doubled = [torch.cat([features[0], features[0]])] + [
            torch.cat([f, F.dropout2d(f, dropout_p, training=True)]) for f in features[1:]
        ]
        logits = self.model.segmentation_head(self.model.decoder(doubled))[..., :height, :width]
        clean, perturbed = logits.chunk(2)
        return clean, perturbed

    def compile_parts(self) -> None:
        """``torch.compile`` the encoder, decoder and head in place: every forward path uses them."""
        for part in (self.model.encoder, self.model.decoder, self.model.segmentation_head):
            part.compile()

    def forward(self, images: Tensor) -> Tensor:
        """Logits (B, C, H, W) at the input size."""
        return self.forward_features(images)[0]
