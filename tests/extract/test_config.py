"""The extract section: real models by default, tiny ones from params, strict keys."""

from __future__ import annotations

import pytest
import yaml

from msvse.config import from_dict, load_section, to_dict
from msvse.errors import ConfigError
from msvse.extract.config import ExtractConfig


def test_defaults_are_the_real_models():
    cfg = ExtractConfig()
    assert (cfg.grid.arch, cfg.grid.weights, cfg.grid.image_size) == ("resnet152", "imagenet", 224)
    assert (cfg.objects.backend, cfg.objects.arch, cfg.objects.weights) == ("torchvision", "maskrcnn_resnet50_fpn_v2", "coco")
    assert cfg.objects.detectron2_config.startswith("COCO-InstanceSegmentation/mask_rcnn_")
    assert cfg.caption.model == "Salesforce/blip-image-captioning-base"
    assert cfg.device == "auto" and cfg.autocast == "bf16"


def test_section_round_trips_through_json(params_file, tiny_config):
    cfg = load_section(params_file, "extract", ExtractConfig)
    assert cfg == tiny_config
    assert from_dict(ExtractConfig, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "section, words",
    [
        ({"grid": {"arch": "resnet9"}}, "extract.grid.arch: expected one of"),
        ({"objects": {"max_objects": 0}}, "extract.objects.max_objects: value must be >= 1"),
        ({"objects": {"min_size": 900, "max_size": 800}}, "max_size (800) is smaller than min_size"),
        ({"device": "gpu"}, "device: expected auto, cpu, cuda or cuda:K"),
        ({"caption": {"beams": 3}}, "extract.caption.beams: unknown key"),
        ({"autocast": "fp8"}, "extract.autocast: expected one of"),
    ],
)
def test_bad_values_name_the_key(tmp_path, section, words):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"extract": section}))
    with pytest.raises(ConfigError) as err:
        load_section(path, "extract", ExtractConfig)
    assert str(path) in str(err.value) and words in str(err.value)


def test_overrides_are_checked_like_the_file(params_file):
    cfg = load_section(params_file, "extract", ExtractConfig, overrides={"batch_size": 7, "device": "cuda:1"})
    assert cfg.batch_size == 7 and cfg.device == "cuda:1"
    with pytest.raises(ConfigError, match="batch_size"):
        load_section(params_file, "extract", ExtractConfig, overrides={"batch_size": 0})
