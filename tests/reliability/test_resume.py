"""Resumable training: msvse-train killed with SIGKILL (mid-epoch, while writing its
state, between the two renames that replace it), then rerun with --resume, ends with
exactly the files of a run that was never interrupted. A resume state that is
incomplete, or was written by another configuration, is refused with its file or key."""

from __future__ import annotations

import csv
import json
import re
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from msvse.errors import ConfigError
from msvse.train import trainer
from msvse.train.config import load_config
from msvse.train.checkpoint import CheckpointError, read_resume_state, recover_dir
from msvse.train.cli import train_main

# msvse-train that kills itself with SIGKILL at a chosen point: the Nth optimizer step,
# the Nth write of a resume state's tensors (its weights are already in the temporary
# folder then), or just after the Nth rename that moves the old resume state aside.
KILLABLE = """
import os, pathlib, signal, sys
import torch
from msvse.train import checkpoint
from msvse.train.cli import train_main

limits = {k: int(os.environ.get(k, "0")) for k in ("KILL_AT_STEP", "KILL_AT_STATE_WRITE", "KILL_AFTER_RENAME")}
counts = dict.fromkeys(limits, 0)

def tick(key):
    counts[key] += 1
    if counts[key] == limits[key]:
        os.kill(os.getpid(), signal.SIGKILL)

step = torch.optim.AdamW.step
def counted_step(self, *args, **kwargs):
    tick("KILL_AT_STEP")
    return step(self, *args, **kwargs)
torch.optim.AdamW.step = counted_step

save_file = checkpoint.save_file
def counted_save(*args, **kwargs):
    tick("KILL_AT_STATE_WRITE")
    return save_file(*args, **kwargs)
checkpoint.save_file = counted_save

rename = pathlib.Path.rename
def counted_rename(self, target):
    out = rename(self, target)
    if pathlib.Path(target).name == ".resume.old":
        tick("KILL_AFTER_RENAME")
    return out
pathlib.Path.rename = counted_rename

train_main(sys.argv[1:])
"""

TIMING = ("train_seconds", "dev_seconds", "data_wait")


