"""Bad input through the commands a user runs: each case ends in exit status 2 and one
line naming the file and line (or key), or in a fallback that is recorded and counted;
never a traceback, never a silent wrong result.

Covered elsewhere, not repeated here:
- the reader's every refusal, at library level: tests/foundation/test_twitter.py
  (and msvse-data stats on a bad file);
- msvse-extract's bad images, --ids-from a missing file, bad --shard/--kinds/--device,
  a misspelt extract key: tests/extract/test_cli.py, tests/extract/test_extract.py;
- a kill during extraction, then --resume: tests/extract/test_cli.py
  (test_killed_run_resumes_to_the_straight_file, test_sigkill_mid_run_then_resume);
- a kill during training, then --resume: tests/reliability/test_resume.py;
- a full disk during extraction and training: tests/reliability/test_disk_full.py;
- msvse-predict with an unknown tag or without --features: tests/train/test_predict.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import pytest
from click.testing import CliRunner

from msvse.extract.cli import main as extract_main
from msvse.features import write_shard
from msvse.train.cli import predict_main, train_main
from msvse.train.synthetic import synthetic_posts, write_features, write_posts
from msvse.twitter import read_posts


def _fails(command, args: list[str], *needles: str) -> str:
    result = CliRunner().invoke(command, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.exception is not None
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("Error: "), result.output
    for needle in needles:
        assert needle in line, line
    return line


@pytest.fixture
def params_for(corpus, bert_dir, tmp_path, tools):
    """A params file for the tiny corpus with some inputs swapped."""

    def build(data: dict | None = None, **sections) -> Path:
        section = tools.train_section(corpus, bert_dir, tmp_path / "run", data=data or {}, **sections)
        return tools.write_params(tmp_path / "params.yaml", section)

    return build


# --------------------------------------------------------------------------- data files

DATA = {
    "malformed line": ("train", "IMGID:tr0\nObama\tB-PER\nin Paris\n\n", ":3: expected 'token<TAB>tag', found no tab in 'in Paris'"),
    "unknown tag": ("valid", "IMGID:dv0\nObama\tB-PERSON\n\n", ":2: unknown tag 'B-PERSON'"),
    "OTHER is MISC, FOO is not": ("test", "IMGID:te0\nx\tB-OTHER\ny\tI-FOO\n\n", ":3: unknown tag 'I-FOO'"),
    "empty file": ("train", "", ": no posts found"),
    "blank lines only": ("valid", "\n\n\n", ": no posts found"),
    "tokens before any IMGID": ("test", "Obama\tB-PER\n\n", ":1: token line outside a post"),
    "id escaping the images folder": ("train", "IMGID:../../etc/passwd\nx\tO\n\n", ":1: image id '../../etc/passwd' contains a path separator"),
    "id '..'": ("train", "IMGID:..\nx\tO\n\n", ":1: image id '..' contains '..'"),
    "absolute id": ("valid", "IMGID:/etc/passwd\nx\tO\n\n", ":1: image id '/etc/passwd' contains a path separator"),
    "non-UTF-8 text": ("test", b"IMGID:te0\nObama\tB-PER\nCaf\xe9\tO\n\n", ":3: not UTF-8 text (byte 0xe9)"),
    "empty token": ("train", "IMGID:tr0\n\tO\n\n", ":2: empty token before the tab"),
}


@pytest.mark.parametrize("case", list(DATA))
def test_msvse_train_names_the_file_and_line_of_bad_data(case, params_for, tmp_path):
    split, content, message = DATA[case]
    bad = tmp_path / f"bad_{split}.txt"
    bad.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    params = params_for({split: str(bad)})
    _fails(train_main, ["--params", str(params)], f"{bad}{message}")
    assert not (tmp_path / "run").exists(), "nothing is written for bad input"


def test_msvse_extract_refuses_ids_that_escape_the_images_folder(tmp_path):
    (tmp_path / "images").mkdir()
    bad = tmp_path / "posts.txt"
    bad.write_text("IMGID:1\nx\tO\n\nIMGID:../secret\ny\tO\n\n")
    _fails(extract_main, [str(tmp_path / "images"), str(tmp_path / "f.h5"), "--ids-from", str(bad)],
           f"{bad}:4: image id '../secret' contains a path separator")  # fmt: skip
    assert not (tmp_path / "f.h5").exists() and not (tmp_path / "f.h5.partial").exists()


# --------------------------------------------------------------------------- feature shards


def _retag(path: Path, **attrs) -> Path:
    with h5py.File(path, "r+") as f:
        for key, value in attrs.items():
            if value is None:
                del f.attrs[key]
            else:
                f.attrs[key] = value
    return path


def _shard_cases(corpus, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    grid = next(p for p in corpus.features if p.name == "grid.h5")

    def copy(name: str) -> Path:
        return Path(shutil.copy(grid, tmp_path / name))

    text = tmp_path / "text.h5"
    text.write_text("ids,grid\n1,2\n")
    truncated = copy("truncated.h5")
    truncated.write_bytes(truncated.read_bytes()[:2000])
    no_grid = tmp_path / "no_grid.h5"
    with h5py.File(copy("no_grid_src.h5"), "r") as src, h5py.File(no_grid, "w") as dst:
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        src.copy("ids", dst)
        src.copy("status", dst)
    pending = copy("pending.h5")
    with h5py.File(pending, "r+") as f:
        f["status"][:3] = -1
    return {
        "not HDF5": (text, "not a readable HDF5 file"),
        "cut short": (truncated, "not a readable HDF5 file"),
        "another format": (_retag(copy("other.h5"), format="someone-elses-features"),
                           "not an msvse feature file (format attribute is 'someone-elses-features'"),
        "no format attribute": (_retag(copy("bare.h5"), format=None), "not an msvse feature file (format attribute is None"),
        "newer schema": (_retag(copy("v2.h5"), schema_version=2), "schema_version 2 is not supported (this msvse reads 1)"),
        "unknown kind": (_retag(copy("masks.h5"), kinds='["grid", "masks"]'), "unknown kind 'masks'"),
        "kind without its dataset": (no_grid, "dataset 'grid' is missing"),
        "unfinished extraction": (pending, "an unfinished extraction (3 rows pending); complete it with msvse-extract --resume"),
        "no such file": (tmp_path / "absent.h5", "feature file not found"),
    }  # fmt: skip


SHARD_CASES = ["not HDF5", "cut short", "another format", "no format attribute", "newer schema", "unknown kind",
               "kind without its dataset", "unfinished extraction", "no such file"]  # fmt: skip


@pytest.mark.parametrize("case", SHARD_CASES)
def test_msvse_train_refuses_a_bad_shard_and_names_it(case, corpus, params_for, tmp_path):
    path, message = _shard_cases(corpus, tmp_path)[case]
    others = [str(p) for p in corpus.features if p.name != "grid.h5"]
    params = params_for({"features": [str(path), *others]})
    _fails(train_main, ["--params", str(params)], f"{path}: {message}")


def test_two_shards_claiming_one_image_are_refused(corpus, params_for, tmp_path):
    grid = next(p for p in corpus.features if p.name == "grid.h5")
    twin = Path(shutil.copy(grid, tmp_path / "twin.h5"))
    params = params_for({"features": [*map(str, corpus.features), str(twin)]})
    _fails(train_main, ["--params", str(params)], f"{twin}: image 'tr0.jpg' already has 'grid' features in {grid}")


# --------------------------------------------------------------------------- params


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda s: s["optim"].update(lr_encodr=1e-5), "train.optim.lr_encodr: unknown key (known keys: "),
        (lambda s: s.update(ablations={"prefix": False}), "train.ablations: unknown key"),
        (lambda s: s["optim"].update(epochs="three"), "train.optim.epochs: expected an integer, got 'three'"),
        (lambda s: s["model"].update(dropout=1.5), "train.model.dropout: value must be < 1"),
    ],
    ids=["misspelt key", "misspelt section", "wrong type", "out of range"],
)
def test_a_bad_params_file_names_the_file_and_key(mangle, corpus, bert_dir, tmp_path, tools, message):
    section = tools.train_section(corpus, bert_dir, tmp_path / "run")
    mangle(section)
    params = tools.write_params(tmp_path / "params.yaml", section)
    _fails(train_main, ["--params", str(params)], f"{params}: {message}")


def test_a_params_file_without_the_train_section_is_named(tmp_path, tools):
    params = tools.write_params(tmp_path / "params.yaml", {"epochs": 3}, stage="trian")
    _fails(train_main, ["--params", str(params)], f"{params}: missing section 'train'")


# --------------------------------------------------------------------------- counted fallbacks


@pytest.fixture(scope="module")
def fallback_run(corpus, bert_dir, tmp_path_factory, tools):
    """One epoch on data where 3 train images are in no shard and 1 dev post has no
    tokens: both are fallbacks, to be counted, not errors."""
    root = tmp_path_factory.mktemp("fallback")
    train = read_posts(corpus.train)
    valid = read_posts(corpus.valid)
    valid = valid[:3] + [type(valid[0])("dv_empty", (), ())] + valid[3:]
    valid_path = write_posts(root / "valid.txt", valid)
    lacking = [p.image_file for p in train[:3]]
    images = [p.image_file for p in train + valid + read_posts(corpus.test) if p.image_file not in lacking]
    features = write_features(root / "features", images)
    section = tools.train_section(corpus, bert_dir, root / "run", optim={"epochs": 1})
    section["data"].update(valid=str(valid_path), features=[str(p) for p in features])
    params = tools.write_params(root / "params.yaml", section)
    result = tools.run([str(tools.bin / "msvse-train"), "--params", str(params)])
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run", result.stderr, lacking


def test_images_absent_from_the_shards_are_counted_not_fatal(fallback_run):
    run, log, lacking = fallback_run
    inputs = json.loads((run / "metrics.json").read_text())["inputs"]
    assert inputs["train"]["not_in_features"] == len(lacking) == 3
    assert inputs["train"]["no_image"] == 3 and inputs["valid"]["no_image"] == 0
    assert "train: 32 posts, 32 windows; no image for 3 posts" in log
    recorded = json.loads((run / "train_config.json").read_text())["inputs"]
    assert recorded["train"]["not_in_features"] == 3


def test_a_post_without_tokens_is_kept_and_counted(fallback_run):
    run, log, _ = fallback_run
    inputs = json.loads((run / "metrics.json").read_text())["inputs"]
    assert inputs["valid"]["empty_posts"] == 1 and inputs["train"]["empty_posts"] == 0
    assert "valid: 1 posts have no tokens (first: " in log and "valid.txt:" in log and "IMGID:dv_empty" in log
    predicted = read_posts(run / "predictions" / "dev.txt")
    assert [p.image_id for p in predicted][3] == "dv_empty" and predicted[3].tokens == ()
    assert len(predicted) == 9


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer", "features.json"])
def test_msvse_predict_names_a_missing_checkpoint_file(name, fallback_run, corpus, tmp_path):
    run, _, _ = fallback_run
    model = Path(shutil.copytree(run / "model", tmp_path / "model"))
    target = model / name
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    args = ["--model", str(model), "--data", str(corpus.test), "--out", str(tmp_path / "out.txt")]
    args += [x for p in corpus.features for x in ("--features", str(p))]
    _fails(predict_main, args, f"{model}: checkpoint file '{name}' is missing")
    assert not (tmp_path / "out.txt").exists()


def test_msvse_predict_refuses_weights_cut_short(fallback_run, corpus, tmp_path):
    run, _, _ = fallback_run
    model = Path(shutil.copytree(run / "model", tmp_path / "model"))
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    args = ["--model", str(model), "--data", str(corpus.test), "--out", str(tmp_path / "out.txt")]
    args += [x for p in corpus.features for x in ("--features", str(p))]
    result = CliRunner().invoke(predict_main, args)
    assert result.exit_code == 2, result.output
    assert f"{weights}: not a readable safetensors file" in result.output and "Traceback" not in result.output


def test_shard_lacking_a_kind_the_model_reads_names_the_setting(corpus, params_for, tmp_path):
    images = [p.image_file for p in synthetic_posts(2)]
    caption_only = tmp_path / "caption.h5"
    write_shard(caption_only, images, [0, 0], captions=["a dog", "a cat"])
    params = params_for({"features": [str(caption_only)]})
    _fails(train_main, ["--params", str(params)], "ablation.prefix_scales: uses 'grid', but none of the feature files")
