"""The three frozen models of stage 1, one loader per kind for real and tiny checkpoints.

Each loader returns a model object with two halves:

- ``preprocess``: a small picklable callable, run in DataLoader workers, that turns a
  decoded RGB picture into the model's input tensor (resized, still on the CPU), and
  ``decode_side``, the smallest side it needs a JPEG decoded at;
- ``__call__``: the forward pass on a batch, on the model's device.

Grid (eq 2): the last convolutional map of a ResNet, ``(B, G, C)`` with G = h x w regions
in row-major order. Objects (eq 3): COCO class names of Mask R-CNN detections, best first.
Caption (eq 4): the text of a Hugging Face image-to-text model.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn

from msvse.errors import MsvseError

from .archs import build_maskrcnn, build_resnet
from .config import CaptionConfig, GridConfig, ObjectsConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TINY_HINT = "or use the tiny offline models in models/tiny/ (the repository's params.yaml points there)"

# torchvision's COCO label space: index = COCO category id; "N/A" marks the ids COCO skips.
COCO_CATEGORIES: tuple[str, ...] = tuple(
    torchvision.models.detection.MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
)
NOT_A_CLASS = ("__background__", "N/A")
# The 80 classes COCO uses, in category-id order: detectron2's contiguous class ids.
COCO_THING_CLASSES: tuple[str, ...] = tuple(c for c in COCO_CATEGORIES if c not in NOT_A_CLASS)

TORCHVISION_COCO_WEIGHTS = {
    "maskrcnn_resnet50_fpn_v2": "MaskRCNN_ResNet50_FPN_V2_Weights",
    "maskrcnn_resnet50_fpn": "MaskRCNN_ResNet50_FPN_Weights",
}


# --- devices ---------------------------------------------------------------------------


def resolve_device(spec: str) -> torch.device:
    """``auto`` is the first GPU when there is one, else the CPU; a GPU that is not
    there is an error, not a silent fallback."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MsvseError(f"device {spec!r}: CUDA is not available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MsvseError(f"device {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Mixed precision on CUDA (bf16 or fp16); float32 on the CPU and with ``off``."""
    if device.type != "cuda" or precision == "off":
        yield
        return
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise MsvseError(f"{torch.cuda.get_device_name(device)} has no bfloat16 support: set extract.autocast to fp16 or off")
    with torch.autocast("cuda", dtype=dtype):
        yield


# --- weights ---------------------------------------------------------------------------


def read_state_dict(path: Path, what: str, key: str) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a ``.pth`` torch file, loaded
    without unpickling arbitrary objects. A checkpoint that wraps the state dict under
    ``model`` or ``state_dict`` is unwrapped."""
    if not path.is_file():
        raise MsvseError(
            f"{what}: weights file {str(path)!r} not found ({key}); point {key} at a local copy of the weights, {TINY_HINT}"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(path), device="cpu")
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to parse is the file's fault
        raise MsvseError(f"{what}: {path}: not a readable state dict ({type(exc).__name__}: {exc})") from None
    for wrapper in ("model", "state_dict"):
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
            data = data[wrapper]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise MsvseError(f"{what}: {path}: expected a state dict (parameter name -> tensor)")
    return data


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], what: str, source: str, key: str) -> None:
    """Load ``state`` strictly: weights of another architecture are an error naming the keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {keys[0]})")
        raise MsvseError(f"{what}: weights {source} do not fit the architecture: {', '.join(parts)}; check {key}")
    model.load_state_dict(state)


def _torchvision_weights(enum_name: str, member: str, what: str, key: str) -> dict[str, torch.Tensor]:
    """Weights that torchvision downloads (or finds in its cache, $TORCH_HOME)."""
    weights = getattr(torchvision.models, enum_name)[member]
    try:
        return weights.get_state_dict(progress=False, weights_only=True)
    except (OSError, RuntimeError) as exc:
        raise MsvseError(
            f"{what}: torchvision's {enum_name}.{member} could not be loaded ({type(exc).__name__}: {exc}). "
            f"Without network access, fetch {weights.url} elsewhere, copy it here and set {key} to its path, {TINY_HINT}"
        ) from None


