"""Mask R-CNN through detectron2, the paper's backend (``extract.objects.backend: detectron2``).

detectron2 is not on the package registry: build it from source (:data:`INSTALL`, the
commit the tests passed on). It is imported only when this backend is chosen, and a
missing install is one line that gives that command and the switch to torchvision's
Mask R-CNN (:func:`import_detectron2`; the paper pipelines' first stage calls it too).
Model-zoo ``.pkl`` checkpoints are Python pickles that detectron2 itself unpickles:
point ``extract.objects.weights`` only at files you trust.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from msvse.errors import MsvseError

from .config import ObjectsConfig
from .models import COCO_THING_CLASSES, TINY_HINT, Detections, ShortSideResize, autocast, select_detections

#: The detectron2 commit this backend was tested with (torch 2.14.1).
COMMIT = "02b5c4e295e990042a714712c21dc79b731e8833"
#: How to install it: from source, against the torch already installed (hence no build
#: isolation; its setup.py still needs setuptools' pkg_resources, gone in setuptools 81).
INSTALL = (
    "pip install 'setuptools<81' && pip install --no-build-isolation "
    f"'git+https://github.com/facebookresearch/detectron2.git@{COMMIT}'"
)


class Detectron2Detector:
    """A detectron2 R-CNN without its mask head, one image at a time (see
    :class:`~msvse.extract.models.TorchvisionDetector` for why). Boxes come back in
    original-image pixels: detectron2 rescales them to the ``height``/``width`` given."""

    kind = "objects"

    def __init__(self, model: torch.nn.Module, input_format: str, cfg: ObjectsConfig, device: torch.device):
        self.model = model.eval().requires_grad_(False).to(device)
        self.bgr = input_format == "BGR"
        self.device = device
        self.cfg = cfg
        self.names = COCO_THING_CLASSES
        self.preprocess = ShortSideResize(cfg.min_size, cfg.max_size, "round")
        self.decode_side = cfg.min_size

    def __call__(
        self, images: Sequence[torch.Tensor], original_sizes: Sequence[tuple[int, int]], precision: str = "off"
    ) -> list[Detections]:
        from detectron2.modeling import GeneralizedRCNN

        m = self.model
        out = []
        for image, (width, height) in zip(images, original_sizes):
            x = image.to(self.device, non_blocking=True).float()  # (3, H, W) RGB in 0..255
            if self.bgr:
                x = x.flip(0)
            inputs = [{"image": x, "height": height, "width": width}]
            batch = m.preprocess_image(inputs)  # normalised, padded
            with autocast(self.device, precision):  # the backbone only, as for torchvision
                features = m.backbone(batch.tensor)
            features = {name: f.float() for name, f in features.items()}
            proposals, _ = m.proposal_generator(batch, features, None)
            results, _ = m.roi_heads(batch, features, proposals, None)
            # detectron2 rescales the boxes to the height and width given: original pixels.
            (pred,) = GeneralizedRCNN._postprocess(results, inputs, batch.image_sizes)
            inst = pred["instances"]
            # detectron2's classes are COCO's 80 used categories; map them into the
            # shared name list so both backends yield the same label strings.
            out.append(
                select_detections(
                    inst.pred_classes.cpu().numpy(),
                    inst.scores.float().cpu().numpy(),
                    inst.pred_boxes.tensor.float().cpu().numpy(),
                    self.names,
                    self.cfg.score_threshold,
                    self.cfg.max_objects,
                )
            )
        return out


def import_detectron2() -> str:
    """detectron2's version, once its model builder (and with it the compiled ops) imports.
    Otherwise one line saying how to install it and how to switch to torchvision."""
    try:
        with warnings.catch_warnings():
            # Its import warns that pkg_resources and torch.jit.script are deprecated:
            # detectron2's own code, nothing a user of this backend can act on.
            warnings.simplefilter("ignore", (UserWarning, FutureWarning, DeprecationWarning))
            import detectron2
            from detectron2 import model_zoo  # noqa: F401
            from detectron2.modeling import build_model  # noqa: F401
    except ImportError as exc:
        raise MsvseError(
            f"extract.objects.backend is detectron2, but detectron2 cannot be imported "
            f"({exc}). It is not on PyPI; build it from source (a C++ compiler, and for CUDA the toolkit torch was "
            f"built with): {INSTALL}. Or run torchvision's Mask R-CNN instead: set extract.objects.backend: "
            "torchvision in params.yaml (or dvc exp run -S extract.objects.backend=torchvision)"
        ) from None
    return str(detectron2.__version__)


def config_file(name: str) -> str:
    """The YAML file of ``extract.objects.detectron2_config``: a local file, or the
    model-zoo config of that name (shipped inside the detectron2 package)."""
    from detectron2 import model_zoo

    if Path(name).is_file():
        return name
    try:
        return model_zoo.get_config_file(name)
    except RuntimeError:
        raise MsvseError(
            f"extract.objects.detectron2_config: {name!r} is neither a YAML file nor a detectron2 model-zoo config "
            "(e.g. COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml)"
        ) from None


def load_detectron2(cfg: ObjectsConfig, device: torch.device) -> Detectron2Detector:
    import_detectron2()
    from detectron2 import model_zoo
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    name = cfg.detectron2_config
    what = f"object detector {name}"
    d2 = get_cfg()
    path = config_file(name)
    try:
        d2.merge_from_file(path)
    except (RuntimeError, OSError, KeyError, ValueError, AssertionError) as exc:
        raise MsvseError(f"extract.objects.detectron2_config: {path}: not a detectron2 config ({exc})") from None
    d2.MODEL.DEVICE = str(device)
    d2.MODEL.MASK_ON = False  # labels only: no mask head, no mask pasting
    d2.MODEL.ROI_HEADS.SCORE_THRESH_TEST = cfg.score_threshold
    d2.INPUT.MIN_SIZE_TEST = cfg.min_size
    d2.INPUT.MAX_SIZE_TEST = cfg.max_size
    if d2.MODEL.ROI_HEADS.NUM_CLASSES != len(COCO_THING_CLASSES):
        raise MsvseError(
            f"{what}: has {d2.MODEL.ROI_HEADS.NUM_CLASSES} classes; the labels need a COCO model "
            f"({len(COCO_THING_CLASSES)} classes)"
        )
    model = build_model(d2)

    if cfg.weights == "coco":
        try:
            weights = model_zoo.get_checkpoint_url(name)
        except RuntimeError:
            raise MsvseError(
                f"extract.objects.weights: 'coco' means the model zoo's checkpoint, and {name!r} is not a "
                "model-zoo config; give the checkpoint's path"
            ) from None
    else:
        weights = cfg.weights
        if not Path(weights).is_file():
            raise MsvseError(
                f"{what}: weights file {weights!r} not found (extract.objects.weights); "
                f"point it at a local detectron2 checkpoint, {TINY_HINT}"
            )

    incompatible: list[Any] = []

    class _Checkpointer(DetectionCheckpointer):
        def _log_incompatible_keys(self, keys: Any) -> None:
            incompatible.append(keys)
            # The checkpoint's mask head is expected to go unused: we built none.
            keys.unexpected_keys[:] = [k for k in keys.unexpected_keys if not k.startswith("roi_heads.mask_head.")]
            super()._log_incompatible_keys(keys)

    try:
        _Checkpointer(model).load(weights)
    except (OSError, RuntimeError, ValueError, KeyError, EOFError, AssertionError) as exc:
        raise MsvseError(
            f"{what}: weights {weights!r} could not be loaded ({type(exc).__name__}: {exc}). Without network "
            f"access, download the checkpoint elsewhere, copy it here and set extract.objects.weights to its path, {TINY_HINT}"
        ) from None
    for keys in incompatible:
        if keys.missing_keys or keys.incorrect_shapes:
            bad = (keys.missing_keys or [k for k, *_ in keys.incorrect_shapes])[0]
            raise MsvseError(
                f"{what}: weights {weights!r} do not fit the model built from the config "
                f"(e.g. {bad!r} missing or of another shape); check extract.objects.detectron2_config"
            )
    return Detectron2Detector(model, d2.INPUT.FORMAT, cfg, device)
