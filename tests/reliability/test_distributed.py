"""Distributed training: W processes with batch B train what one process with batch W*B
trains, stay in sync, score once over the whole dev and test sets, and write once."""

from __future__ import annotations

import csv
import json
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from msvse.train.cli import train_main
from msvse.train.trainer import make_loader

# msvse-train with a snapshot of every rank's parameters after each epoch.
SNAPSHOTS = """
import os, sys
from safetensors.torch import save_file
from msvse.train import trainer
from msvse.train.cli import train_main

original = trainer.train_epoch

def train_epoch(model, *args, epoch=1, **kwargs):
    stats = original(model, *args, epoch=epoch, **kwargs)
    module = getattr(model, "module", model)  # DDP wraps the model
    rank = os.environ.get("RANK", "0")
    tensors = {name: p.detach().clone() for name, p in module.named_parameters()}
    save_file(tensors, os.path.join(os.environ["SNAPSHOTS"], f"rank{rank}-epoch{epoch}.safetensors"))
    return stats

trainer.train_epoch = train_epoch
train_main(sys.argv[1:])
"""


class Windows(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def batches(world: int, rank: int, batch: int, n: int, epoch: int) -> list[list[int]]:
    loader = make_loader(Windows(n), lambda items: list(items), batch, shuffle=True, seed=5, workers=0, rank=rank, world=world)
    loader.sampler.set_epoch(epoch)
    return list(loader)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_w_ranks_of_batch_b_see_the_batches_of_one_process_of_batch_wb(world):
    n, b = 24 * world, 3
    for epoch in (1, 2):
        single = batches(1, 0, world * b, n, epoch)
        ranks = [batches(world, r, b, n, epoch) for r in range(world)]
        assert all(len(r) == len(single) for r in ranks)
        for step, whole in enumerate(single):
            assert sorted(sum((r[step] for r in ranks), [])) == sorted(whole)
    assert batches(1, 0, b, n, 1) != batches(1, 0, b, n, 2), "the order is reseeded each epoch"
    assert batches(1, 0, b, n, 1) == batches(1, 0, b, n, 1), "and depends on the seed and the epoch alone"


def test_an_uneven_split_still_covers_every_window():
    # 25 windows over 2 ranks: DistributedSampler repeats one so the shares are even.
    seen = [i for r in range(2) for batch in batches(2, r, 4, 25, 1) for i in batch]
    assert len(seen) == 26 and set(seen) == set(range(25))


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process_with_the_double_batch(tmp_path, corpus, bert_no_dropout, tools):
    """torchrun, 2 CPU processes (gloo), batch 4 each, against one process with batch 8.

    The gradients are the same sums in another order: DDP averages the two ranks' mean
    losses over 4 posts where one process takes the mean over 8, and a batch is padded to
    its own longest post. That is exact in real numbers, so the two runs agree to float32
    rounding (about 1e-7 per step), far below what a wrong batch or a missing average
    would change (1e-3 and more at these learning rates). For this to hold, the losses must
    be means over posts: the KL term (eq 24) is a mean over each batch's tokens, so it is
    off here; the default classifier loss (eq 18) is a mean over each batch's posts that
    have an entity, so the per-type BCE, a mean over all posts, stands in for it; and
    dropout is off (each rank draws its own masks; the encoder's own dropout is off in
    ``bert_no_dropout``)."""
    settings = dict(model={"dropout": 0.0, "classifier_loss": "bce"}, ablation={"consistency": False}, optim={"epochs": 3})
    dist_run, single_run = tmp_path / "ddp", tmp_path / "single"
    wrapper = tools.script(tmp_path, "train_with_snapshots.py", SNAPSHOTS)
    for name in ("ddp_snapshots", "single_snapshots"):
        (tmp_path / name).mkdir()

    params = tools.write_params(tmp_path / "ddp.yaml", tools.train_section(corpus, bert_no_dropout, dist_run, **settings))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    ddp = tools.run([*torchrun, str(wrapper), "--params", str(params), "--set", "optim.batch_size=4"],
              SNAPSHOTS=str(tmp_path / "ddp_snapshots"))  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    params = tools.write_params(tmp_path / "single.yaml", tools.train_section(corpus, bert_no_dropout, single_run, **settings))
    single = tools.run([sys.executable, str(wrapper), "--params", str(params), "--set", "optim.batch_size=8"],
                 SNAPSHOTS=str(tmp_path / "single_snapshots"))  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]

    for epoch in (1, 2, 3):
        rank0, rank1 = (load_file(tmp_path / "ddp_snapshots" / f"rank{r}-epoch{epoch}.safetensors") for r in (0, 1))
        alone = load_file(tmp_path / "single_snapshots" / f"rank0-epoch{epoch}.safetensors")
        assert rank0.keys() == rank1.keys() == alone.keys()
        for name in rank0:
            assert torch.equal(rank0[name], rank1[name]), f"ranks out of sync at epoch {epoch}: {name}"
            torch.testing.assert_close(rank0[name], alone[name], rtol=0, atol=1e-5, msg=f"epoch {epoch}: {name}")

    ddp_metrics = json.loads((dist_run / "metrics.json").read_text())
    single_metrics = json.loads((single_run / "metrics.json").read_text())
    assert ddp_metrics == single_metrics  # dev and test scored once over the whole sets
    assert ddp_metrics["dev"]["gold"] == sum(ddp_metrics["dev"]["per_type"][t]["gold"] for t in ("PER", "LOC", "ORG", "MISC"))
    ddp_epochs, single_epochs = _rows(dist_run / "plots" / "epochs.csv"), _rows(single_run / "plots" / "epochs.csv")
    for a, b in zip(ddp_epochs, single_epochs, strict=True):
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=1e-5)  # the loss of all ranks
        assert [a[k] for k in ("epoch", "dev_precision", "dev_recall", "dev_f1")] == [
            b[k] for k in ("epoch", "dev_precision", "dev_recall", "dev_f1")
        ]
    assert (dist_run / "predictions" / "test.txt").read_text() == (single_run / "predictions" / "test.txt").read_text()

    # Rank 0 alone wrote the run folder, and the job prints one summary line.
    assert sorted(p.name for p in dist_run.iterdir()) == ["metrics.json", "model", "plots", "predictions", "train_config.json"]
    assert json.loads((dist_run / "train_config.json").read_text())["processes"] == 2
    assert ddp.stdout.count("best epoch") == 1, ddp.stdout