def _epochs(run: Path) -> list[dict[str, str]]:
    with open(run / "plots" / "epochs.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, corpus, bert_dir, tools) -> Path:
    """Three epochs, never interrupted, with dropout on (the encoder's and the heads'),
    so that only restored random-number generators give the same result."""
    root = tmp_path_factory.mktemp("straight")
    params = tools.write_params(root / "params.yaml", tools.train_section(corpus, bert_dir, root / "run", optim={"epochs": 3}))
    result = tools.run([str(tools.bin / "msvse-train"), "--params", str(params)])
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run"


KILLS = {
    # 4 steps per epoch (32 posts, batch 8): step 6 is the middle of epoch 2.
    "mid-epoch": ("KILL_AT_STEP", 6),
    # Epoch 2's state: its weights written to the temporary folder, its tensors not.
    "while writing the state": ("KILL_AT_STATE_WRITE", 2),
    # Epoch 2's state complete in its temporary folder, epoch 1's moved to .resume.old,
    # the new one not yet renamed into place.
    "between the renames": ("KILL_AFTER_RENAME", 1),
}


@pytest.mark.slow
@pytest.mark.parametrize("where", list(KILLS))
def test_a_killed_run_resumes_to_the_uninterrupted_result(where, tmp_path, corpus, bert_dir, straight, tools):
    run = tmp_path / "run"
    params = tools.write_params(tmp_path / "params.yaml", tools.train_section(corpus, bert_dir, run, optim={"epochs": 3}))
    killer = tools.script(tmp_path, "killable.py", KILLABLE)
    key, value = KILLS[where]
    killed = tools.run([sys.executable, str(killer), "--params", str(params)], **{key: str(value)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (run / "metrics.json").exists()
    assert len(_epochs(run)) == (1 if where == "mid-epoch" else 2)  # epochs.csv goes before the state
    leftovers = {p.name for p in run.iterdir()}
    if where == "between the renames":
        assert "resume" not in leftovers and ".resume.old" in leftovers
    else:
        assert read_resume_state(run / "resume").info["epoch"] == 1

    resumed = tools.run([str(tools.bin / "msvse-train"), "--params", str(params), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "after epoch 1 of 3" in resumed.stderr

    assert json.loads((run / "metrics.json").read_text()) == json.loads((straight / "metrics.json").read_text())
    assert _epochs(run) == _epochs(straight)
    a, b = load_file(run / "model" / "model.safetensors"), load_file(straight / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for split in ("dev", "test"):
        assert (run / "predictions" / f"{split}.txt").read_text() == (straight / "predictions" / f"{split}.txt").read_text()
    assert json.loads((run / "train_config.json").read_text())["resumed_after_epoch"] == 1
    # The run is complete: no resume state, no temporary or old folders left behind.
    assert sorted(p.name for p in run.iterdir()) == ["metrics.json", "model", "plots", "predictions", "train_config.json"]


# --------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def kept_state(tmp_path_factory, corpus, bert_dir, tools) -> tuple[Path, Path]:
    """A one-epoch run whose resume state was kept (as a kill after its last epoch
    would keep it); returns (params file, run folder)."""
    root = tmp_path_factory.mktemp("kept")
    params = tools.write_params(root / "params.yaml", tools.train_section(corpus, bert_dir, root / "run", optim={"epochs": 1}))

    class KeepEverything:
        @staticmethod
        def rmtree(*args, **kwargs):
            pass

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "shutil", KeepEverything)
        result = CliRunner().invoke(train_main, ["--params", str(params)])
    assert result.exit_code == 0, result.output
    assert (root / "run" / "resume" / "state.json").exists()
    return params, root / "run"


def _copy(kept, tmp_path) -> tuple[Path, Path]:
    """The kept run, copied, with a params file pointing at the copy."""
    params, run = kept
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    section = json.loads((copy / "train_config.json").read_text())["config"]
    section["output"] = str(copy)
    new_params = tmp_path / "params.yaml"
    new_params.write_text(json.dumps({"train": section}))  # JSON is YAML
    return new_params, copy


@pytest.mark.parametrize("name", ["state.json", "state.safetensors", "model.safetensors"])
def test_a_resume_state_missing_a_file_is_named(kept_state, tmp_path, name):
    params, run = _copy(kept_state, tmp_path)
    (run / "resume" / name).unlink()
    result = CliRunner().invoke(train_main, ["--params", str(params), "--resume"])
    assert result.exit_code == 2, result.output
    assert f"resume: resume file '{name}' is missing" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda run: (run / "resume" / "state.json").write_text('{"epoch": 1,\n  oops'), r"state.json:2: not valid JSON"),
        (lambda run: (run / "resume" / "state.safetensors").write_bytes(b"\x00" * 5), r"state.safetensors: not a readable safetensors file"),
        (lambda run: (run / "resume" / "model.safetensors").write_bytes(b"{}"), r"model.safetensors: not a readable safetensors file"),
    ],
    ids=["json", "tensors", "weights"],
)
def test_a_damaged_resume_state_is_named(kept_state, tmp_path, damage, message):
    params, run = _copy(kept_state, tmp_path)
    damage(run)
    result = CliRunner().invoke(train_main, ["--params", str(params), "--resume"])
    assert result.exit_code == 2, result.output
    assert re.search(message, result.output) and "Traceback" not in result.output


@pytest.mark.parametrize(
    "override, key",
    [("optim.lr_encoder=0.002", "train.optim.lr_encoder"), ("ablation.similarity=false", "train.ablation.similarity")],
)
def test_resuming_with_other_settings_is_refused_with_the_key(kept_state, tmp_path, override, key):
    params, run = _copy(kept_state, tmp_path)
    result = CliRunner().invoke(train_main, ["--params", str(params), "--resume", "--set", override])
    assert result.exit_code == 2, result.output
    assert f"was written with {key} = " in result.output and "without --resume to start over" in result.output


def test_settings_of_where_it_runs_may_change(kept_state, tmp_path):
    params, run = _copy(kept_state, tmp_path)
    info = read_resume_state(run / "resume").info
    moved = load_config(params, {"optim.threads": 2, "optim.workers": 1, "output": str(tmp_path / "elsewhere")})
    trainer.check_resumable(info, moved, 1, run / "resume")
    with pytest.raises(ConfigError, match=r"written by a run of 1 processes, this run has 4"):
        trainer.check_resumable(info, moved, 4, run / "resume")


def test_a_replacement_cut_between_its_renames_is_undone(kept_state, tmp_path):
    _, run = _copy(kept_state, tmp_path)
    (run / "model").rename(run / ".model.old")  # the state a kill between the renames leaves
    recover_dir(run / "model")
    assert (run / "model" / "model.safetensors").exists() and not (run / ".model.old").exists()
    with pytest.raises(CheckpointError, match="resume file 'state.json' is missing"):
        read_resume_state(tmp_path / "nothing")


def test_without_resume_an_old_state_is_discarded(kept_state, tmp_path, caplog):
    params, run = _copy(kept_state, tmp_path)
    with caplog.at_level("INFO", logger="msvse.train"):
        result = CliRunner().invoke(train_main, ["--params", str(params)])
    assert result.exit_code == 0, result.output
    assert "holds an earlier run's state; starting over" in caplog.text
    assert not (run / "resume").exists()