def _frozen(module: nn.Module, device: torch.device) -> nn.Module:
    module.eval().requires_grad_(False)
    return module.to(device)


# --- grid: ResNet regions (eq 2) ----------------------------------------------------------


@dataclass(frozen=True)
class SquareResize:
    """The whole picture resized to ``size`` x ``size`` as a uint8 (3, S, S) tensor."""

    size: int

    def __call__(self, image: Image.Image) -> torch.Tensor:
        resized = image.resize((self.size, self.size), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1)  # (3, S, S) uint8


class GridModel:
    """ResNet without its pooling and classifier: ``(B, G, C)`` region features."""

    kind = "grid"

    def __init__(self, trunk: nn.Module, cfg: GridConfig, device: torch.device):
        self.trunk = _frozen(trunk, device)
        self.device = device
        self.preprocess = SquareResize(cfg.image_size)
        self.decode_side = cfg.image_size  # a JPEG may be decoded this small (both sides)
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        # (x / 255 - mean) / std as one multiply-add on the device
        self.gain, self.offset = 1.0 / (255.0 * std), mean / std
        with torch.inference_mode():
            probe = self.trunk(torch.zeros(1, 3, cfg.image_size, cfg.image_size, device=device))
        _, channels, h, w = probe.shape
        self.shape = (h * w, channels)  # (G, C)

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        x = images.to(self.device, non_blocking=True).float()  # (B, 3, S, S) in 0..255
        x = x * self.gain - self.offset  # ImageNet normalisation
        fmap = self.trunk(x)  # (B, C, h, w)
        regions = fmap.flatten(2).transpose(1, 2)  # (B, h*w, C), row-major regions
        return regions.float().cpu().numpy()


def load_grid(cfg: GridConfig, device: torch.device) -> GridModel:
    what = f"grid model {cfg.arch}"
    resnet = build_resnet(cfg.arch)
    if cfg.weights == "imagenet" or re.fullmatch(r"[A-Z0-9_]+", cfg.weights):
        member = "IMAGENET1K_V1" if cfg.weights == "imagenet" else cfg.weights
        enum_name = f"{_resnet_enum_stem(cfg.arch)}_Weights"
        if member not in getattr(torchvision.models, enum_name).__members__:
            raise MsvseError(f"extract.grid.weights: torchvision has no {enum_name}.{member}")
        state = _torchvision_weights(enum_name, member, what, "extract.grid.weights")
        source = f"{enum_name}.{member}"
    else:
        state = read_state_dict(Path(cfg.weights), what, "extract.grid.weights")
        source = cfg.weights
    load_weights(resnet, state, what, source, "extract.grid.arch")
    trunk = nn.Sequential(*list(resnet.children())[:-2])  # drop avgpool and fc
    return GridModel(trunk, cfg, device)


def _resnet_enum_stem(arch: str) -> str:
    return "ResNet" + arch.removeprefix("resnet")


# --- objects: Mask R-CNN labels (eq 3) ------------------------------------------------------


@dataclass(frozen=True)
class Detections:
    """One image's detections, best first: labels, scores (K,), boxes (K, 4) x1 y1 x2 y2
    in pixels of the upright original image."""

    labels: tuple[str, ...]
    scores: np.ndarray
    boxes: np.ndarray


@dataclass(frozen=True)
class ShortSideResize:
    """Resize so the short side is ``min_size`` and the long side at most ``max_size``,
    as a uint8 (3, H, W) tensor. ``rounding`` is the detector's own (``floor`` for
    torchvision, ``round`` for detectron2), so its internal resize is then a no-op."""

    min_size: int
    max_size: int
    rounding: str = "floor"

    def size(self, width: int, height: int) -> tuple[int, int]:
        scale = min(self.min_size / min(width, height), self.max_size / max(width, height))
        if self.rounding == "floor":
            return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
        return max(1, int(width * scale + 0.5)), max(1, int(height * scale + 0.5))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        resized = image.resize(self.size(*image.size), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1)  # (3, H, W) uint8


