"""Training benchmark: sentences per second for a training epoch and for evaluation, and
the share of step time spent waiting for data.

Everything is synthetic and local: posts of Twitter length (about 16 words), feature
shards with the real grid shape (49 x 2048 by default), label words and captions, and a
randomly initialised encoder of the size asked for, saved with ``save_pretrained`` and
loaded back the way training loads one. The full MSVSE model is timed (four encoder
passes per post: sentence, labels, caption, joint input with prefixes).

    python benchmarks/train_bench.py                          # small encoder, CPU
    python benchmarks/train_bench.py --preset bert-base --posts 4000 --device cuda
        # an epoch of Twitter-2015 size (paper, Table 7: 75.81 s per epoch)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from msvse.config import from_dict  # noqa: E402
from msvse.features import FeatureStore  # noqa: E402
from msvse.train import synthetic  # noqa: E402
from msvse.train.config import TrainConfig  # noqa: E402
from msvse.train.data import Collator, build_dataset  # noqa: E402
from msvse.train.model import build_model  # noqa: E402
from msvse.train.trainer import (  # noqa: E402
    count_parameters,
    load_encoder,
    make_loader,
    make_optimizer,
    make_text_encoder,
    max_length,
    predict_dataset,
    resolve_device,
    seed_everything,
    train_epoch,
)

PRESETS = {
    "small": dict(hidden=128, layers=2, heads=4),
    "medium": dict(hidden=256, layers=4, heads=4),
    "bert-base": dict(hidden=768, layers=12, heads=12),
    "bert-large": dict(hidden=1024, layers=24, heads=16),
}


class TimedCollator:
    """A collator that adds up the time it spends building batches."""

    def __init__(self, collator: Collator):
        self.collator = collator
        self.seconds = 0.0

    def __call__(self, items):
        start = time.perf_counter()
        batch = self.collator(items)
        self.seconds += time.perf_counter() - start
        return batch


def run(args: argparse.Namespace) -> dict:
    sizes = dict(PRESETS[args.preset])
    for key in ("hidden", "layers", "heads"):
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="msvse-bench-"))
    encoder_dir = synthetic.write_encoder(root / "encoder", max_positions=512, **sizes)
    posts = synthetic.synthetic_posts(args.posts, seed=1, prefix="p", min_words=8, max_words=24)
    dev = synthetic.synthetic_posts(args.eval_posts, seed=2, prefix="d", min_words=8, max_words=24)
    grid_shape = (args.regions, args.channels)
    features = synthetic.write_features(root / "features", [p.image_file for p in posts + dev], grid_shape=grid_shape)
    paths = {name: synthetic.write_posts(root / f"{name}.txt", p) for name, p in (("train", posts), ("dev", dev))}
    cfg = from_dict(
        TrainConfig,
        {
            "data": {"train": str(paths["train"]), "valid": str(paths["dev"]), "test": str(paths["dev"]),
                     "features": [str(p) for p in features]},
            "model": {"encoder": str(encoder_dir)},
            "optim": {"epochs": 1, "batch_size": args.batch_size, "eval_batch_size": args.eval_batch_size,
                      "device": args.device, "workers": args.workers, "bf16": not args.no_bf16},
        },
    )  # fmt: skip
    device = resolve_device(cfg.optim.device)
    seed_everything(0)
    tokenizer, encoder = load_encoder(cfg.model.encoder)
    store = FeatureStore(cfg.data.features)
    text = make_text_encoder(cfg, tokenizer, max_length(cfg, tokenizer, encoder))
    train_set = build_dataset(posts, text, cfg.ablation, store, store.grid_shape)
    dev_set = build_dataset(dev, text, cfg.ablation, store, store.grid_shape)
    model = build_model(cfg, encoder, store.grid_shape).to(device)
    collator = Collator(text, cfg.ablation, store.grid_shape)
    loader = make_loader(train_set, collator, cfg.optim.batch_size, shuffle=True, seed=0, workers=cfg.optim.workers)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    # Warm-up steps (allocator, kernels) are not timed.
    warm = make_loader(train_set, collator, cfg.optim.batch_size, shuffle=True, seed=1, workers=0)
    batches = iter(warm)
    train_epoch(model, [next(batches) for _ in range(min(2, len(warm)))], optimizer, scheduler, device,
                grad_clip=1.0, bf16=cfg.optim.bf16)  # fmt: skip
    stats = train_epoch(model, loader, optimizer, scheduler, device, grad_clip=1.0, bf16=cfg.optim.bf16)
    timed = TimedCollator(collator)
    start = time.perf_counter()
    predict_dataset(model, dev_set, timed, device, batch_size=cfg.optim.eval_batch_size, bf16=cfg.optim.bf16)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    eval_seconds = time.perf_counter() - start
    words = sum(len(p.tokens) for p in posts) / len(posts)
    return {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "encoder": sizes,
        "grid": list(grid_shape),
        "parameters": count_parameters(model),
        "batch_size": cfg.optim.batch_size,
        "train_posts": stats.sentences,
        "words_per_post": round(words, 1),
        "train_seconds": round(stats.seconds, 3),
        "train_sentences_per_s": round(stats.sentences / stats.seconds, 2),
        "train_data_wait_share": round(stats.data_share, 4),
        "epoch_seconds_at_4000_posts": round(4000 * stats.seconds / stats.sentences, 1),
        "eval_posts": len(dev),
        "eval_seconds": round(eval_seconds, 3),
        "eval_sentences_per_s": round(len(dev) / eval_seconds, 2),
        "eval_data_share": round(timed.seconds / eval_seconds, 4),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small", help="encoder size (default: small)")
    parser.add_argument("--hidden", type=int, help="override the preset's hidden size")
    parser.add_argument("--layers", type=int, help="override the preset's layer count")
    parser.add_argument("--heads", type=int, help="override the preset's head count")
    parser.add_argument("--posts", type=int, default=256, help="training posts in the timed epoch")
    parser.add_argument("--eval-posts", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--regions", type=int, default=49, help="grid regions G (ResNet-152 at 224 px: 49)")
    parser.add_argument("--channels", type=int, default=2048, help="grid channels C (ResNet-152: 2048)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--no-bf16", action="store_true", help="float32 on CUDA instead of bf16 autocast")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
