"""The paper's pipelines (pipelines/twitter2015, pipelines/twitter2017): typed params
that load, settings that match the paper and configs/, and a first stage that says
where the data should be when it is not there, and how to install detectron2 or switch
to torchvision when detectron2 does not import."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from msvse.config import load_section
from msvse.extract.config import ExtractConfig
from msvse.extract.config import ObjectsConfig
from msvse.extract.detectron2_backend import INSTALL
from msvse.pipeline.check import DataConfig, PipelineNotReady, check_data, check_pipeline
from msvse.pipeline.cli import main
from msvse.pipeline.report import ReportConfig
from msvse.train.config import TrainConfig

from .conftest import REPO, dvc

PRESETS = {"twitter2015": 3e-5, "twitter2017": 3e-5}  # section 5.1: one rate for both (Table 1)
HAVE_DETECTRON2 = importlib.util.find_spec("detectron2") is not None
SWITCH = "set extract.objects.backend: torchvision"


@pytest.mark.parametrize("name", PRESETS)
def test_preset_params_load_and_hold_the_papers_settings(name):
    params = REPO / "pipelines" / name / "params.yaml"
    data = load_section(params, "data", DataConfig)
    extract = load_section(params, "extract", ExtractConfig)
    train = load_section(params, "train", TrainConfig)
    report = load_section(params, "report", ReportConfig)

    assert (extract.grid.arch, extract.grid.weights) == ("resnet152", "imagenet")
    # The design's detector by default: detectron2's COCO Mask R-CNN R101-FPN 3x, the
    # model zoo's weights; torchvision's R50-FPN v2 is the documented alternative.
    assert extract.objects.backend == "detectron2"
    assert extract.objects.detectron2_config == "COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml"
    assert (extract.objects.arch, extract.objects.weights) == ("maskrcnn_resnet50_fpn_v2", "coco")
    assert (extract.objects.min_size, extract.objects.max_size, extract.objects.max_objects) == (800, 1333, 10)
    assert extract.caption.model == "Salesforce/blip-image-captioning-base"
    assert train.model.encoder == "bert-base-uncased"
    assert (train.optim.epochs, train.optim.batch_size) == (30, 32)
    assert train.optim.lr_encoder == train.optim.lr_heads == PRESETS[name]
    assert train.ablation == type(train.ablation)()  # every module on

    # One data set, named consistently across the sections.
    assert {s: getattr(train.data, s) for s in ("train", "valid", "test")} == {
        s: str(p) for s, p in data.split_paths().items()
    }
    assert all(Path(f).parent == Path(data.features) for f in train.data.features)
    assert report.run == train.output

    # The same training settings as configs/<name>.yaml (used with msvse-train by hand),
    # up to the paths, which are relative to the pipeline's folder here.
    by_hand = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())["train"]
    here = yaml.safe_load(params.read_text())["train"]
    for section in ("model", "ablation", "optim"):
        assert here[section] == by_hand[section], section


def test_missing_data_is_named_with_where_to_put_it(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"name": "Twitter-2015", "dir": str(tmp_path / "t15"),
                                               "images": str(tmp_path / "t15" / "images"),
                                               "features": str(tmp_path / "f")}}))
    result = CliRunner().invoke(main, ["check-data", "--params", str(params)])
    assert result.exit_code == 2
    message = result.output
    assert "Twitter-2015 is not in place" in message
    assert "train.txt, valid.txt, test.txt in " + str(tmp_path / "t15") in message
    assert "images folder " + str(tmp_path / "t15" / "images") in message
    assert "Traceback" not in message
    assert not (tmp_path / "f").exists()


def _posts(ids):
    return "".join(f"IMGID:{i}\nKobe\tB-PER\nrocks\tO\n\n" for i in ids)


def test_check_counts_missing_images_and_rejects_the_wrong_folder(tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    for split, ids in (("train", [1, 2, 3, 4]), ("valid", [5]), ("test", [6])):
        (root / f"{split}.txt").write_text(_posts(ids))
    cfg = DataConfig(name="T", dir=str(root), images=str(root / "images"), features=str(tmp_path / "f"))
    with pytest.raises(Exception, match=r"none of the 6 images .* Put the T images"):
        check_data(cfg)
    for i in (1, 2, 3, 4, 5):
        (root / "images" / f"{i}.jpg").write_bytes(b"x")
    with pytest.raises(Exception, match=r"1 of the 6 images .*max_missing_rate"):
        check_data(cfg)
    relaxed = DataConfig(**{**cfg.__dict__, "max_missing_rate": 0.2})
    report = check_data(relaxed)
    assert report["images"] == {"referenced": 6, "found": 5, "missing": 1, "missing_examples": ["6.jpg"]}
    assert report["splits"]["train"]["posts"] == 4 and report["splits"]["test"]["PER"] == 1
    written = (tmp_path / "f" / "data_check.json").read_bytes()
    check_data(relaxed)
    assert (tmp_path / "f" / "data_check.json").read_bytes() == written  # no timestamp: DVC sees no change
    assert json.loads(written)["images"]["found"] == 5


def _in_place(tmp_path) -> DataConfig:
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    for split, ids in (("train", [1, 2]), ("valid", [3]), ("test", [4])):
        (root / f"{split}.txt").write_text(_posts(ids))
    for i in (1, 2, 3, 4):
        (root / "images" / f"{i}.jpg").write_bytes(b"x")
    return DataConfig(name="T", dir=str(root), images=str(root / "images"), features=str(tmp_path / "f"))


def test_check_without_detectron2_gives_the_install_line_and_the_switch(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "detectron2", None)  # as if not installed
    data = _in_place(tmp_path)
    with pytest.raises(PipelineNotReady) as err:
        check_pipeline(data, ObjectsConfig(backend="detectron2"))
    (line,) = str(err.value).splitlines()  # the data is in place: one problem, one line
    assert "detectron2 cannot be imported" in line and INSTALL in line and SWITCH in line
    assert not (tmp_path / "f" / "data_check.json").exists()  # the stage failed: no report
    # Nothing falls back: torchvision runs only where the params say so.
    assert check_pipeline(data, ObjectsConfig(backend="torchvision"))["images"]["found"] == 4
    assert (tmp_path / "f" / "data_check.json").is_file()


def test_check_names_every_problem_at_once(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "detectron2", None)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"name": "Twitter-2015", "dir": str(tmp_path / "t15"),
                                               "images": str(tmp_path / "t15" / "images"), "features": str(tmp_path / "f")},
                                      "extract": {"objects": {"backend": "detectron2"}}}))
    result = CliRunner().invoke(main, ["check-data", "--params", str(params)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("Error: extract.objects.backend is detectron2")
    assert INSTALL in lines[0] and "Twitter-2015 is not in place" in lines[1]


@pytest.mark.skipif(not HAVE_DETECTRON2, reason="detectron2 is not installed")
def test_check_with_detectron2_resolves_the_config(tmp_path):
    data = _in_place(tmp_path)
    assert check_pipeline(data, ObjectsConfig(backend="detectron2"))["images"]["found"] == 4
    with pytest.raises(PipelineNotReady, match="neither a YAML file nor a detectron2 model-zoo config"):
        check_pipeline(data, ObjectsConfig(backend="detectron2", detectron2_config="COCO-InstanceSegmentation/nope.yaml"))


@pytest.mark.parametrize("name", PRESETS)
def test_dvc_repro_without_the_data_stops_at_the_check(tmp_path, name):
    project = tmp_path / "repo"
    pipe = project / "pipelines" / name
    pipe.mkdir(parents=True)
    for f in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / "pipelines" / name / f, pipe / f)
    for code in ("pipeline", "extract", "train"):
        shutil.copytree(REPO / code, project / code, ignore=shutil.ignore_patterns("__pycache__"))
    dvc(pipe, "init", "--no-scm", "-q")  # the folder is a DVC project of its own, as in the repository
    result = dvc(pipe, "repro", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Running stage 'check_data'" in output and "Running stage 'extract" not in output
    where = (project / "data" / name).resolve()
    assert f"train.txt, valid.txt, test.txt in {where}" in output
    assert f"images folder {where / 'images'}" in output
    # The default backend is detectron2: without it, the same stop says how to install it
    # or switch; with it, nothing about it.
    assert (INSTALL in output and SWITCH in output) is not HAVE_DETECTRON2


def _keys(tree: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in tree.items():
        out |= _keys(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"}
    return out


@pytest.mark.parametrize("params", ["params.yaml", "pipelines/twitter2015/params.yaml", "pipelines/twitter2017/params.yaml"])
def test_every_setting_is_spelt_out_so_dvc_exp_can_set_it(params):
    # `dvc exp run -S train.optim.seed=1` only sets a key that the file already has.
    from msvse.config import to_dict

    data = yaml.safe_load((REPO / params).read_text())
    for section, cls in (("extract", ExtractConfig), ("train", TrainConfig), ("report", ReportConfig)):
        assert _keys(data[section]) == _keys(to_dict(cls())), section
