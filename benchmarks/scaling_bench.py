"""Scaling: peak memory and throughput of extraction and training as the number of
images and posts grows (by default 100, 1,000 and 10,000 synthetic items, tiny models).

    python benchmarks/scaling_bench.py                       # all of it: about 15 min on 2 CPU cores
    python benchmarks/scaling_bench.py --only train --sizes 1000 10000 100000   # 24 GB of shards at 100,000
    python benchmarks/scaling_bench.py --json scaling.json --keep /tmp/scaling

Every measurement runs in a fresh child process, so its peak resident memory
(``ru_maxrss``) is its own and nothing is cached from an earlier size:

- ``extract``: :func:`msvse.extract.run.extract` on N synthetic 320 x 240 JPEGs with the
  demo's kind of tiny models (built here: ResNet-18 at 224 px, a ResNet-18 Mask R-CNN at
  224 px, a small random BLIP), batch 16, one DataLoader worker. All three kinds up to
  ``--all-kinds-max`` images (the detector makes larger runs slow on a CPU), the grid
  alone at every size.
- ``train``: :func:`msvse.train.trainer.train` for one epoch of the full model (small
  encoder: hidden 128, 2 layers; 1 torch thread) on N synthetic posts whose images have
  ResNet-152-shaped grids (49 x 2048 float16), dev and test N/10 posts each; first with
  an empty token cache (cold), then again with the cache the first run filled (warm; up
  to ``--warm-max`` posts). Epoch and dev seconds come from the run's epochs.csv; data
  set-up is ``build_datasets`` (reading the posts, tokenizing or mapping the cache,
  indexing the shards); start-up is everything before the first epoch (encoder, shards,
  data sets, model), after a first load of the encoder has imported transformers' model
  code (timed apart: the same for every run); set-up and final is the wall time outside
  the epoch and dev.
- ``store``: opening the N-image grid shard with ``FeatureStore``, eager and lazy.

Prints a Markdown table and, with ``--json``, writes every figure. Not a test.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

GRID_SHAPE = (49, 2048)  # ResNet-152 at 224 px: what real shards hold
ENCODER = dict(hidden=128, layers=2, heads=4)  # train_bench.py's "small" preset


def peak_rss_mib(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


def rss_mib() -> float:
    """Resident memory now (Linux), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --------------------------------------------------------------------------- assets


