"""The three loaders on tiny checkpoints in the real formats, and their failures."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from msvse.errors import MsvseError
from msvse.extract.config import CaptionConfig, GridConfig, ObjectsConfig
from msvse.extract.models import (
    COCO_CATEGORIES,
    COCO_THING_CLASSES,
    caption_bound,
    load_caption,
    load_grid,
    load_objects,
    resolve_device,
    select_detections,
)

CPU = torch.device("cpu")


def picture(seed: int, size=(120, 90)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)


def test_grid_is_49_regions_of_the_last_conv_map(tiny_models):
    model = load_grid(GridConfig(arch="resnet18", weights=str(tiny_models["resnet"])), CPU)
    assert model.shape == (49, 512)
    x = torch.stack([model.preprocess(picture(0)), model.preprocess(picture(1))])
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.uint8
    with torch.inference_mode():
        out = model(x)
        again = model(x[:1])
    assert out.shape == (2, 49, 512) and out.dtype == np.float32
    np.testing.assert_allclose(out[:1], again, rtol=1e-5, atol=1e-5)  # deterministic, batch-independent
    assert not np.allclose(out[0], out[1])


def test_grid_rows_are_the_map_in_row_major_order(tiny_models):
    model = load_grid(GridConfig(arch="resnet18", weights=str(tiny_models["resnet"]), image_size=64), CPU)
    x = model.preprocess(picture(2))[None]
    with torch.inference_mode():
        regions = model(x)  # (1, 4, 512)
        fmap = model.trunk(x.float() * model.gain - model.offset)  # (1, 512, 2, 2)
    np.testing.assert_allclose(regions[0, 1], fmap[0, :, 0, 1].numpy(), rtol=1e-6)  # row 0, column 1
    np.testing.assert_allclose(regions[0, 2], fmap[0, :, 1, 0].numpy(), rtol=1e-6)  # row 1, column 0


def test_grid_safetensors_weights_load_the_same(tiny_models, tmp_path):
    from safetensors.torch import save_file

    state = torch.load(tiny_models["resnet"], weights_only=True)
    save_file(state, tmp_path / "r18.safetensors")
    a = load_grid(GridConfig(arch="resnet18", weights=str(tiny_models["resnet"]), image_size=64), CPU)
    b = load_grid(GridConfig(arch="resnet18", weights=str(tmp_path / "r18.safetensors"), image_size=64), CPU)
    x = a.preprocess(picture(3))[None]
    with torch.inference_mode():
        np.testing.assert_array_equal(a(x), b(x))


def test_weights_of_another_arch_are_refused(tiny_models):
    with pytest.raises(MsvseError, match="do not fit the architecture.*extract.grid.arch"):
        load_grid(GridConfig(arch="resnet34", weights=str(tiny_models["resnet"])), CPU)


def test_wrong_weights_path_says_how_to_fix(tmp_path):
    with pytest.raises(MsvseError) as err:
        load_grid(GridConfig(arch="resnet18", weights=str(tmp_path / "nope.pth")), CPU)
    text = str(err.value)
    assert "grid model resnet18" in text and "nope.pth" in text and "extract.grid.weights" in text and "models/tiny" in text
    with pytest.raises(MsvseError, match="object detector maskrcnn_resnet18_fpn_tiny.*models/tiny"):
        load_objects(ObjectsConfig(arch="maskrcnn_resnet18_fpn_tiny", weights=str(tmp_path / "nope.pth")), CPU)


def test_a_pickle_that_is_not_a_state_dict_is_refused(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"model": "not tensors"}, bad)
    with pytest.raises(MsvseError, match="expected a state dict"):
        load_grid(GridConfig(arch="resnet18", weights=str(bad)), CPU)
    (tmp_path / "junk.pth").write_text("junk")
    with pytest.raises(MsvseError, match="not a readable state dict"):
        load_grid(GridConfig(arch="resnet18", weights=str(tmp_path / "junk.pth")), CPU)


def test_imagenet_weights_without_network_say_how_to_fix(tmp_path, monkeypatch):
    # An empty torch cache and a proxy nobody listens on: the download must fail here
    # even on a machine with network access.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    with pytest.raises(MsvseError) as err:
        load_grid(GridConfig(arch="resnet18", weights="imagenet"), CPU)
    text = str(err.value)
    assert "ResNet18_Weights.IMAGENET1K_V1" in text and "https://" in text and "models/tiny" in text


def test_coco_weights_for_the_tiny_arch_are_refused():
    with pytest.raises(MsvseError, match="no COCO weights for maskrcnn_resnet18_fpn_tiny"):
        load_objects(ObjectsConfig(arch="maskrcnn_resnet18_fpn_tiny", weights="coco"), CPU)


def detector(tiny_models, **kw):
    cfg = ObjectsConfig(arch="maskrcnn_resnet18_fpn_tiny", weights=str(tiny_models["maskrcnn"]),
                        min_size=96, max_size=128, score_threshold=0.012, max_objects=5)
    return load_objects(dataclasses.replace(cfg, **kw), CPU)


def test_detections_are_coco_names_best_first_at_most_k(tiny_models):
    det = detector(tiny_models)
    assert not det.model.roi_heads.has_mask()  # the mask branch (and pasting) is skipped
    img = picture(4, size=(400, 300))
    x = det.preprocess(img)
    assert x.shape == (3, 96, 128)
    with torch.inference_mode():
        (out,) = det([x], [(400, 300)])
    assert 0 < len(out.labels) <= 5
    assert all(name in COCO_THING_CLASSES for name in out.labels)
    assert (np.diff(out.scores) <= 0).all() and (out.scores > 0).all()
    assert out.boxes.shape == (len(out.labels), 4)
    # boxes are in pixels of the 400 x 300 original, not of the 128 x 96 model input
    assert (out.boxes[:, 0] <= out.boxes[:, 2]).all() and (out.boxes[:, 1] <= out.boxes[:, 3]).all()
    assert out.boxes.min() >= 0 and out.boxes[:, [0, 2]].max() <= 400 and out.boxes[:, [1, 3]].max() <= 300
    assert out.boxes[:, [0, 2]].max() > 128


def test_score_threshold_and_k(tiny_models):
    img = picture(5, size=(200, 150))
    loose = detector(tiny_models, max_objects=50)
    with torch.inference_mode():
        (all_dets,) = loose([loose.preprocess(img)], [(200, 150)])
    assert len(all_dets.labels) > 2
    cut = float(all_dets.scores[len(all_dets.scores) // 2])
    strict = detector(tiny_models, score_threshold=cut, max_objects=50)
    with torch.inference_mode():
        (kept,) = strict([strict.preprocess(img)], [(200, 150)])
    assert (kept.scores > cut).all() and len(kept.labels) < len(all_dets.labels)


def test_preresize_matches_the_detectors_own_resize(tiny_models):
    det = detector(tiny_models, min_size=100, max_size=150)
    for size in [(400, 300), (300, 400), (1000, 200), (123, 77), (64, 64)]:
        x = det.preprocess(Image.new("RGB", size)).float()
        resized, _ = det.model.transform.resize(x, None)
        assert resized.shape == x.shape, size


def test_select_detections_drops_non_classes_and_orders():
    names = COCO_CATEGORIES
    labels = [1, 12, 3, 0, 18]  # person, N/A, car, __background__, dog
    scores = np.array([0.6, 0.9, 0.8, 0.95, 0.4], np.float32)
    boxes = np.arange(20, dtype=np.float32).reshape(5, 4)
    det = select_detections(labels, scores, boxes, names, threshold=0.5, k=10)
    assert det.labels == ("car", "person")
    np.testing.assert_array_equal(det.boxes, boxes[[2, 0]])
    assert select_detections(labels, scores, boxes, names, threshold=0.0, k=1).labels == ("car",)
    assert select_detections([], np.zeros(0), np.zeros((0, 4)), names, 0.5, 3).boxes.shape == (0, 4)


def test_captioner_decodes_text_within_its_bound(tiny_models):
    cap = load_caption(CaptionConfig(model=str(tiny_models["blip"]), num_beams=2, max_new_tokens=6), CPU)
    x = torch.stack([cap.preprocess(picture(i)) for i in range(3)])
    with torch.inference_mode():
        texts = cap(x)
        single = cap(x[1:2])
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert single == texts[1:2]
    assert max(len(t.encode()) for t in texts) <= cap.max_bytes == caption_bound(cap.tokenizer, 6)


def test_caption_hub_name_offline_says_how_to_fix(monkeypatch):
    from huggingface_hub import try_to_load_from_cache

    name = CaptionConfig().model
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        pytest.skip(f"{name} is in this machine's Hugging Face cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MsvseError) as err:
        load_caption(CaptionConfig(), CPU)
    text = str(err.value)
    assert name in text and "extract.caption.model" in text and "models/tiny" in text


def test_caption_wrong_folder_says_how_to_fix(tmp_path):
    with pytest.raises(MsvseError, match="no such folder.*extract.caption.model.*models/tiny"):
        load_caption(CaptionConfig(model=str(tmp_path / "blip")), CPU)


def test_devices():
    assert resolve_device("cpu") == CPU
    if not torch.cuda.is_available():
        assert resolve_device("auto") == CPU
        with pytest.raises(MsvseError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_detectron2_backend_without_detectron2_says_so():
    import importlib.util

    if importlib.util.find_spec("detectron2") is not None:
        pytest.skip("detectron2 is installed here (its own tests cover the backend)")
    with pytest.raises(MsvseError, match="detectron2 cannot be imported.*backend: torchvision"):
        load_objects(ObjectsConfig(backend="detectron2"), CPU)
