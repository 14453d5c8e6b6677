"""The ``extract`` section of ``params.yaml``: which frozen models stage 1 runs, and how.

With no params file every default names the real models of the paper's setting
(ResNet-152 on ImageNet, Mask R-CNN on COCO, BLIP base); the repository's
``params.yaml`` points them at the tiny offline models in ``models/tiny/``. Example::

    extract:
      batch_size: 16
      grid: {arch: resnet18, weights: models/tiny/resnet18.pth}
      objects: {arch: maskrcnn_resnet18_fpn_tiny, weights: models/tiny/maskrcnn_tiny.pth,
                min_size: 224, max_size: 224}
      caption: {model: models/tiny/blip}
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from msvse.config import bounds

from .archs import MASKRCNN_ARCHS, RESNET_ARCHS

ResnetArch = Literal[RESNET_ARCHS]  # type: ignore[valid-type]
MaskrcnnArch = Literal[MASKRCNN_ARCHS]  # type: ignore[valid-type]

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass(frozen=True)
class GridConfig:
    """Region features G: the last convolutional map of a torchvision ResNet.

    ``weights`` is ``"imagenet"`` (torchvision's IMAGENET1K_V1, the classic
    ``pretrained=True`` weights the MNER literature used), another torchvision weights
    name such as ``"IMAGENET1K_V2"``, or a local ``.pth``/``.safetensors`` state dict.
    Images are resized whole to ``image_size`` x ``image_size`` (no crop, so nothing at
    the edges is lost); 224 gives the 7 x 7 = 49 regions of the paper.
    """

    arch: ResnetArch = "resnet152"
    weights: str = "imagenet"
    image_size: int = field(default=224, metadata=bounds(min=32))


@dataclass(frozen=True)
class ObjectsConfig:
    """Visual labels C: COCO class names of Mask R-CNN detections (labels only; no masks).

    ``backend: torchvision`` builds ``arch`` and loads ``weights`` (``"coco"`` for
    torchvision's COCO_V1 weights of that arch, or a local ``.pth``/``.safetensors``
    state dict). ``backend: detectron2`` builds ``detectron2_config`` (a model-zoo
    config name or a local YAML file) and loads ``weights`` (``"coco"`` for the model
    zoo's checkpoint of that config, or a local ``.pkl``/``.pth`` detectron2 checkpoint).
    Detections scoring above ``score_threshold`` are kept, best first, at most
    ``max_objects`` of them. Images are resized so the short side is ``min_size``
    and the long side at most ``max_size``.
    """

    backend: Literal["torchvision", "detectron2"] = "torchvision"
    arch: MaskrcnnArch = "maskrcnn_resnet50_fpn_v2"
    weights: str = "coco"
    detectron2_config: str = "COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml"
    score_threshold: float = field(default=0.5, metadata=bounds(min=0.0, max=1.0, max_inclusive=False))
    max_objects: int = field(default=10, metadata=bounds(min=1, max=100))
    min_size: int = field(default=800, metadata=bounds(min=32))
    max_size: int = field(default=1333, metadata=bounds(min=32))

    def __post_init__(self) -> None:
        if self.max_size < self.min_size:
            raise ValueError(f"max_size ({self.max_size}) is smaller than min_size ({self.min_size})")


@dataclass(frozen=True)
class CaptionConfig:
    """Caption D: a Hugging Face image-to-text model (a hub name or a local
    ``save_pretrained`` folder), decoded deterministically: greedy for
    ``num_beams: 1``, beam search otherwise."""

    model: str = "Salesforce/blip-image-captioning-base"
    num_beams: int = field(default=3, metadata=bounds(min=1))
    max_new_tokens: int = field(default=30, metadata=bounds(min=1, max=512))


@dataclass(frozen=True)
class ExtractConfig:
    """Stage 1 settings. ``device`` is ``auto`` (CUDA when there is one), ``cpu``,
    ``cuda`` or ``cuda:K``; on CUDA the models run under autocast in ``autocast``
    precision (``off`` for float32). Images with more than ``max_pixels`` pixels are
    recorded as unreadable without being decoded."""

    grid: GridConfig = field(default_factory=GridConfig)
    objects: ObjectsConfig = field(default_factory=ObjectsConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    batch_size: int = field(default=16, metadata=bounds(min=1))
    num_workers: int = field(default=4, metadata=bounds(min=0))
    device: str = "auto"
    autocast: Literal["bf16", "fp16", "off"] = "bf16"
    # Pillow's own decompression-bomb threshold (about 9,500 x 9,500).
    max_pixels: int = field(default=89_478_485, metadata=bounds(min=1))

    def __post_init__(self) -> None:
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ValueError(f"device: expected auto, cpu, cuda or cuda:K, got {self.device!r}")


# Settings that change how fast a run goes but not what it writes: a run may be resumed
# with other values of these.
RUNTIME_ONLY = ("num_workers", "device")
