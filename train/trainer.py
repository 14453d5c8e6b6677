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
    train_config.json      resolved config, inputs report, provenance
"""

from __future__ import annotations

import contextlib
import csv
import inspect
import io
import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import get_linear_schedule_with_warmup

from msvse.config import to_dict
from msvse.errors import ConfigError, MsvseError
from msvse.extract.features import FeatureStore
from msvse.io import write_json_atomic, write_resolved_config, write_text_atomic
from msvse.train.config import TrainConfig
from msvse.train.data import Collator, PostDataset, TextEncoder, build_dataset, check_kinds, reassemble
from msvse.train.metrics import format_scores, score
from msvse.train.checkpoint import load_checkpoint, save_checkpoint, shard_records
from msvse.train.model import MsvseModel, build_model, encoder_limit
from msvse.twitter import format_posts, read_posts

log = logging.getLogger("msvse.train")

EPOCH_COLUMNS = ("epoch", "train_loss", "dev_precision", "dev_recall", "dev_f1", "train_seconds", "dev_seconds", "data_wait")


class TrainingDiverged(MsvseError, RuntimeError):
    """The loss became NaN or infinite."""


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


def load_encoder(name: str, key: str = "model.encoder") -> tuple[Any, torch.nn.Module]:
    """Tokenizer and ``AutoModel`` encoder from a Hugging Face name or a local
    ``save_pretrained`` directory. A load that cannot reach the weights is a
    :class:`ConfigError` naming the model and how to point at a local copy."""
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
    if "past_key_values" not in inspect.signature(encoder.forward).parameters:
        raise ConfigError(f"{key}: {type(encoder).__name__} takes no past_key_values, which the visual prefix needs")
    if getattr(encoder.config, "is_decoder", False):
        raise ConfigError(f"{key}: {name!r} is configured as a decoder; MSVSE needs a bidirectional encoder")
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
    )


def open_features(cfg: TrainConfig) -> FeatureStore | None:
    """The shards the settings need (None for a text-only model), checked for the kinds."""
    if cfg.ablation.text_only:
        return None
    if not cfg.data.features:
        check_kinds(cfg.ablation, (), ())
    store = FeatureStore(cfg.data.features)
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


def make_loader(dataset: PostDataset, collator: Collator, batch_size: int, *, shuffle: bool, seed: int, workers: int) -> DataLoader:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=collator,
        num_workers=workers,
        generator=generator,
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


def _timed(loader: Any) -> Iterator[tuple[Any, float]]:
    it = iter(loader)
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
) -> EpochStats:
    """One pass over ``loader``; stops with :class:`TrainingDiverged` on a NaN/inf loss."""
    model.train()
    total, sentences, waited = 0.0, 0, 0.0
    start = time.perf_counter()
    for step, (batch, wait) in enumerate(_timed(loader), 1):
        waited += wait
        batch = batch.to(device)
        with autocast(device, bf16):
            out = model(batch)
        loss = out.loss
        value = loss.item()
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
        total += value * len(batch)
        sentences += len(batch)
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
) -> list[list[str]]:
    """Predicted tags for every word of every post (windows reassembled)."""
    model.eval()
    order = sorted(range(len(dataset.items)), key=lambda i: sum(len(p) for p in dataset.items[i].pieces))
    window_tags: list[list[str]] = [[] for _ in dataset.items]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = collator([dataset.items[i] for i in chunk]).to(device)
        with autocast(device, bf16):
            rows = model.predict(batch)
        for i, row in zip(chunk, rows):
            window_tags[i] = row
    return reassemble(dataset, window_tags)


def evaluate(
    model: MsvseModel, dataset: PostDataset, collator: Collator, device: torch.device, *, batch_size: int, bf16: bool
) -> tuple[dict, list[list[str]]]:
    rows = predict_dataset(model, dataset, collator, device, batch_size=batch_size, bf16=bf16)
    return score([p.tags for p in dataset.posts], rows), rows


def write_epochs(path: Path, history: Sequence[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=EPOCH_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    write_text_atomic(path, buf.getvalue())


# --------------------------------------------------------------------------- train


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train MSVSE as ``cfg`` says; return the final metrics (also in metrics.json)."""
    out = cfg.out
    device = resolve_device(cfg.optim.device)
    if cfg.optim.threads is not None:
        torch.set_num_threads(cfg.optim.threads)
    seed_everything(cfg.optim.seed)
    tokenizer, encoder = load_encoder(cfg.model.encoder)
    store = open_features(cfg)
    grid_shape = store.grid_shape if store is not None and "grid" in cfg.ablation.scales else None
    length = max_length(cfg, tokenizer, encoder)
    text = make_text_encoder(cfg, tokenizer, length)

    data: dict[str, PostDataset] = {}
    for split, path in (("train", cfg.data.train), ("valid", cfg.data.valid), ("test", cfg.data.test)):
        data[split] = build_dataset(read_posts(path), text, cfg.ablation, store, grid_shape)
        log.info(data[split].report.line(split))
    inputs = {split: ds.report.as_dict() for split, ds in data.items()}

    model = build_model(cfg, encoder, grid_shape).to(device)
    n_params = count_parameters(model)
    log.info("model: %s parameters, device %s, sentence budget %d sub-words", f"{n_params:,}", device, text.budget)
    collator = Collator(text, cfg.ablation, grid_shape)
    o = cfg.optim
    loader = make_loader(data["train"], collator, o.batch_size, shuffle=True, seed=o.seed, workers=o.workers)
    optimizer = make_optimizer(model, cfg)
    total_steps = o.epochs * len(loader)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(o.warmup_ratio * total_steps), total_steps)
    features = [] if cfg.ablation.text_only else shard_records(list(cfg.data.features))

    history: list[dict[str, Any]] = []
    best_f1, best_epoch = -1.0, 0
    for epoch in range(1, o.epochs + 1):
        stats = train_epoch(model, loader, optimizer, scheduler, device, grad_clip=o.grad_clip, bf16=o.bf16, epoch=epoch)
        t0 = time.perf_counter()
        dev, _ = evaluate(model, data["valid"], collator, device, batch_size=o.eval_batch_size, bf16=o.bf16)
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
        write_epochs(out / "plots" / "epochs.csv", history)
        improved = dev["f1"] > best_f1
        if improved:
            best_f1, best_epoch = dev["f1"], epoch
            save_checkpoint(out / "model", model, tokenizer, cfg, max_length=length, features=features)
        log.info(
            "epoch %d/%d: loss %.4f, dev P/R/F1 %.2f/%.2f/%.2f%s (train %.1fs, %.0f sent/s, data wait %.1f%%; dev %.1fs)",
            epoch, o.epochs, stats.loss, 100 * dev["precision"], 100 * dev["recall"], 100 * dev["f1"],
            " *best*" if improved else "", stats.seconds, stats.sentences / max(stats.seconds, 1e-9),
            100 * stats.data_share, dev_seconds,
        )  # fmt: skip

    best = load_checkpoint(out / "model", device=str(device)).model
    dev, dev_rows = evaluate(best, data["valid"], collator, device, batch_size=o.eval_batch_size, bf16=o.bf16)
    test, test_rows = evaluate(best, data["test"], collator, device, batch_size=o.eval_batch_size, bf16=o.bf16)
    write_text_atomic(out / "predictions" / "dev.txt", format_posts(data["valid"].posts, dev_rows))
    write_text_atomic(out / "predictions" / "test.txt", format_posts(data["test"].posts, test_rows))
    metrics = {
        "best_epoch": best_epoch,
        "epochs": o.epochs,
        "parameters": n_params,
        "dev": dev,
        "test": test,
        "inputs": inputs,
    }
    write_json_atomic(out / "metrics.json", metrics)
    write_resolved_config(out / "train_config.json", "train", to_dict(cfg), inputs=inputs, device=str(device))
    log.info("%s", format_scores(dev, f"dev (best epoch {best_epoch})"))
    log.info("%s", format_scores(test, "test (scored once, best checkpoint)"))
    return metrics


# --------------------------------------------------------------------------- parameter count


def paper_size_model(cfg: TrainConfig | None = None) -> MsvseModel:
    """The full model at bert-base-uncased size (``BertConfig()`` defaults, randomly
    initialised, nothing downloaded) with the grid of stage 1's default ResNet (ResNet-152
    at 224 px: 7 x 7 regions), so no shard is needed to count."""
    from transformers import BertConfig, BertModel

    from msvse.extract.archs import resnet_grid_shape
    from msvse.extract.config import GridConfig

    cfg = cfg or TrainConfig()
    grid = resnet_grid_shape(GridConfig.arch, GridConfig.image_size)
    return build_model(cfg, BertModel(BertConfig()), grid)


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