@pytest.mark.parametrize(
    "env, message",
    [
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE > 1 needs RANK, WORLD_SIZE and LOCAL_RANK as integers"),
        ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, "cannot join the process group"),
    ],
    ids=["no rank", "no master address"],
)
def test_a_half_set_torchrun_environment_is_a_clear_error(env, message, tmp_path, corpus, bert_dir, tools, monkeypatch):
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    params = tools.write_params(tmp_path / "p.yaml", tools.train_section(corpus, bert_dir, tmp_path / "run"))
    result = CliRunner().invoke(train_main, ["--params", str(params)])
    assert result.exit_code == 2, result.output
    assert message in result.output and "torchrun" in result.output and "Traceback" not in result.output


# One rank of a torchrun job dies with SIGKILL at its Nth optimizer step; torchrun then
# stops the other one, as it does when a machine or a process is lost.
KILL_ONE_RANK = """
import os, signal, sys
import torch
from msvse.train.cli import train_main

limit = int(os.environ["KILL_AT_STEP"]) if os.environ.get("RANK") == os.environ["KILL_RANK"] else 0
steps = 0
step = torch.optim.AdamW.step

def counted(self, *args, **kwargs):
    global steps
    steps += 1
    if steps == limit:
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, *args, **kwargs)

torch.optim.AdamW.step = counted
train_main(sys.argv[1:])
"""


@pytest.mark.slow
def test_a_distributed_run_resumes_to_the_uninterrupted_result(tmp_path, corpus, bert_dir, tools):
    """Dropout on (the encoder's and the heads'): each rank's own RNG states must come
    back for the resumed job to end exactly where the uninterrupted one does."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    settings = dict(optim={"epochs": 3, "batch_size": 4})
    straight, run = tmp_path / "straight", tmp_path / "run"
    params = tools.write_params(tmp_path / "straight.yaml", tools.train_section(corpus, bert_dir, straight, **settings))
    result = tools.run([*torchrun, str(tools.bin / "msvse-train"), "--params", str(params)])
    assert result.returncode == 0, result.stderr[-3000:]

    params = tools.write_params(tmp_path / "params.yaml", tools.train_section(corpus, bert_dir, run, **settings))
    killer = tools.script(tmp_path, "kill_one_rank.py", KILL_ONE_RANK)
    # 32 posts, 2 ranks of batch 4: 4 steps per epoch; step 6 is the middle of epoch 2.
    killed = tools.run([*torchrun, str(killer), "--params", str(params)], KILL_RANK="1", KILL_AT_STEP="6")
    assert killed.returncode != 0
    assert not (run / "metrics.json").exists() and (run / "resume" / "state.json").exists()
    state = json.loads((run / "resume" / "state.json").read_text())
    assert state["epoch"] == 1 and state["world_size"] == 2
    # A single process may not continue it: the batches and the schedule depend on W.
    alone = tools.run([str(tools.bin / "msvse-train"), "--params", str(params), "--resume"])
    assert alone.returncode == 2 and "was written by a run of 2 processes, this run has 1" in alone.stderr

    resumed = tools.run([*torchrun, str(tools.bin / "msvse-train"), "--params", str(params), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "after epoch 1 of 3" in resumed.stderr
    assert json.loads((run / "metrics.json").read_text()) == json.loads((straight / "metrics.json").read_text())
    a, b = load_file(run / "model" / "model.safetensors"), load_file(straight / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
