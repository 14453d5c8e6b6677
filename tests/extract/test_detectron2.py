"""The detectron2 backend, on a tiny random Mask R-CNN saved in detectron2's format.

Skipped where detectron2 is not installed (it is built from source, not from the
package registry).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.detectron2
detectron2 = pytest.importorskip("detectron2")

from msvse.errors import MsvseError  # noqa: E402
from msvse.extract.config import ObjectsConfig  # noqa: E402
from msvse.features import FeatureStore  # noqa: E402
from msvse.extract.models import COCO_THING_CLASSES, load_objects  # noqa: E402
from msvse.extract.run import extract  # noqa: E402

ZOO = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_d2(tmp_path_factory):
    """A model-zoo Mask R-CNN config shrunk to ResNet-18 widths, randomly initialised,
    saved as a YAML config plus a detectron2 checkpoint."""
    from detectron2 import model_zoo
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    root = tmp_path_factory.mktemp("d2")
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(ZOO))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 64
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 32
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 200
    torch.manual_seed(0)
    model = build_model(cfg)
    (root / "tiny.yaml").write_text(cfg.dump())
    DetectionCheckpointer(model, save_dir=str(root)).save("tiny")
    return {"config": root / "tiny.yaml", "weights": root / "tiny.pth", "root": root}


def d2_config(tiny_d2, **kw) -> ObjectsConfig:
    base = ObjectsConfig(backend="detectron2", detectron2_config=str(tiny_d2["config"]), weights=str(tiny_d2["weights"]),
                         min_size=64, max_size=96, score_threshold=0.0, max_objects=5)
    return dataclasses.replace(base, **kw)


def picture(seed: int, size=(200, 150)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_detectron2_labels_best_first_in_original_pixels(tiny_d2):
    det = load_objects(d2_config(tiny_d2), CPU)
    assert not det.model.roi_heads.mask_on  # labels only: no mask head
    img = picture(1)
    x = det.preprocess(img)
    assert x.shape == (3, 64, 85)
    with torch.inference_mode():
        (out,) = det([x], [(200, 150)])
    assert 0 < len(out.labels) <= 5 and all(name in COCO_THING_CLASSES for name in out.labels)
    assert (np.diff(out.scores) <= 0).all()
    assert out.boxes[:, [0, 2]].max() <= 200 and out.boxes[:, [1, 3]].max() <= 150 and out.boxes.min() >= 0
    assert out.boxes[:, [0, 2]].max() > 85  # rescaled to the 200 x 150 original


def test_detectron2_backend_writes_a_shard(tmp_path, tiny_d2, tiny_config, photos):
    cfg = dataclasses.replace(tiny_config, objects=d2_config(tiny_d2, score_threshold=0.01))
    out = tmp_path / "objects.h5"
    summary = extract(photos, out, cfg, ["objects"], progress=False)
    assert summary["ok"] == 7
    feats = FeatureStore([out]).get("100.jpg")
    assert feats.labels is not None and all(name in COCO_THING_CLASSES for name in feats.labels)


def test_detectron2_weight_errors(tiny_d2, tmp_path, monkeypatch):
    with pytest.raises(MsvseError, match="weights file .*nope.pth.* not found.*models/tiny"):
        load_objects(d2_config(tiny_d2, weights=str(tmp_path / "nope.pth")), CPU)
    torch.save({"model": {"backbone.bottom_up.stem.conv1.weight": torch.zeros(3)}}, tmp_path / "other.pth")
    with pytest.raises(MsvseError, match="do not fit the model built from the config"):
        load_objects(d2_config(tiny_d2, weights=str(tmp_path / "other.pth")), CPU)
    with pytest.raises(MsvseError, match="neither a YAML file nor a detectron2 model-zoo config"):
        load_objects(d2_config(tiny_d2, detectron2_config="COCO-InstanceSegmentation/no_such.yaml"), CPU)
    with pytest.raises(MsvseError, match="not a model-zoo config"):
        load_objects(d2_config(tiny_d2, weights="coco"), CPU)


def test_detectron2_zoo_weights_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "cache"))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    cfg = ObjectsConfig(backend="detectron2", detectron2_config=ZOO, weights="coco", min_size=64, max_size=96)
    with pytest.raises(MsvseError) as err:
        load_objects(cfg, CPU)
    text = str(err.value)
    assert ZOO in text and "extract.objects.weights" in text and "models/tiny" in text
