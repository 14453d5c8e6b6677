"""Training: ``train(cfg) -> metrics``, the library function behind ``msvse-train``.

AdamW with linear warm-up and decay; the encoder, the new modules and the CRF each have
their own learning rate; gradient clipping; bf16 autocast on CUDA only; one seed for
everything. After each epoch the dev set is scored and the best epoch (dev F1) is saved
as the checkpoint. The test set is scored once, at the end, with that checkpoint
reloaded from disk. A loss that turns NaN or infinite stops the run.

Outputs under ``cfg.output``::

    model/                 best checkpoint (see msvse.train.checkpoint)
    metrics.json           final dev and test scores, per type and micro, with counts
    plots/epochs.csv       per-epoch train loss, dev P/R/F1, seconds (for dvc plots)
    predictions/dev.txt    Twitter format, predicted tags
    predictions/test.txt
    train_config.json      resolved config, inputs report, peak memory, provenance
    resume/                while the run lasts: the state after the last complete epoch

**Resuming.** After every epoch the weights, the optimizer, the scheduler, every rank's
random-number generators, the epoch, the best score and the history are written to
``resume/`` (whole or not at all). ``train(cfg, resume=True)`` continues from there: the
batch order of an epoch depends only on the seed and the epoch number, so on a CPU the
resumed run ends with exactly the scores an uninterrupted one does. ``resume/`` is
removed once metrics.json is written.

**Distributed.** Under ``torchrun`` (``WORLD_SIZE`` > 1), or inside a process group the
caller has set up, each process trains a ``DistributedDataParallel`` replica on its
share of every batch (NCCL on CUDA, one GPU per process; gloo on CPU). The batch order is
one permutation per epoch, shared by all ranks, and rank r takes every W-th post of it:
W processes with ``batch_size`` B see exactly the batches one process with W*B sees
(when W divides the number of training windows; otherwise DistributedSampler repeats a
few windows to even the shares). Dev and test are predicted once over the whole sets,
each rank taking a share of the windows, gathered by index. Rank 0 alone writes files;
the other ranks wait at a barrier.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from transformers import get_linear_schedule_with_warmup

from msvse.config import to_dict
from msvse.errors import ConfigError, MsvseError
from msvse.features import PAPER_GRID_SHAPE, FeatureStore
from msvse.io import peak_memory, write_json_atomic, write_resolved_config, write_text_atomic
from msvse.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_resume_state,
    recover_dir,
    rng_state,
    save_checkpoint,
    save_resume_state,
    shard_records,
)
from msvse.train.config import TrainConfig
from msvse.train.data import TAG_INDEX, TAG_LABELS, Collator, PostDataset, TextEncoder, build_dataset, check_kinds, reassemble
from msvse.train.tokens import TokenCache
from msvse.train.metrics import format_scores, score
from msvse.train.model import MsvseModel, build_model, check_prefix, encoder_limit
from msvse.twitter import format_posts

log = logging.getLogger("msvse.train")

EPOCH_COLUMNS = ("epoch", "train_loss", "dev_precision", "dev_recall", "dev_f1", "train_seconds", "dev_seconds", "data_wait")


#: Settings a run may be resumed with other values of: where it runs, not what it computes.
RESUME_RUNTIME_KEYS = ("output", "optim.device", "optim.workers", "optim.threads")


class TrainingDiverged(MsvseError, RuntimeError):
    """The loss became NaN or infinite."""


# --------------------------------------------------------------------------- processes


@dataclass
class Distributed:
    """This process's place in the job: rank, world size, and the device collectives
    use (CUDA for NCCL, CPU for gloo). A single process is rank 0 of 1."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owned: bool = False  # this process created the process group and must destroy it

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over ranks (float64); a single process returns ``values``."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """``tensor`` (same shape and dtype on every rank) from every rank, on the CPU."""
        if self.world == 1:
            return [tensor]
        local = tensor.to(self.device)
        out = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(out, local)
        return [t.cpu() for t in out]

    def close(self) -> None:
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()


def setup_distributed(device_name: str) -> tuple[Distributed, torch.device]:
    """Join the process group ``torchrun`` describes (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), or the one the caller has already
    initialised; return it with this process's training device (``cuda:LOCAL_RANK``
    on GPUs). Without either, a single process on :func:`resolve_device`'s device."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        owned = False
        backend = dist.get_backend()
    elif os.environ.get("WORLD_SIZE", "1").strip() not in ("", "1"):
        hint = "start distributed runs with torchrun, which sets them"
        if not dist.is_available():
            raise ConfigError("WORLD_SIZE is set but this PyTorch build has no torch.distributed")
        try:
            rank, world, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        except (KeyError, ValueError):
            raise ConfigError(f"WORLD_SIZE > 1 needs RANK, WORLD_SIZE and LOCAL_RANK as integers: {hint}") from None
        backend = "nccl" if resolve_device(device_name).type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend)
        except ValueError as exc:  # env:// rendezvous without MASTER_ADDR / MASTER_PORT
            raise ConfigError(f"cannot join the process group ({exc}); {hint}") from None
        owned = True
    else:
        return Distributed(), resolve_device(device_name)
    device = resolve_device(device_name)
    if device.type == "cuda":
        if torch.cuda.device_count() <= local_rank:
            raise ConfigError(
                f"optim.device: local rank {local_rank} has no GPU of its own ({torch.cuda.device_count()} visible); "
                "start at most one process per GPU"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("optim.device: the process group uses NCCL, which needs CUDA; set optim.device to auto or cuda")
    collective = device if backend == "nccl" else torch.device("cpu")
    return Distributed(rank, world, local_rank, collective, owned), device


# --------------------------------------------------------------------------- building blocks


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("optim.device: 'cuda' requested but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_encoder(name: str, key: str = "model.encoder", *, prefix: bool = True) -> tuple[Any, torch.nn.Module]:
    """Tokenizer and ``AutoModel`` encoder from a Hugging Face name or a local
    ``save_pretrained`` directory. A load that cannot reach the weights is a
    :class:`ConfigError` naming the model and how to point at a local copy. With
    ``prefix`` (a model with a visual prefix), the encoder must be seen to attend to
    one (:func:`~msvse.train.model.check_prefix`), else a ConfigError says why."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        if getattr(tokenizer, "add_prefix_space", None) is False:
            # Byte-level BPE (RoBERTa) must see words as mid-sentence words when the
            # sentence arrives already split.
            tokenizer = AutoTokenizer.from_pretrained(name, add_prefix_space=True)
        encoder = AutoModel.from_pretrained(name)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"{key}: cannot load the encoder {name!r} ({reason}). It must be a Hugging Face model name "
            f"reachable from here or a local directory written by save_pretrained: point {key} at a local "
            "copy (e.g. models/tiny/bert for the demo)"
        ) from None
    if getattr(encoder.config, "is_decoder", False):
        raise ConfigError(f"{key}: {name!r} is configured as a decoder; MSVSE needs a bidirectional encoder")
    if prefix:
        try:
            check_prefix(encoder)
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}") from None
    return tokenizer, encoder


def max_length(cfg: TrainConfig, tokenizer: Any, encoder: torch.nn.Module) -> int:
    """The longest input: the encoder's limit, the tokenizer's, and model.max_length."""
    limits = [encoder_limit(encoder)]
    if getattr(tokenizer, "model_max_length", None) and tokenizer.model_max_length < 1_000_000:
        limits.append(int(tokenizer.model_max_length))
    if cfg.model.max_length is not None:
        limits.append(cfg.model.max_length)
    return min(limits)


def make_text_encoder(cfg: TrainConfig, tokenizer: Any, length: int) -> TextEncoder:
    return TextEncoder(
        tokenizer,
        max_length=length,
        label_tokens=cfg.model.label_tokens,
        caption_tokens=cfg.model.caption_tokens,
        joint_input=cfg.ablation.joint_input,
        distinct_labels=cfg.model.distinct_labels,
    )


def open_features(cfg: TrainConfig) -> FeatureStore | None:
    """The shards the settings need (None for a text-only model), checked for the kinds.
    Lazy: the data sets read their grids per batch, so the store holds none of them
    (memory flat in the data, and fast to open)."""
    if cfg.ablation.text_only:
        return None
    if not cfg.data.features:
        check_kinds(cfg.ablation, (), ())
    store = FeatureStore(cfg.data.features, lazy=True)
    check_kinds(cfg.ablation, store.kinds, store.paths)
    return store


def make_optimizer(model: MsvseModel, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the encoder, the new modules and the CRF, each at its own rate; no
    weight decay on biases, norms or the CRF's transition scores."""
    o = cfg.optim
    rates = {"encoder": o.lr_encoder, "heads": o.lr_heads, "crf": o.lr_crf}
    groups = []
    for name, params in model.parameter_groups().items():
        decay = [p for p in params if p.ndim >= 2 and name != "crf"]
        plain = [p for p in params if not (p.ndim >= 2 and name != "crf")]
        for subset, wd in ((decay, o.weight_decay), (plain, 0.0)):
            if subset:
                groups.append({"params": subset, "lr": rates[name], "weight_decay": wd, "name": name})
    return torch.optim.AdamW(groups)


def make_loader(
    dataset: PostDataset,
    collator: Collator,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    workers: int,
    rank: int = 0,
    world: int = 1,
) -> DataLoader:
    """Batches of ``dataset`` for rank ``rank`` of ``world``. The order comes from a
    ``DistributedSampler`` even in a single process: it is a function of the seed and
    the epoch alone (call ``loader.sampler.set_epoch(epoch)``), so a resumed run and a
    run spread over W processes see the batches an uninterrupted single process sees."""
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collator,
        num_workers=workers,
        persistent_workers=workers > 0,
    )


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    if device.type == "cuda" and bf16:
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- epochs


@dataclass
class EpochStats:
    loss: float
    sentences: int
    seconds: float
    data_seconds: float  # time spent waiting for the next batch

    @property
    def data_share(self) -> float:
        return self.data_seconds / self.seconds if self.seconds else 0.0


_END = object()


def batches_ahead(loader: Any) -> Iterator[Any]:
    """``loader``'s batches, each built while the caller works on the one before. A
    loader with workers already builds ahead in them; an in-process one (``workers:
    0``) gets one helper thread, which reads and collates the next batch while the model
    runs this one (the model's kernels release the GIL). The batches and their order are
    the loader's own: its iterator, and the seed it draws, are made here, the helper
    only calls ``next``, and a batch's error is raised here."""
    if getattr(loader, "num_workers", 0) > 0:
        yield from loader
        return
    it = iter(loader)
    with ThreadPoolExecutor(1, thread_name_prefix="msvse-batches") as helper:
        pending = helper.submit(next, it, _END)
        while (batch := pending.result()) is not _END:
            pending = helper.submit(next, it, _END)
            yield batch


def _timed(loader: Any) -> Iterator[tuple[Any, float]]:
    it = batches_ahead(loader)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        yield batch, time.perf_counter() - t0


def train_epoch(
    model: MsvseModel,
    loader: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    device: torch.device,
    *,
    grad_clip: float | None,
    bf16: bool,
    epoch: int = 1,
    processes: Distributed | None = None,
) -> EpochStats:
    """One pass over ``loader``; stops with :class:`TrainingDiverged` on a NaN/inf loss.
    Under DDP the loss is summed over ranks before the check, so every rank stops at
    the same step, and the epoch's loss and sentence count are those of all ranks."""
    processes = processes or Distributed()
    model.train()
    total, sentences, waited = 0.0, 0, 0.0
    start = time.perf_counter()
    for step, (batch, wait) in enumerate(_timed(loader), 1):
        waited += wait
        batch = batch.to(device)
        with autocast(device, bf16):
            out = model(batch)
        loss = out.loss
        summed, count = processes.all_sum([loss.item() * len(batch), len(batch)])
        value = summed / max(count, 1)
        if not math.isfinite(value):
            terms = ", ".join(f"{k}={v.item():.4g}" for k, v in out.losses.items())
            raise TrainingDiverged(
                f"loss became {value} at epoch {epoch}, step {step} ({terms}); "
                "lower optim.lr_encoder / optim.lr_heads / optim.lr_crf, or check the features for inf/NaN values"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        total += summed
        sentences += int(count)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return EpochStats(total / max(sentences, 1), sentences, time.perf_counter() - start, waited)


def predict_dataset(
    model: MsvseModel,
    dataset: PostDataset,
    collator: Collator,
    device: torch.device,
    *,
    batch_size: int,
    bf16: bool = True,
    processes: Distributed | None = None,
    workers: int = 0,
) -> list[list[str]]:
    """Predicted tags for every word of every post (windows reassembled). Windows go in
    batches of alike length, built in ``workers`` DataLoader processes (0: in this one).
    Under DDP each rank predicts every W-th window (by length, so shares cost alike) and
    the tags are gathered by window index: every window once, no padding duplicates."""
    processes = processes or Distributed()
    model.eval()
    order = sorted(range(len(dataset)), key=dataset.window_cost)
    shares = [order[r :: processes.world] for r in range(processes.world)]
    mine = shares[processes.rank]
    chunks = [mine[start : start + batch_size] for start in range(0, len(mine), batch_size)]
    # A generator of its own: a DataLoader draws its workers' base seed from the one it
    # is given, and the global one feeds dropout, so evaluating must not advance it.
    loader = DataLoader(
        dataset, batch_sampler=chunks, collate_fn=collator, num_workers=workers, generator=torch.Generator().manual_seed(0)
    )
    window_tags: list[list[str]] = [[] for _ in range(len(dataset))]
    for batch, chunk in zip(batches_ahead(loader), chunks):  # the batches first: the helper ends with them
        with autocast(device, bf16):
            rows = model.predict(batch.to(device))
        for i, row in zip(chunk, rows):
            window_tags[i] = row
    if processes.world > 1:
        window_tags = _gather_tags(dataset, window_tags, shares, processes)
    return reassemble(dataset, window_tags)


def _gather_tags(
    dataset: PostDataset, window_tags: list[list[str]], shares: list[list[int]], processes: Distributed
) -> list[list[str]]:
    """Every rank's predicted windows, by index. Each rank's share and the length of
    each window are known to all, so one tensor of tag ids per rank carries them."""
    lengths = (dataset.windows[:, 2] - dataset.windows[:, 1]).tolist()
    width = max(1, max(sum(lengths[i] for i in share) for share in shares))
    flat = [TAG_INDEX[t] for i in shares[processes.rank] for t in window_tags[i]]
    local = torch.full((width,), -1, dtype=torch.int64)
    local[: len(flat)] = torch.tensor(flat, dtype=torch.int64)
    out: list[list[str]] = [[] for _ in range(len(dataset))]
    for share, ids in zip(shares, processes.all_gather(local)):
        k = 0
        for i in share:
            out[i] = [TAG_LABELS[t] for t in ids[k : k + lengths[i]].tolist()]
            k += lengths[i]
    return out


def evaluate(
    model: MsvseModel,
    dataset: PostDataset,
    collator: Collator,
    device: torch.device,
    *,
    batch_size: int,
    bf16: bool,
    processes: Distributed | None = None,
    workers: int = 0,
) -> tuple[dict, list[list[str]]]:
    rows = predict_dataset(
        model, dataset, collator, device, batch_size=batch_size, bf16=bf16, processes=processes, workers=workers
    )
    return score([p.tags for p in dataset.posts], rows), rows


def write_epochs(path: Path, history: Sequence[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=EPOCH_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    write_text_atomic(path, buf.getvalue())


# --------------------------------------------------------------------------- train


def train(cfg: TrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Train MSVSE as ``cfg`` says; return the final metrics (also in metrics.json).
    ``resume``: continue from ``OUTPUT/resume`` if a killed run left one there (else
    start from scratch). Runs distributed under ``torchrun`` (see the module docstring)."""
    processes, device = setup_distributed(cfg.optim.device)
    level = log.level
    if not processes.main:
        log.setLevel(logging.ERROR)  # one copy of the progress lines and warnings: rank 0 sees the same data
    try:
        return _train(cfg, processes, device, resume)
    finally:
        log.setLevel(level)
        processes.close()


def _train(cfg: TrainConfig, processes: Distributed, device: torch.device, resume: bool) -> dict[str, Any]:
    out = cfg.out
    main = processes.main
    if cfg.optim.threads is not None:
        torch.set_num_threads(cfg.optim.threads)
    seed_everything(cfg.optim.seed)
    tokenizer, encoder = load_encoder(cfg.model.encoder, prefix=cfg.ablation.uses_prefix)
    store = open_features(cfg)
    grid_shape = store.grid_shape if store is not None and "grid" in cfg.ablation.routes.filtered else None
    length = max_length(cfg, tokenizer, encoder)
    text = make_text_encoder(cfg, tokenizer, length)

    data, inputs = build_datasets(cfg, text, store, grid_shape, processes)

    model = build_model(cfg, encoder, grid_shape).to(device)
    n_params = count_parameters(model)
    log.info(
        "model: %s parameters, device %s, sentence budget %d sub-words%s", f"{n_params:,}", device, text.budget,
        f", {processes.world} processes (batch {cfg.optim.batch_size} each)" if processes.world > 1 else "",
    )  # fmt: skip
    collator = Collator(text, cfg.ablation, grid_shape)
    o = cfg.optim
    loader = make_loader(
        data["train"], collator, o.batch_size, shuffle=True, seed=o.seed, workers=o.workers,
        rank=processes.rank, world=processes.world,
    )  # fmt: skip
    optimizer = make_optimizer(model, cfg)
    total_steps = o.epochs * len(loader)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(o.warmup_ratio * total_steps), total_steps)
    features = [] if cfg.ablation.text_only else shard_records(list(cfg.data.features))
    # Every rank built the same weights from the seed; from here each draws its own
    # dropout masks.
    torch.manual_seed(o.seed + processes.rank)

    history: list[dict[str, Any]] = []
    best_f1, best_epoch, start_epoch = -1.0, 0, 1
    resume_dir = out / "resume"
    if main:
        for folder in (resume_dir, out / "model"):
            recover_dir(folder)  # a kill between the two renames of a replacement
    processes.barrier()
    if resume and resume_dir.exists():
        state = read_resume_state(resume_dir)
        check_resumable(state.info, cfg, processes.world, resume_dir)
        state.restore(model, optimizer, scheduler, rank=processes.rank, device=device)
        history = list(state.info["history"])
        best_f1, best_epoch = float(state.info["best_f1"]), int(state.info["best_epoch"])
        start_epoch = int(state.info["epoch"]) + 1
        log.info("resuming %s after epoch %d of %d (best dev F1 %.2f at epoch %d)",
                 resume_dir, start_epoch - 1, o.epochs, 100 * best_f1, best_epoch)  # fmt: skip
    elif resume_dir.exists():
        log.info("%s holds an earlier run's state; starting over (msvse-train --resume continues it)", resume_dir)
        processes.barrier()  # every rank has looked before rank 0 removes it
        if main:
            shutil.rmtree(resume_dir)
    elif resume:
        log.info("nothing to resume in %s; starting from scratch", resume_dir)
    net = model
    if processes.world > 1:
        # Some parameters get no gradient (the encoder's pooler: no loss reads its
        # output); DDP must be told to expect them.
        net = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )

    for epoch in range(start_epoch, o.epochs + 1):
        loader.sampler.set_epoch(epoch)
        stats = train_epoch(net, loader, optimizer, scheduler, device, grad_clip=o.grad_clip, bf16=o.bf16, epoch=epoch,
                            processes=processes)  # fmt: skip
        t0 = time.perf_counter()
        dev, _ = evaluate(model, data["valid"], collator, device, batch_size=o.eval_batch_size, bf16=o.bf16,
                          processes=processes, workers=o.workers)  # fmt: skip
        dev_seconds = time.perf_counter() - t0
        history.append(
            {
                "epoch": epoch,
                "train_loss": round(stats.loss, 6),
                "dev_precision": round(dev["precision"], 6),
                "dev_recall": round(dev["recall"], 6),
                "dev_f1": round(dev["f1"], 6),
                "train_seconds": round(stats.seconds, 3),
                "dev_seconds": round(dev_seconds, 3),
                "data_wait": round(stats.data_share, 4),
            }
        )
        improved = dev["f1"] > best_f1
        if improved:
            best_f1, best_epoch = dev["f1"], epoch
        rng = _all_rng_states(processes, device)
        if main:
            with _writing():
                write_epochs(out / "plots" / "epochs.csv", history)
            if improved:
                save_checkpoint(out / "model", model, tokenizer, cfg, max_length=length, features=features)
            progress = {"epoch": epoch, "best_f1": best_f1, "best_epoch": best_epoch, "history": history}
            save_resume_state(resume_dir, model, optimizer, scheduler, config=cfg, progress=progress, rng=rng)
        processes.barrier()
        log.info(
            "epoch %d/%d: loss %.4f, dev P/R/F1 %.2f/%.2f/%.2f%s (train %.1fs, %.0f sent/s, data wait %.1f%%; dev %.1fs)",
            epoch, o.epochs, stats.loss, 100 * dev["precision"], 100 * dev["recall"], 100 * dev["f1"],
            " *best*" if improved else "", stats.seconds, stats.sentences / max(stats.seconds, 1e-9),
            100 * stats.data_share, dev_seconds,
        )  # fmt: skip

    if best_epoch == 0 or not (out / "model").is_dir():
        raise CheckpointError(f"{out / 'model'}: the best checkpoint is missing; start the run over without --resume")
    best = load_checkpoint(out / "model", device=str(device)).model
    dev, dev_rows = evaluate(best, data["valid"], collator, device, batch_size=o.eval_batch_size, bf16=o.bf16,
                             processes=processes, workers=o.workers)  # fmt: skip
    test, test_rows = evaluate(best, data["test"], collator, device, batch_size=o.eval_batch_size, bf16=o.bf16,
                               processes=processes, workers=o.workers)  # fmt: skip
    metrics = {
        "best_epoch": best_epoch,
        "epochs": o.epochs,
        "parameters": n_params,
        "dev": dev,
        "test": test,
        "inputs": inputs,
    }
    if main:
        with _writing():
            write_text_atomic(out / "predictions" / "dev.txt", format_posts(data["valid"].posts, dev_rows))
            write_text_atomic(out / "predictions" / "test.txt", format_posts(data["test"].posts, test_rows))
            write_json_atomic(out / "metrics.json", metrics)
            write_resolved_config(
                out / "train_config.json", "train", to_dict(cfg), inputs=inputs, device=str(device),
                processes=processes.world, resumed_after_epoch=start_epoch - 1 if start_epoch > 1 else None,
                peak_memory=peak_memory(device),
            )  # fmt: skip
        shutil.rmtree(resume_dir, ignore_errors=True)  # the run is complete: metrics.json says so
    processes.barrier()
    log.info("%s", format_scores(dev, f"dev (best epoch {best_epoch})"))
    log.info("%s", format_scores(test, "test (scored once, best checkpoint)"))
    return metrics


@contextlib.contextmanager
def _writing() -> Iterator[None]:
    """A file that cannot be written (a full disk, no permission) is named; the atomic
    writers have left the previous version, if any, in place."""
    try:
        yield
    except OSError as exc:
        where = exc.filename or "the run folder"
        raise MsvseError(
            f"{where}: cannot write ({exc.strerror or exc}); make room, then rerun with --resume "
            "to continue after the last complete epoch"
        ) from None


def build_datasets(
    cfg: TrainConfig, text: TextEncoder, store: FeatureStore | None, grid_shape: tuple[int, int] | None, processes: Distributed
) -> tuple[dict[str, PostDataset], dict[str, dict[str, int]]]:
    """The train, dev and test windows, their tokens from the token cache
    (``data.token_cache``). Under torchrun rank 0 fills the cache first and the other
    ranks then find it filled. Also each split's inputs report (no-image counts, empty
    posts)."""
    cache = TokenCache(cfg.data.token_cache)
    data: dict[str, PostDataset] = {}
    inputs: dict[str, dict[str, int]] = {}
    if not processes.main:
        processes.barrier()
    started = time.perf_counter()
    for split, path in (("train", cfg.data.train), ("valid", cfg.data.valid), ("test", cfg.data.test)):
        data[split] = build_dataset(path, text, cfg.ablation, store, grid_shape, cache=cache)
        inputs[split] = {**data[split].report.as_dict(), "empty_posts": _empty_posts(data[split], split)}
        log.info(data[split].report.line(split))
    if processes.main:
        processes.barrier()
    log.info("data: %.1f s to read and tokenize (token cache: %s)", time.perf_counter() - started, cfg.data.token_cache or "off")
    return data, inputs


def _empty_posts(dataset: PostDataset, split: str) -> int:
    """Posts with no tokens: kept (their prediction is empty), counted and reported."""
    empty = np.flatnonzero(dataset.post_lengths() == 0)
    if len(empty):
        first = dataset.posts[int(empty[0])]
        log.warning("%s: %d posts have no tokens (first: %s:%d, IMGID:%s); they are kept and count in no score",
                    split, len(empty), first.source, first.line, first.image_id)  # fmt: skip
    return len(empty)


def _all_rng_states(processes: Distributed, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Every rank's RNG states, in rank order (rank 0 writes them all)."""
    mine = rng_state(device)
    if processes.world == 1:
        return [mine]
    gathered = {name: processes.all_gather(tensor) for name, tensor in mine.items()}
    return [{name: gathered[name][rank] for name in mine} for rank in range(processes.world)]


def check_resumable(info: dict[str, Any], cfg: TrainConfig, world: int, folder: Path) -> None:
    """A run is continued only by one that would have computed the same thing: the same
    settings (bar where it runs: :data:`RESUME_RUNTIME_KEYS`) and the same number of
    processes (the batches and the schedule depend on it)."""
    hint = "resume with the same settings, or run without --resume to start over"
    saved = info.get("world_size")
    if saved != world:
        raise ConfigError(f"{folder}: was written by a run of {saved} processes, this run has {world}; {hint}")
    for key, old, new in _differences(info.get("config", {}), to_dict(cfg)):
        if key not in RESUME_RUNTIME_KEYS:
            raise ConfigError(f"{folder}: was written with train.{key} = {old!r}, this run has {new!r}; {hint}")


def _differences(old: Any, new: Any, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            yield from _differences(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else key)
    elif old != new:
        yield prefix, old, new


# --------------------------------------------------------------------------- parameter count


def paper_size_model(cfg: TrainConfig | None = None) -> MsvseModel:
    """The full model at bert-base-uncased size (``BertConfig()`` defaults, randomly
    initialised, nothing downloaded) with the grid of stage 1's default ResNet (ResNet-152
    at 224 px: 7 x 7 regions), so no shard is needed to count."""
    from transformers import BertConfig, BertModel

    cfg = cfg or TrainConfig()
    return build_model(cfg, BertModel(BertConfig()), PAPER_GRID_SHAPE)


def parameter_report(model: MsvseModel) -> dict[str, int]:
    """Parameters per block of the network."""
    blocks = {
        "encoder": model.encoder,
        "representation (W_g, eq 5)": getattr(model, "grid_proj", None),
        "filtering (eqs 8-10)": getattr(model, "filter", None),
        "dynamic mapping (eqs 11-14)": getattr(model, "mapping", None),
        "visual entity classifier (eqs 17-18)": getattr(model, "classifier", None),
        "label decoder + CRF (eqs 19-23)": model.decoder,
    }
    report = {name: count_parameters(m) for name, m in blocks.items() if m is not None}
    report["total"] = count_parameters(model)
    assert report["total"] == sum(v for k, v in report.items() if k != "total")
    return report

