"""The dry run of a paper pipeline at its real sizes (``msvse-pipeline dry-run``): random
weights, synthetic posts and images, a CPU. Every stage of pipelines/twitter2015 runs
through DVC; the shards that reach the trainer have the real models' shapes (49 x 2048
grids, 10 labels, BLIP base captions) and the sizes the README's schema section states;
the run folder holds every output the README lists. With detectron2 installed the same
runs on the detectron2 backend too."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys

import h5py
import pytest
import yaml
from click.testing import CliRunner

from msvse.extract.detectron2_backend import INSTALL
from msvse.features import FeatureStore
from msvse.extract.models import COCO_THING_CLASSES, caption_bound
from msvse.pipeline.cli import main
from msvse.pipeline.dryrun import shard_layout

from .conftest import REPO

PIPELINE = REPO / "pipelines" / "twitter2015"
README = (REPO / "README.md").read_text(encoding="utf-8")
BACKENDS = [
    "torchvision",
    pytest.param("detectron2", marks=[pytest.mark.detectron2, pytest.mark.skipif(
        importlib.util.find_spec("detectron2") is None, reason="detectron2 is not installed")]),
]  # fmt: skip


@pytest.fixture(scope="module", params=BACKENDS)
def dry(request, tmp_path_factory):
    """One dry run of pipelines/twitter2015 per backend: 8 training posts (the smallest
    run; the pipeline's batch of 32 stays set), everything else at its real size."""
    out = tmp_path_factory.mktemp(f"dry-{request.param}") / "run"
    result = CliRunner().invoke(
        main, ["dry-run", str(PIPELINE), "--out", str(out), "--posts", "8", "--set", f"extract.objects.backend={request.param}"]
    )
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    yield out, out / "pipelines" / "twitter2015", json.loads((out / "dry_run.json").read_text()), result.output
    shutil.rmtree(out, ignore_errors=True)  # a few GB of random weights


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


@pytest.mark.slow
def test_every_stage_runs_and_the_table_says_what_each_took(dry):
    _, pipe, report, output = dry
    stages = list(yaml.safe_load((PIPELINE / "dvc.yaml").read_text())["stages"])
    assert [row["stage"] for row in report["stages"]] == stages
    table = output[output.index("stage "):]
    for row in report["stages"]:
        assert row["seconds"] > 0 and row["peak_mib"] > 0
        assert re.search(rf"^{row['stage']} +[\d.]+ +[\d,]+ MiB +(-|[\d,]+ MiB)  ", table, flags=re.M), row["stage"]
    assert "paper, Table 7: 119.27 M" in output
    # The model is the real size: its count is msvse-train --count-params's.
    from msvse.train.config import load_config
    from msvse.train.trainer import paper_size_model, parameter_report

    count = parameter_report(paper_size_model(load_config(PIPELINE / "params.yaml")))["total"]
    assert report["checkpoint"]["parameters"] == count
    assert report["models"]["encoder"]["vocabulary"] == 30522 and report["models"]["caption"]["vocabulary"] == 30524


@pytest.mark.slow
def test_the_params_are_the_pipelines_but_for_what_a_dry_run_must_change(dry):
    _, pipe, report, _ = dry
    mine = _flat(yaml.safe_load((PIPELINE / "params.yaml").read_text()))
    ran = _flat(yaml.safe_load((pipe / "params.yaml").read_text()))
    assert ran.keys() == mine.keys()
    differ = {k for k in mine if mine[k] != ran[k]}
    assert differ <= set(report["changed_params"]) | {"extract.objects.backend"}
    assert ran["train.optim.batch_size"] == 32 and ran["train.optim.epochs"] == 1
    assert ran["train.model.max_length"] is None and ran["extract.objects.min_size"] == 800


@pytest.mark.slow
def test_the_trainer_gets_real_sized_grids_ten_labels_and_blip_captions(dry):
    _, pipe, report, _ = dry
    shards = [pipe / "features" / f"{k}.h5" for k in ("grid", "objects", "caption")]
    store = FeatureStore(shards)
    assert store.grid_shape == (49, 2048)
    ok = [store.get(i) for i in store.ids if store.get(i).status == 0]
    assert len(ok) == len(store) - 1  # one image missing on purpose
    bound = caption_bound_of(pipe)
    for feats in ok:
        assert feats.grid.shape == (49, 2048)
        assert len(feats.labels) == 10 and set(feats.labels) <= set(COCO_THING_CLASSES)
        assert feats.caption and len(feats.caption.encode()) <= bound
    assert report["trainer_inputs"]["grid_shape"] == [49, 2048] and report["trainer_inputs"]["max_labels"] == 10
    built = json.loads((pipe / "runs/msvse/model/model.json").read_text())
    assert built["grid_shape"] == [49, 2048]


def caption_bound_of(pipe) -> int:
    from transformers import AutoProcessor

    params = yaml.safe_load((pipe / "params.yaml").read_text())["extract"]["caption"]
    processor = AutoProcessor.from_pretrained(pipe / params["model"])
    return caption_bound(processor.tokenizer, params["max_new_tokens"])


def readme_sizes() -> dict[str, tuple[str, int]]:
    """The README's table of the shard sizes with the paper's models: dataset ->
    (shape and type, bytes per image)."""
    section = README[README.index("### The feature file"):README.index("## Training (stage 2)")]
    table = section[section.index("| dataset | per image, paper's models | bytes |"):]
    rows = re.findall(r"^\| `([\w/]+)` \| ([^|]+?) \| ([\d,]+) \|", table, flags=re.M)
    return {name: (shape, int(size.replace(",", ""))) for name, shape, size in rows}


@pytest.mark.slow
def test_the_shards_have_the_sizes_the_readme_states(dry):
    _, pipe, report, _ = dry
    sizes = readme_sizes()
    assert set(sizes) == {"grid", "objects/labels", "objects/scores", "objects/boxes", "caption"}
    layout = {}
    for kind in ("grid", "objects", "caption"):
        layout.update(shard_layout(pipe / "features" / f"{kind}.h5")["datasets"])
        assert report["shards"][kind]["datasets"] == shard_layout(pipe / "features" / f"{kind}.h5")["datasets"]
    for name in ("grid", "objects/labels", "objects/scores", "objects/boxes", "caption"):
        shape, size = sizes[name]
        d = layout[name]
        assert d["row_bytes"] == size, name
        words = re.sub(r"utf-8, (\d+) bytes", r"\1-byte UTF-8", d["dtype"])
        assert shape.startswith(" x ".join(map(str, d["row_shape"])) + " ") or shape.startswith(words), (name, shape, d)
        assert words in shape, (name, shape, d)
    assert sizes["objects/labels"][1] == 10 * max(len(n.encode()) for n in COCO_THING_CLASSES)
    # The caption's width follows from the captioner's vocabulary (its longest token,
    # which the dry run's vocabulary shares with bert-base-uncased's): BLIP base's.
    with h5py.File(pipe / "features" / "caption.h5") as f:
        assert f["caption"].dtype.itemsize == caption_bound_of(pipe) == sizes["caption"][1]
    assert sizes["caption"][1] == (30 + 1) * (len("telecommunications") + 1)


@pytest.mark.slow
def test_the_run_folder_has_every_output_the_readme_lists(dry):
    _, pipe, _, _ = dry
    block = README[README.index("**5. Read the result.**"):]
    block = block[block.index("```\n") + 4:]
    listed = [line.split()[0] for line in block[: block.index("```")].splitlines() if line.strip()]
    assert len(listed) >= 15
    for path in listed:
        assert (pipe / path).exists(), path
    dvc = yaml.safe_load((PIPELINE / "dvc.yaml").read_text())
    outs = {(next(iter(o)) if isinstance(o, dict) else o) for s in dvc["stages"].values() for o in s.get("outs", []) + s.get("metrics", [])}
    params = yaml.safe_load((pipe / "params.yaml").read_text())
    expanded = {re.sub(r"\$\{([\w.]+)\}", lambda m: str(_flat(params)[m.group(1)]), o) for o in outs}
    assert expanded <= {p.rstrip("/") for p in listed}  # the README lists every output of dvc.yaml


def test_a_dry_run_refuses_a_folder_with_files_and_an_unknown_key(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = CliRunner().invoke(main, ["dry-run", str(PIPELINE), "--out", str(tmp_path), "--set", "extract.objects.backend=torchvision"])
    assert result.exit_code == 2 and "not an empty folder" in result.output and (tmp_path / "keep.txt").is_file()
    result = CliRunner().invoke(main, ["dry-run", str(PIPELINE), "--set", "extract.objects.backnd=torchvision"])
    assert result.exit_code == 2 and "extract.objects.backnd" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["dry-run", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "dvc.yaml: not found" in result.output


def test_a_dry_run_without_detectron2_says_how_to_get_it_or_switch(monkeypatch):
    monkeypatch.setitem(sys.modules, "detectron2", None)  # as if not installed
    result = CliRunner().invoke(main, ["dry-run", str(PIPELINE)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert INSTALL in result.output and "--set extract.objects.backend=torchvision" in result.output
