"""Network architectures of the frozen visual models, built without weights.

Both the real checkpoints (ResNet-152, COCO Mask R-CNN) and the tiny offline ones in
``models/tiny/`` are plain torchvision state dicts for one of these architectures, so
the tiny-model stage and the extraction loaders build the same modules from here.
"""

from __future__ import annotations

import torch
import torchvision
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

RESNET_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
MASKRCNN_ARCHS = ("maskrcnn_resnet50_fpn_v2", "maskrcnn_resnet50_fpn", "maskrcnn_resnet18_fpn_tiny")
COCO_NUM_CLASSES = 91  # torchvision's COCO label space: background + 90 ids, some unused

def build_resnet(arch: str) -> torchvision.models.ResNet:
    """An ImageNet-shaped torchvision ResNet with random weights."""
    if arch not in RESNET_ARCHS:
        raise ValueError(f"unknown ResNet architecture {arch!r} (known: {', '.join(RESNET_ARCHS)})")
    return getattr(torchvision.models, arch)(weights=None)

def resnet_grid_shape(arch: str, image_size: int) -> tuple[int, int]:
    """(regions, channels) of a ResNet's last convolutional map on a square input of
    ``image_size`` pixels: five stride-2 stages, so a side of ceil(image_size / 32)."""
    side = -(-image_size // 32)
    return side * side, build_resnet(arch).fc.in_features


def build_maskrcnn(arch: str, *, num_classes: int = COCO_NUM_CLASSES, min_size: int = 800, max_size: int = 1333) -> MaskRCNN:
    """A torchvision Mask R-CNN with random weights.

    ``maskrcnn_resnet18_fpn_tiny`` is ours: a ResNet-18 FPN backbone, a 256-wide box head
    and a 64-wide mask head, small enough to run a few hundred demo images on a CPU in minutes.
    """
    kwargs = dict(weights=None, weights_backbone=None, num_classes=num_classes, min_size=min_size, max_size=max_size)
    if arch == "maskrcnn_resnet50_fpn_v2":
        return maskrcnn_resnet50_fpn_v2(**kwargs)
    if arch == "maskrcnn_resnet50_fpn":
        return maskrcnn_resnet50_fpn(**kwargs)
    if arch == "maskrcnn_resnet18_fpn_tiny":
        backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)
        resolution = 7
        box_head = TwoMLPHead(backbone.out_channels * resolution**2, 256)

        return MaskRCNN(
            backbone,
            num_classes=None,
            min_size=min_size,
            max_size=max_size,
            box_head=box_head,
            box_predictor=FastRCNNPredictor(256, num_classes),
            mask_head=MaskRCNNHeads(backbone.out_channels, [64, 64], 1),
            mask_predictor=MaskRCNNPredictor(64, 64, num_classes),
        )
    raise ValueError(f"unknown Mask R-CNN architecture {arch!r} (known: {', '.join(MASKRCNN_ARCHS)})")

def num_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