def make_photos(folder: Path, n: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from extract_bench import synthetic_photos

    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.jpg"))) < n:
        synthetic_photos(folder, n, (320, 240))


def make_tiny_models(folder: Path, corpus: Path) -> Path:
    """The demo's tiny models (random weights; the captioner is not fitted)."""
    from msvse.pipeline.tiny import TinyBlip, TinyConfig, build_tiny_models

    if not (folder / "manifest.json").exists():
        build_tiny_models(TinyConfig(out_dir=str(folder), data_dir=str(folder), blip=TinyBlip(fit_steps=0)), [corpus])
    return folder


def make_training_set(folder: Path, n: int, seed: int = 0) -> dict[str, object]:
    """N train posts, N/10 dev and test posts, and their shards, grids in blocks so
    that memory stays flat while writing."""
    import numpy as np

    from msvse.features import STATUS_OK, ShardWriter, write_shard
    from msvse.train import synthetic

    folder.mkdir(parents=True, exist_ok=True)
    small = max(10, n // 10)
    splits = {"train": n, "valid": small, "test": small}
    paths = {}
    images: list[str] = []
    for i, (split, count) in enumerate(splits.items()):
        posts = synthetic.synthetic_posts(count, seed=seed + i, prefix=f"{split[:2]}")
        paths[split] = str(synthetic.write_posts(folder / f"{split}.txt", posts))
        images += [p.image_file for p in posts]
    grid_path = folder / "grid.h5"
    if not grid_path.exists():
        # One random block, shifted per block of rows: what the values are does not
        # matter here, and drawing 12 G normals for 100,000 posts would take minutes.
        rng = np.random.default_rng(seed)
        base = rng.standard_normal((500, *GRID_SHAPE), dtype=np.float32)
        writer = ShardWriter.create(grid_path, images, kinds=["grid"], config={"synthetic": True}, grid_shape=GRID_SHAPE)
        for k, start in enumerate(range(0, len(images), 500)):
            rows = min(500, len(images) - start)
            writer.write_rows(start, [STATUS_OK] * rows, grid=(base[:rows] + 0.01 * k).astype(np.float16))
        writer.finish()
        rng = np.random.default_rng(seed + 1)
        labels = [list(rng.choice(synthetic.LABEL_WORDS, size=int(rng.integers(1, 5)))) for _ in images]
        captions = [" ".join(rng.choice(synthetic.CAPTION_WORDS, size=int(rng.integers(4, 10)))) for _ in images]
        write_shard(folder / "objects.h5", images, [STATUS_OK] * len(images), labels=labels, config={"synthetic": True})
        write_shard(folder / "caption.h5", images, [STATUS_OK] * len(images), captions=captions, config={"synthetic": True})
    paths["features"] = [str(folder / name) for name in ("grid.h5", "objects.h5", "caption.h5")]
    return paths


# --------------------------------------------------------------------------- children


def child_extract(args: argparse.Namespace) -> dict:
    from msvse.config import from_dict
    from msvse.extract.config import ExtractConfig
    from msvse.extract.run import extract

    models = Path(args.models)
    config = from_dict(
        ExtractConfig,
        {
            "grid": {"arch": "resnet18", "weights": str(models / "resnet18.pth"), "image_size": 224},
            "objects": {"arch": "maskrcnn_resnet18_fpn_tiny", "weights": str(models / "maskrcnn_tiny.pth"),
                        "min_size": 224, "max_size": 224, "score_threshold": 0.02, "max_objects": 10},
            "caption": {"model": str(models / "blip"), "num_beams": 1, "max_new_tokens": 20},
            "batch_size": 16, "num_workers": 1, "device": "cpu",
        },
    )  # fmt: skip
    out = Path(args.out)
    summary = extract(args.images, out, config, args.kinds, ids_from=[args.ids], progress=False)
    busy = summary["seconds"] - summary["load_seconds"]
    size = out.stat().st_size
    return {
        "n": summary["rows"],
        "kinds": args.kinds,
        "seconds": round(busy, 2),
        "load_seconds": summary["load_seconds"],
        "per_second": round(summary["rows"] / busy, 2),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "worker_peak_rss_mib": round(peak_rss_mib(resource.RUSAGE_CHILDREN), 1),
        "shard_bytes": size,
        "bytes_per_image": round(size / summary["rows"]),
    }


def child_train(args: argparse.Namespace) -> dict:
    from msvse.config import from_dict
    from msvse.train import trainer
    from msvse.train.config import TrainConfig

    paths = json.loads(args.paths)
    run = Path(args.out)
    data_seconds = []
    build = getattr(trainer, "build_datasets", None)

    def timed_build(*a, **k):  # the data sets' set-up: reading, tokenizing, indexing
        start = time.perf_counter()
        out = build(*a, **k)
        data_seconds.append(time.perf_counter() - start)
        return out

    # --compare-with runs this child under another msvse, which may predate the token
    # cache and build_datasets: then the data set-up is not timed apart.
    new = build is not None
    if new:
        trainer.build_datasets = timed_build
    first_epoch = []
    epoch = trainer.train_epoch

    def timed_epoch(*a, **k):  # start-up: everything before the first epoch begins
        first_epoch.append(time.perf_counter())
        return epoch(*a, **k)

    trainer.train_epoch = timed_epoch
    cfg = from_dict(
        TrainConfig,
        {
            "data": {**paths, "token_cache": args.cache} if new else paths,
            "model": {"encoder": args.encoder, "label_tokens": 16, "caption_tokens": 32, "max_length": 128},
            "optim": {"epochs": 1, "batch_size": 32, "eval_batch_size": 64, "device": "cpu", "threads": 1, "workers": 0},
            "output": str(run),
        },
    )
    # transformers imports its model code on the first load (about 2 s here, whatever
    # the data): done once before the clock starts, so start-up is this run's own work.
    t0 = time.perf_counter()
    from transformers import AutoModel

    AutoModel.from_pretrained(args.encoder)
    import_seconds = time.perf_counter() - t0
    start = time.perf_counter()
    trainer.train(cfg)
    wall = time.perf_counter() - start
    with open(run / "plots" / "epochs.csv", newline="") as f:
        epoch = next(csv.DictReader(f))
    n = int(args.n)
    train_s, dev_s = float(epoch["train_seconds"]), float(epoch["dev_seconds"])
    dev_posts = max(10, n // 10)
    return {
        "n": n,
        "wall_seconds": round(wall, 1),
        "train_seconds": train_s,
        "train_per_second": round(n / train_s, 1),
        "dev_per_second": round(dev_posts / dev_s, 1),
        "setup_and_final_seconds": round(wall - train_s - dev_s, 1),
        "data_seconds": round(data_seconds[0], 1) if data_seconds else None,
        "startup_seconds": round(first_epoch[0] - start, 1),
        "import_seconds": round(import_seconds, 1),
        "token_cache": args.warm if new else "no",
        "code": args.code,
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }


def child_store(args: argparse.Namespace) -> dict:
    from msvse.features import FeatureStore

    base = rss_mib()
    start = time.perf_counter()
    store = FeatureStore([args.grid], lazy=args.lazy)
    opened = time.perf_counter() - start
    held = rss_mib() - base
    start = time.perf_counter()
    for image in store.ids:
        store.get(image)
    read_all = time.perf_counter() - start
    return {
        "n": len(store),
        "lazy": args.lazy,
        "open_seconds": round(opened, 2),
        "get_all_seconds": round(read_all, 2),
        "rss_growth_mib": round(held, 1),  # what the open store holds
    }


def run_child(kind: str, *extra: str, python: str = sys.executable) -> dict:
    cmd = [python, __file__, "--child", kind, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--only", choices=["extract", "train", "store"], action="append")
    parser.add_argument("--all-kinds-max", type=int, default=1000, help="largest size extracted with all three kinds")
    parser.add_argument("--keep", type=Path, help="work folder to keep (default: a temporary one, removed)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--warm-max", type=int, default=10000, help="largest size also trained with a warm token cache")
    parser.add_argument("--compare-with", help="a Python with another msvse installed: its training runs beside this one's")
    parser.add_argument("--compare-max", type=int, default=10000, help="largest size trained with --compare-with")
    parser.add_argument("--repeat", type=int, default=1, help="training runs of each size this many times, alternating the runs (means at the end)")
    for name in ("models", "images", "ids", "out", "paths", "encoder", "n", "grid", "kinds", "cache", "warm", "code"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    parser.add_argument("--lazy", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        result = {"extract": child_extract, "train": child_train, "store": child_store}[args.child](args)
        print(json.dumps(result))
        return result

    parts = args.only or ["extract", "train", "store"]
    work = args.keep or Path(tempfile.mkdtemp(prefix="msvse-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    import torch

    from msvse.train import synthetic

    results: dict[str, object] = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "extract": [],
        "train": [],
        "store": [],
    }
    biggest = max(args.sizes)
    if "extract" in parts:
        photos = work / "photos"
        make_photos(photos, biggest)
        names = sorted(p.name for p in photos.glob("*.jpg"))
        corpus = work / "corpus.txt"
        synthetic.write_posts(corpus, synthetic.synthetic_posts(200, seed=3))
        models = make_tiny_models(work / "models", corpus)
        for n in args.sizes:
            ids = work / f"ids_{n}.txt"
            ids.write_text("".join(f"IMGID:{name}\nx\tO\n\n" for name in names[:n]))
            for kinds in ("grid,objects,caption", "grid"):
                if kinds != "grid" and n > args.all_kinds_max:
                    continue
                out = work / f"extract_{n}_{kinds.replace(',', '_')}.h5"
                out.unlink(missing_ok=True)
                row = run_child("extract", "--models", str(models), "--images", str(photos), "--ids", str(ids),
                                "--out", str(out), "--kinds", kinds)  # fmt: skip
                out.unlink()
                results["extract"].append(row)
                print(f"extract {kinds:22s} {n:>6}: {row['per_second']:8.2f} images/s, peak RSS {row['peak_rss_mib']:.0f} MiB",
                      flush=True)  # fmt: skip
    if "train" in parts or "store" in parts:
        encoder = work / "encoder"
        if not (encoder / "config.json").exists():
            synthetic.write_encoder(encoder, max_positions=128, **ENCODER)
        for n in args.sizes:
            paths = make_training_set(work / f"train_{n}", n)
            if "store" in parts:
                for lazy in (False, True):
                    row = run_child("store", "--grid", paths["features"][0], *(["--lazy"] if lazy else []))
                    results["store"].append(row)
                    print(f"store {'lazy' if lazy else 'eager':5s} {n:>6}: +{row['rss_growth_mib']:.0f} MiB", flush=True)
            if "train" in parts:
                cache = work / f"tokens_{n}"
                runs = [("this", sys.executable, warm) for warm in ("cold", "warm")[: 1 if n > args.warm_max else 2]]
                if args.compare_with and n <= args.compare_max:
                    runs.insert(0, ("other", args.compare_with, "cold"))
                for _round, (code, python, warm) in ((r, run) for r in range(args.repeat) for run in runs):
                    if code == "this" and warm == "cold":
                        shutil.rmtree(cache, ignore_errors=True)
                    row = run_child("train", "--paths", json.dumps(paths), "--encoder", str(encoder), "--n", str(n),
                                    "--out", str(work / f"run_{n}_{code}_{warm}"), "--cache", str(cache), "--warm", warm,
                                    "--code", code, python=python)  # fmt: skip
                    results["train"].append(row)
                    data = "" if row["data_seconds"] is None else f"data set-up {row['data_seconds']:.1f} s, "
                    print(f"train {n:>6} ({code} code, {row['token_cache']} token cache): {row['train_per_second']:.1f} "
                          f"posts/s, start-up {row['startup_seconds']:.1f} s (after {row['import_seconds']:.1f} s "
                          f"importing transformers' model code), {data}set-up and final "
                          f"{row['setup_and_final_seconds']:.1f} s, "
                          f"peak RSS {row['peak_rss_mib']:.0f} MiB", flush=True)  # fmt: skip
    print()
    print(table(results))
    if args.repeat > 1:
        print()
        print(means(results["train"]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return results


def means(rows: list[dict]) -> str:
    """Mean and range of the repeated training runs, per size, code and cache."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["n"], row["code"], row["token_cache"]), []).append(row)
    lines = []
    for (n, code, warm), runs in groups.items():
        parts = []
        for key, what in (("train_per_second", "posts/s"), ("dev_per_second", "dev posts/s"), ("startup_seconds", "s start-up")):
            values = [r[key] for r in runs]
            parts.append(f"{sum(values) / len(values):.1f} {what} ({min(values):.1f}-{max(values):.1f})")
        lines.append(f"train {n:,} ({code} code, {warm} token cache), {len(runs)} runs: " + ", ".join(parts))
    return "\n".join(lines)


def table(results: dict) -> str:
    lines = ["| work | items | throughput | seconds | peak RSS | on disk |", "|---|---|---|---|---|---|"]
    for row in results["extract"]:
        kinds = "extract " + row["kinds"].replace(",", " + ")
        lines.append(
            f"| {kinds} | {row['n']:,} | {row['per_second']:.1f} images/s | {row['seconds']:.0f} | "
            f"{row['peak_rss_mib']:.0f} MiB (+ worker {row['worker_peak_rss_mib']:.0f}) | "
            f"{row['bytes_per_image']:,} B/image |"
        )
    for row in results["train"]:
        lines.append(
            f"| train 1 epoch + dev ({row['code']} code, {row['token_cache']} token cache) | {row['n']:,} posts | "
            f"{row['train_per_second']:.0f} posts/s (dev {row['dev_per_second']:.0f}) | {row['wall_seconds']:.0f} ("
            f"start-up {row['startup_seconds']:.1f}; "
            + ("" if row["data_seconds"] is None else f"data set-up {row['data_seconds']:.1f}; ")
            + f"set-up and final {row['setup_and_final_seconds']:.0f}) | {row['peak_rss_mib']:.0f} MiB | |"
        )
    for row in results["store"]:
        lines.append(
            f"| FeatureStore {'lazy' if row['lazy'] else 'eager'} open | {row['n']:,} grids | get all in "
            f"{row['get_all_seconds']:.1f} s | open {row['open_seconds']:.1f} | +{row['rss_growth_mib']:.0f} MiB | |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
