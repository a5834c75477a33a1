"""Any smp architecture and encoder by name, as one module that takes [0, 1] images.

This is the only place that touches smp internals. `Segmenter` adds what every method
needs around an smp model:
- ImageNet normalisation inside the forward, so augmentation code works on [0, 1] images;
- padding of any input size to a multiple of the encoder's output stride (reflect),
  logits cropped back, so evaluation runs on full images of any size;
- `forward_features`, which also returns the decoder features (the input of smp's
  segmentation head) for a representation head such as ReCo's;
- feature perturbations between encoder and decoder: `forward_perturbed` (UniMatch) and
  `forward_channel_scaled` (UniMatch V2's Complementary Dropout).

ViT encoders (timm's, e.g. DINOv2's ``tu-vit_small_patch14_dinov2``) go with smp's ``DPT``. Their
position embeddings are interpolated to any input (``dynamic_img_size``), and a patch that is no
power of two (DINOv2's 14) gets UniMatch V2's reassembly (`_fit_dpt_decoder`).

``encoder_weights`` is None (random init), the path of a local file holding an encoder (or
whole-model) state dict, or a weight name that smp (``imagenet``, ``ssl``, ...) or timm (a
pretrained tag of a ``tu-`` encoder) knows. Named weights come through smp's and timm's own
loaders and caches: the Hugging Face cache (``HF_HUB_CACHE``, default ``$HF_HOME/hub``) or torch
hub's (``$TORCH_HOME/hub/checkpoints``). Without a network (``HF_HUB_OFFLINE=1``) they must be
cached already; a missing file fails with one line naming it and its folder.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import segmentation_models_pytorch as smp
import segmentation_models_pytorch.base.initialization as smp_init
import timm
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import EntryNotFoundError
from huggingface_hub.file_download import REGEX_COMMIT_HASH, repo_folder_name
from segmentation_models_pytorch.decoders.dpt.decoder import DPTDecoder
from timm.models._builder import _resolve_pretrained_source
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from src.networks.source_encoder import SOURCE_WEIGHTS, source_encoder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The encoder_weights name of timm's default pretrained tag (for most models an ImageNet one).
TIMM_DEFAULT_WEIGHTS = "imagenet"
# Which encoder maps UniMatch's feature-perturbed stream drops (`Segmenter.forward_perturbed`).
FP_LEVELS = ("reference", "all")
# The patch size smp's DPT builds its decoder for when the ViT's patch is no power of two.
DPT_TOKEN_STRIDE = 16


def available_architectures() -> list[str]:
    return sorted(cls.__name__ for cls in smp.MODEL_ARCHITECTURES_MAPPING.values())


def _check_encoder(encoder_name: str) -> None:
    if encoder_name.startswith("tu-"):
        if not timm.is_model(encoder_name[3:]):
            raise ValueError(f"unknown encoder_name {encoder_name!r}: timm has no model {encoder_name[3:]!r}")
        return
    if encoder_name not in smp.encoders.encoders:
        names = sorted(smp.encoders.encoders)
        raise ValueError(
            f"unknown encoder_name {encoder_name!r}; expected one of smp's encoders (e.g. {', '.join(names[:8])}, ...) "
            "or a timm model as 'tu-<name>'"
        )


def weight_names(encoder_name: str) -> list[str]:
    """The pretrained weights smp or timm has for an encoder, by the name ``encoder_weights`` takes.

    smp encoders: the keys of smp's ``pretrained_settings`` (e.g. ``imagenet``, ``ssl``, ``swsl``).
    ``tu-`` encoders: ``imagenet`` (timm's default pretrained tag for the model) and every tag
    timm has weights for (e.g. ``a1_in1k``).
    """
    if not encoder_name.startswith("tu-"):
        return list(smp.encoders.encoders[encoder_name]["pretrained_settings"])
    model, _ = timm.models.split_model_name_tag(encoder_name[3:])
    tags = [name.partition(".")[2] for name in timm.list_pretrained(f"{model}.*")]
    return [TIMM_DEFAULT_WEIGHTS, *tags] if tags else []


@dataclass(frozen=True)
class CachedWeights:
    """Where smp's or timm's loader keeps one set of named weights.

    Args:
        source: What the loader downloads (a Hugging Face repo or a URL).
        folder: The cache folder the files belong in.
        files: Each file the loader reads, as the names it accepts for it (the first is downloaded).
        ref: The file naming the commit ``folder`` stands for, when the loader asks for a branch.
    """

    source: str
    folder: Path
    files: tuple[tuple[str, ...], ...]
    ref: Path | None = None

    def missing(self) -> list[Path]:
        """The files still to be put into the cache (empty: the loader finds everything)."""
        files = [self.folder / names[0] for names in self.files if not any((self.folder / n).is_file() for n in names)]
        return [self.ref] + files if self.ref is not None and not self.ref.is_file() else files


def _hf_cache(repo_id: str, revision: str | None, files: tuple[tuple[str, ...], ...]) -> CachedWeights:
    """A Hugging Face hub download's snapshot folder, read at call time (HF_HUB_CACHE)."""
    storage = Path(hf_constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    revision = revision or "main"
    if REGEX_COMMIT_HASH.fullmatch(revision):
        return CachedWeights(f"{repo_id}@{revision}", storage / "snapshots" / revision, files)
    # A branch (timm's "main"): the cache's refs/<branch> names the commit whose snapshot is read.
    ref = storage / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else "<commit>"
    return CachedWeights(f"{repo_id}@{revision}", storage / "snapshots" / commit, files, ref)


def _smp_cache(encoder_name: str, weights: str) -> CachedWeights:
    # smp's get_encoder downloads config.json, then model.safetensors, at a pinned revision.
    settings = smp.encoders.encoders[encoder_name]["pretrained_settings"][weights]
    return _hf_cache(settings["repo_id"], settings["revision"], (("config.json",), ("model.safetensors",)))


def _timm_cache(timm_name: str) -> CachedWeights | None:
    """Where timm's ``load_pretrained`` looks for a tagged model's weights (None: not a download)."""
    # NOTE: timm's own (private) resolver, as timm has no public one: the files named are then the
    # ones its loader reads (HF hub or URL, old-cache setting); the weights-cache tests catch a change.
    load_from, location = _resolve_pretrained_source(timm.models.get_pretrained_cfg(timm_name).to_dict())
    if load_from == "url":
        file = Path(urlparse(location).path).name
        return CachedWeights(location, Path(torch.hub.get_dir()) / "checkpoints", ((file,),))
    if load_from == "hf-hub":
        hub_id, filename = location if isinstance(location, tuple) else (location, None)
        repo_id, _, revision = hub_id.partition("@")  # timm's "<repo>@<revision>" form
        # Without a file name timm tries model.safetensors first, then pytorch_model.bin.
        files = ((filename,),) if filename else (("model.safetensors", "pytorch_model.bin"),)
        return _hf_cache(repo_id, revision, files)
    return None


def _fit_dpt_decoder(model: nn.Module, options: dict[str, Any]) -> None:
    """Give smp's DPT a decoder that fits its ViT's token grid when the patch is no power of two.

    smp resizes the token maps by ``patch / 4``, ``patch / 8``, ... (to strides 4 to 32), whole factors
    only for a power-of-two patch. A patch-14 ViT (DINOv2) gets the factors of a patch-16 one instead,
    4, 2, 1 and 1/2 of the token grid, as UniMatch V2's DPT head does (LiheYoung/UniMatch-V2
    model/semseg/dpt.py:43-63); its logits come out at 16/14 of the input, and the forward resizes
    them to it (bilinear, align corners, as dpt.py:170 resizes its own).
    """
    patch, channels = model.encoder.output_stride, model.encoder.out_channels
    if patch & (patch - 1) == 0:
        return
    defaults = inspect.signature(smp.DPT).parameters

    def option(name: str) -> Any:
        return options.get(name, defaults[name].default)

    model.decoder = DPTDecoder(
        encoder_out_channels=channels,
        encoder_output_strides=[DPT_TOKEN_STRIDE] * len(channels),
        encoder_has_prefix_tokens=model.encoder.has_prefix_tokens,
        readout=option("decoder_readout"),
        intermediate_channels=option("decoder_intermediate_channels"),
        fusion_channels=option("decoder_fusion_channels"),
    )
    smp_init.initialize_decoder(model.decoder)


def _dpt_input_divisor(encoder: nn.Module) -> int:
    """What DPT inputs must be a multiple of: the patch, times what its deepest reassembled map halves.

    The decoder resizes its token maps to strides 4, 8, 16, 32 of a power-of-two patch's size (or of
    `DPT_TOKEN_STRIDE`'s) and fuses each deeper one into the next, doubled: a map coarser than the
    token grid must divide it (an even grid with four maps at patch 14 or 16).
    """
    patch, maps = encoder.output_stride, len(encoder.out_channels)
    built_for = patch if patch & (patch - 1) == 0 else DPT_TOKEN_STRIDE
    return patch * max(1, 2 ** (maps + 1) // built_for)


def _build(arch: str, **kwargs: Any) -> nn.Module:
    """``smp.create_model``; a DPT's ViT takes any input size and fits its decoder (`_fit_dpt_decoder`)."""
    if arch.lower() == "dpt":
        # timm ViTs with a fixed input size (DINOv2's 518) interpolate their position embeddings instead.
        kwargs = {"dynamic_img_size": True, **kwargs}
    model = smp.create_model(arch, **kwargs)
    if isinstance(model, smp.DPT):
        _fit_dpt_decoder(model, kwargs)
        # The decoder reads intermediate blocks only: the blocks after the last one it reads, the final
        # norm and the classifier would get no gradient (and multi-GPU training would refuse them).
        model.encoder.model.prune_intermediate_layers(model.encoder._output_indices, prune_norm=True)
    return model


def _pretrained_model(arch: str, encoder_name: str, weights: str, **kwargs: Any) -> nn.Module:
    """An smp model whose encoder smp (or, for ``tu-`` encoders, timm) loads named weights into."""
    if encoder_name.startswith("tu-"):
        model, tag = timm.models.split_model_name_tag(encoder_name[3:])
        if tag:
            raise ValueError(
                f"encoder_name {encoder_name!r} carries a pretrained tag; pass it as encoder_weights "
                f"(encoder_name='tu-{model}', encoder_weights={tag!r})"
            )
        tag = timm.models.get_pretrained_cfg(model).tag if weights == TIMM_DEFAULT_WEIGHTS else weights
        # smp hands `tu-<model>.<tag>` with weights=True to timm.create_model(pretrained=True).
        smp_name, smp_weights, cache = f"tu-{model}.{tag}", True, _timm_cache(f"{model}.{tag}")
        described = f"encoder_weights={weights!r} (timm's {model}.{tag}) for {encoder_name}"
    else:
        smp_name, smp_weights, cache = encoder_name, weights, _smp_cache(encoder_name, weights)
        described = f"encoder_weights={weights!r} for {encoder_name}"

    def no_cached_file(cause: str) -> ValueError:
        missing = cache.missing()
        files, it = ", ".join(map(str, missing)), "them" if len(missing) > 1 else "it"
        return ValueError(
            f"{described}: no cached file {files} ({cause}; source {cache.source}); "
            f"download {it} on a machine with a network or put {it} there"
        )

    # Offline, torch hub would still try to download: say what is missing before any attempt.
    if cache is not None and hf_constants.is_offline_mode() and cache.missing():
        raise no_cached_file("offline: HF_HUB_OFFLINE is set")
    try:
        return _build(arch, encoder_name=smp_name, encoder_weights=smp_weights, **kwargs)
    except (OSError, EntryNotFoundError) as exc:  # no connection, offline, HTTP errors
        if cache is None or not cache.missing():
            raise
        raise no_cached_file(f"download failed: {type(exc).__name__}") from exc


def create_smp_model(arch: str, encoder_name: str, encoder_weights: str | None = None, **kwargs: Any) -> nn.Module:
    """``smp.create_model`` with this suite's ``encoder_weights``: the one place that resolves them.

    Named weights go through smp's and timm's own model builders (not a state dict loaded
    afterwards), so their checkpoint filters and input-channel adaptation apply.

    Args:
        arch: smp architecture name (case-insensitive).
        encoder_name: smp encoder name (``resnet18``) or a timm one (``tu-resnet10t``).
        encoder_weights: None for random init, ``synthetic-source`` (the embedded benchmark's
            pretrained encoder, `src.networks.source_encoder`), a name from `weight_names` (looked up
            first), or the path of a local encoder (or whole-model) state dict (see `load_encoder_weights`).
        **kwargs: Further arguments of ``smp.create_model`` (``classes``, architecture options).
    """
    if arch.lower() not in smp.MODEL_ARCHITECTURES_MAPPING:
        raise ValueError(f"unknown arch {arch!r}; expected one of {available_architectures()}")
    _check_encoder(encoder_name)
    if encoder_weights is None:
        return _build(arch.lower(), encoder_name=encoder_name, encoder_weights=None, **kwargs)
    if encoder_weights == SOURCE_WEIGHTS:
        # The embedded benchmark's own pretrained encoder: trained once for this network, then cached.
        options = {k: v for k, v in kwargs.items() if k != "classes"}
        encoder_weights = str(source_encoder(arch, encoder_name, options))
    names = weight_names(encoder_name)
    if encoder_weights in names:
        return _pretrained_model(arch.lower(), encoder_name, encoder_weights, **kwargs)
    if not Path(encoder_weights).is_file():
        raise ValueError(
            f"encoder_weights={encoder_weights!r} for {encoder_name}: expected None, the path of a local "
            f"weights file (none there), {SOURCE_WEIGHTS!r}, or a weight name for this encoder: {names}"
        )
    model = _build(arch.lower(), encoder_name=encoder_name, encoder_weights=None, **kwargs)
    load_encoder_weights(model, encoder_weights)
    return model


def load_encoder_weights(model: nn.Module, path: str) -> None:
    """Load a local state dict into ``model.encoder`` (keys may carry an ``encoder.`` prefix)."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"encoder_weights={path!r}: no such weights file")
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
        encoder_weights: None for random init; a weight name smp or timm knows for the encoder
            (``imagenet``, ``ssl``, ``swsl`` for smp's; ``imagenet``, timm's default tag, or a
            timm pretrained tag such as ``a1_in1k`` for ``tu-`` ones), loaded through their own
            caches; ``synthetic-source``, the embedded benchmark's pretrained encoder
            (`src.networks.source_encoder`); or the path of a local weights file.
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
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.model = create_smp_model(arch, encoder_name, encoder_weights, classes=num_classes, **(model_options or {}))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.stride = self._input_divisor()
        # An OrderedDict: RemovableHandle keeps a weak reference to it, which a plain dict does not allow.
        self._pass_hooks: OrderedDict[int, Callable[[Tensor, bool], None]] = OrderedDict()

    def _input_divisor(self) -> int:
        if not getattr(self.model, "requires_divisible_input_shape", True):
            return 1
        if isinstance(self.model, smp.DPT):
            return _dpt_input_divisor(self.model.encoder)
        return int(getattr(self.model.encoder, "output_stride", 32))

    @property
    def feature_channels(self) -> int:
        """Channels of the decoder features returned by `forward_features`."""
        head = self.model.segmentation_head
        return next(m for m in head.modules() if isinstance(m, nn.Conv2d)).in_channels

    @property
    def _first_feature_map(self) -> int:
        # smp's convolutional encoders list the input itself first; a ViT's maps are all tokens.
        return 0 if isinstance(self.model, smp.DPT) else 1

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        """The encoder's parameters (a method may train them at a learning rate of their own)."""
        return self.model.encoder.parameters()

    @property
    def encoder_width(self) -> int:
        """Channels of the widest encoder map the decoder reads (a ViT's: its embedding width)."""
        return max(self.model.encoder.out_channels[self._first_feature_map:])

    def register_pass_hook(self, hook: Callable[[Tensor, bool], None]) -> RemovableHandle:
        """Call ``hook(images, perturbed)`` as each pass through the network starts.

        Every pass counts once: `forward`, `forward_features` and `forward_channel_scaled` with
        ``perturbed`` False, `forward_perturbed` with True. A way to count passes and their batch sizes from outside
        (``benchmarks/bench_step.py``). The returned handle's ``remove()`` unregisters the hook.
        """
        handle = RemovableHandle(self._pass_hooks)
        self._pass_hooks[handle.id] = hook
        return handle

    def _prepare(self, images: Tensor, perturbed: bool = False) -> tuple[Tensor, int, int]:
        for hook in self._pass_hooks.values():
            hook(images, perturbed)
        height, width = images.shape[-2:]
        x = (images - self.mean) / self.std
        pad_h, pad_w = -height % self.stride, -width % self.stride
        if pad_h or pad_w:
            # Reflect needs the pad to be smaller than the side; tiny images fall back to replicate.
            mode = "reflect" if pad_h < height and pad_w < width else "replicate"
            x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
        return x, height, width

    def _encode(self, x: Tensor) -> tuple[list[Tensor], list[Tensor | None] | None]:
        """The encoder maps and, for DPT, each map's prefix (class) tokens, which its decoder also reads."""
        encoded = self.model.encoder(x)
        return encoded if isinstance(self.model, smp.DPT) else (encoded, None)

    def _decode(
        self, maps: list[Tensor], prefix: list[Tensor | None] | None, size: torch.Size
    ) -> tuple[Tensor, Tensor]:
        """Logits at ``size`` (the padded input's) and the decoder features."""
        features = self.model.decoder(maps) if prefix is None else self.model.decoder(maps, prefix)
        logits = self.model.segmentation_head(features)
        if logits.shape[-2:] != size:  # a patch-14 DPT's (`_fit_dpt_decoder`)
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=True)
        return logits, features

    def forward_features(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Logits (B, C, H, W) at input size and decoder features (B, F, h, w) over the input.

        The features keep the decoder's own stride s (4 for DeepLabV3+, 1 for U-Net, 2 for a patch-16
        DPT, 1.75 for a patch-14 one). Of the padded input's grid they keep the ``ceil(H / s)`` rows and
        ``ceil(W / s)`` columns that reach into the image, so that labels of the (H, W) input sampled
        to (h, w) land on the cells they describe (at most one cell's drift, not the padding's).
        """
        x, height, width = self._prepare(images)
        logits, features = self._decode(*self._encode(x), x.shape[-2:])
        rows = -(-height * features.shape[-2] // x.shape[-2])
        cols = -(-width * features.shape[-1] // x.shape[-1])
        return logits[..., :height, :width], features[..., :rows, :cols]

    def forward_perturbed(
        self, images: Tensor, dropout_p: float = 0.5, levels: str = "reference"
    ) -> tuple[Tensor, Tensor]:
        """Logits (B, C, H, W) of a clean and a feature-perturbed stream from one encoder pass (UniMatch).

        The encoder features are decoded twice, as one doubled batch: as they are, and with channel
        dropout (``Dropout2d(dropout_p)``, on even in eval mode, like the reference's freshly built
        module) on some of them. The decoder's BatchNorm thus sees both streams (METHODS.md 8 step 3).

        Args:
            levels: Which maps are dropped in the perturbed stream. ``"reference"``: the first map
                at stride 4 or more (ResNet's layer1) and the deepest one, the reference's c1 and c4
                (LiheYoung/UniMatch model/semseg/deeplabv3plus.py:45); for DeepLabV3+ these are all
                that its decoder reads; for a ViT (DPT), the first and the last of its token maps.
                ``"all"``: every map but the input itself (which smp lists first).
        """
        if levels not in FP_LEVELS:
            raise ValueError(f"fp levels {levels!r}: expected one of {FP_LEVELS}")
        x, height, width = self._prepare(images, perturbed=True)
        features, prefix = self._encode(x)
        if levels == "all":
            dropped = set(range(self._first_feature_map, len(features)))
        else:
            shallow = next((i for i, f in enumerate(features) if 4 * f.shape[-1] <= x.shape[-1]), 0)
            dropped = {shallow, len(features) - 1}
        doubled = [
            torch.cat([f, F.dropout2d(f, dropout_p, training=True) if i in dropped else f])
            for i, f in enumerate(features)
        ]
        if prefix is not None:
            prefix = [None if t is None else torch.cat([t, t]) for t in prefix]
        logits = self._decode(doubled, prefix, x.shape[-2:])[0][..., :height, :width]
        clean, perturbed = logits.chunk(2)
        return clean, perturbed

    def forward_channel_scaled(self, images: Tensor, scales: Tensor) -> Tensor:
        """Logits (B, C, H, W) with every encoder map the decoder reads multiplied per image and channel.

        UniMatch V2's Complementary Dropout multiplies each of its four token maps by one (B, width)
        mask (LiheYoung/UniMatch-V2 model/semseg/dpt.py:148-161). A ViT's maps (and the prefix tokens
        that DPT's readout adds to them) all have the embedding width, so all take the whole of
        ``scales``. NOTE: a convolutional encoder's maps are narrower than its widest; a map of c
        channels takes the first c columns, so its channels are scaled as the ViT's are, but the
        masks of different maps are not independent.

        Args:
            images: (B, 3, H, W) [0, 1] images.
            scales: (B, `encoder_width`) factors.
        """
        if scales.shape != (len(images), self.encoder_width):
            raise ValueError(f"scales of shape {tuple(scales.shape)}; expected {(len(images), self.encoder_width)}")
        x, height, width = self._prepare(images)
        maps, prefix = self._encode(x)
        first = self._first_feature_map
        maps = [m if i < first else m * scales[:, : m.shape[1], None, None].to(m.dtype) for i, m in enumerate(maps)]
        if prefix is not None:  # (B, tokens, width)
            prefix = [None if t is None else t * scales[:, None, : t.shape[-1]].to(t.dtype) for t in prefix]
        return self._decode(maps, prefix, x.shape[-2:])[0][..., :height, :width]

    def compile_parts(self) -> None:
        """``torch.compile`` the encoder, decoder and head in place: every forward path uses them."""
        for part in (self.model.encoder, self.model.decoder, self.model.segmentation_head):
            part.compile()

    def forward(self, images: Tensor) -> Tensor:
        """Logits (B, C, H, W) at the input size."""
        return self.forward_features(images)[0]