def select_detections(
    labels: Sequence[int], scores: np.ndarray, boxes: np.ndarray, names: Sequence[str], threshold: float, k: int
) -> Detections:
    """Keep real classes scoring above ``threshold``, best first, at most ``k``."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    keep = [i for i in order if scores[i] > threshold and names[int(labels[i])] not in NOT_A_CLASS][:k]
    return Detections(
        labels=tuple(names[int(labels[i])] for i in keep),
        scores=np.asarray([scores[i] for i in keep], dtype=np.float32),
        boxes=np.asarray([boxes[i] for i in keep], dtype=np.float32).reshape(-1, 4),
    )


class TorchvisionDetector:
    """A torchvision Mask R-CNN run on its box path only (no mask head, no mask pasting).

    Images go through one at a time: batching would pad each image to the largest in
    its batch, which shifts the features near its border, so an image's detections
    would depend on its neighbours (and a resumed or sharded run would differ).
    Mixed precision covers the backbone only: anchors, box decoding and NMS stay in
    float32 (in bfloat16 a coordinate near 1,000 px would move in steps of 8 px).
    """

    kind = "objects"

    def __init__(self, model: nn.Module, cfg: ObjectsConfig, device: torch.device):
        # Labels are all stage 2 needs: without a mask head, roi_heads skips the mask
        # branch and the transform skips pasting masks into the image.
        model.roi_heads.mask_roi_pool = None
        model.roi_heads.mask_head = None
        model.roi_heads.mask_predictor = None
        model.roi_heads.score_thresh = cfg.score_threshold
        self.model = _frozen(model, device)
        self.device = device
        self.cfg = cfg
        self.names = COCO_CATEGORIES
        self.preprocess = ShortSideResize(cfg.min_size, cfg.max_size, "floor")
        self.decode_side = cfg.min_size

    def __call__(
        self, images: Sequence[torch.Tensor], original_sizes: Sequence[tuple[int, int]], precision: str = "off"
    ) -> list[Detections]:
        m = self.model
        out = []
        for image, (width, height) in zip(images, original_sizes):
            x = image.to(self.device, non_blocking=True).float().div_(255.0)  # (3, H, W) in 0..1
            batch, _ = m.transform([x])  # normalised, padded to a multiple of 32
            with autocast(self.device, precision):
                features = m.backbone(batch.tensors)  # FPN levels, (1, 256, h_l, w_l) each
            features = {name: f.float() for name, f in features.items()}
            proposals, _ = m.rpn(batch, features)
            (pred,), _ = m.roi_heads(features, proposals, batch.image_sizes)
            (pred,) = m.transform.postprocess([pred], batch.image_sizes, [tuple(x.shape[1:])])
            boxes = pred["boxes"].cpu().numpy()  # (n, 4) in pixels of x
            boxes *= np.array([width / x.shape[2], height / x.shape[1]] * 2, dtype=np.float32)
            out.append(
                select_detections(
                    pred["labels"].cpu().numpy(),
                    pred["scores"].cpu().numpy(),
                    boxes,
                    self.names,
                    self.cfg.score_threshold,
                    self.cfg.max_objects,
                )
            )
        return out


def load_objects(cfg: ObjectsConfig, device: torch.device) -> Any:
    if cfg.backend == "detectron2":
        from .detectron2_backend import load_detectron2

        return load_detectron2(cfg, device)
    what = f"object detector {cfg.arch}"
    model = build_maskrcnn(cfg.arch, min_size=cfg.min_size, max_size=cfg.max_size)
    if cfg.weights == "coco":
        if cfg.arch not in TORCHVISION_COCO_WEIGHTS:
            raise MsvseError(
                f"extract.objects.weights: torchvision publishes no COCO weights for {cfg.arch}; "
                "give the path of a state dict for it"
            )
        state = _torchvision_weights(TORCHVISION_COCO_WEIGHTS[cfg.arch], "COCO_V1", what, "extract.objects.weights")
        source = f"{TORCHVISION_COCO_WEIGHTS[cfg.arch]}.COCO_V1"
    else:
        state = read_state_dict(Path(cfg.weights), what, "extract.objects.weights")
        source = cfg.weights
    load_weights(model, state, what, source, "extract.objects.arch")
    return TorchvisionDetector(model, cfg, device)


# --- caption: image-to-text (eq 4) ----------------------------------------------------------


@dataclass(frozen=True)
class ProcessorPreprocess:
    """The captioner's own image processor (resize, rescale, normalise): (3, H, W) float."""

    image_processor: Callable[..., Any]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]


class Captioner:
    """A Hugging Face image-to-text model decoding without sampling."""

    kind = "caption"

    def __init__(self, model: nn.Module, image_processor: Any, tokenizer: Any, cfg: CaptionConfig, device: torch.device):
        self.model = _frozen(model, device)
        self.tokenizer = tokenizer
        self.device = device
        self.cfg = cfg
        self.preprocess = ProcessorPreprocess(image_processor)
        self.decode_side = processor_side(image_processor)
        self.max_bytes = caption_bound(tokenizer, cfg.max_new_tokens)

    def __call__(self, pixel_values: torch.Tensor) -> list[str]:
        x = pixel_values.to(self.device, non_blocking=True)  # (B, 3, H, W)
        ids = self.model.generate(
            pixel_values=x, max_new_tokens=self.cfg.max_new_tokens, num_beams=self.cfg.num_beams, do_sample=False
        )  # (B, T)
        return [text.strip() for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]


def caption_bound(tokenizer: Any, max_new_tokens: int) -> int:
    """An upper bound, in UTF-8 bytes, on a decoded caption of ``max_new_tokens`` tokens
    plus a start token: each token decodes to at most the longest single-token text,
    plus a separating space. Fixed-width caption fields are this wide."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=True)
    longest = max((len(t.encode("utf-8")) for t in texts), default=1)
    return (max_new_tokens + 1) * (longest + 1)


def processor_side(image_processor: Any) -> int:
    """The largest side an image processor resizes to, or 0 (full scale) if unknown."""
    size = getattr(image_processor, "size", None)
    if hasattr(size, "to_dict"):
        size = size.to_dict()
    if isinstance(size, dict):
        return max((v for v in size.values() if isinstance(v, int)), default=0)
    return size if isinstance(size, int) else 0


def load_caption(cfg: CaptionConfig, device: torch.device) -> Captioner:
    from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    name = cfg.model
    looks_local = name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") > 1
    if looks_local and not Path(name).expanduser().is_dir():
        raise MsvseError(
            f"caption model {name!r}: no such folder (extract.caption.model); point it at a save_pretrained folder, {TINY_HINT}"
        )
    try:
        processor = AutoProcessor.from_pretrained(name)
        model = AutoModelForImageTextToText.from_pretrained(name)
        tokenizer = getattr(processor, "tokenizer", None) or AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MsvseError(
            f"caption model {name!r} could not be loaded ({reason}). Without access to the Hugging Face hub, "
            f"save the model where there is network (save_pretrained, or `hf download {name}`), copy the folder "
            f"here and set extract.caption.model to it, {TINY_HINT}"
        ) from None
    image_processor = getattr(processor, "image_processor", processor)
    return Captioner(model, image_processor, tokenizer, cfg, device)


# --- all kinds ---------------------------------------------------------------------------------


def load_kind(kind: str, cfg: Any, device: torch.device) -> Any:
    """The model of one kind, from the matching sub-config of ExtractConfig."""
    return {"grid": load_grid, "objects": load_objects, "caption": load_caption}[kind](getattr(cfg, kind), device)
