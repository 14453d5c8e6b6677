"""Stage 1 throughput: the whole pipeline against the models alone, on the same images.

    python benchmarks/extract_bench.py                      # 200 synthetic photos, params.yaml's models
    python benchmarks/extract_bench.py --images DIR --params my.yaml --device cuda --batch-size 32

End to end is ``extract()`` as the CLI runs it (DataLoader workers decoding and
resizing, the models, batched HDF5 writes), timed from the first batch to the finished
file, model loading excluded. Forward only is the same models on the same batches,
decoded and preprocessed beforehand and held in memory. Their ratio is the pipeline's
overhead ratio (1.0: decoding and writing are entirely hidden behind the models).
Peak memory is this process's peak resident set, the peak of it plus its workers'
unique memory (sampled; needs psutil), and the CUDA allocator's peak on a GPU. Prints a table and one JSON line. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from msvse.config import from_dict, load_section
from msvse.extract.config import ExtractConfig
from msvse.extract.models import resolve_device
from msvse.extract.run import ImageRows, Models, collate, extract, parse_kinds, select_ids


def synthetic_photos(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> None:
    """Smooth random pictures saved as JPEG, like photos in size and decode cost."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)
        noise = rng.normal(0, 8, (size[1], size[0], 3))
        img = Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8))
        img.save(folder / f"{100000 + i}.jpg", quality=88)


def peak_rss_mib() -> float:
    """Peak resident memory of this process, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class TreeMemory:
    """Samples this process's RSS plus its workers' unique memory (USS: pages a forked
    worker shares with its parent are not counted twice) and keeps the peak, MiB.
    Needs psutil; without it the peak is None."""

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.peak: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            import psutil
        except ImportError:
            return
        me = psutil.Process()
        self.peak = 0.0
        while not self._stop.is_set():
            total = me.memory_info().rss
            for child in me.children(recursive=True):
                try:
                    total += child.memory_full_info().uss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            self.peak = max(self.peak, total / 2**20)
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_only(models: Models, images: list[Path], config: ExtractConfig) -> float:
    """Images/s of the models alone on preprocessed batches already in memory."""
    dataset = ImageRows(images, models.preprocess, max_pixels=config.max_pixels)
    b = config.batch_size
    batches = [collate([dataset[i] for i in range(s, min(s + b, len(images)))]) for s in range(0, len(images), b)]
    models.run(batches[0])  # warm-up (kernel selection, lazy allocations)
    sync(models.device)
    start = time.perf_counter()
    for batch in batches:
        models.run(batch)
    sync(models.device)
    return len(images) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, help="folder of images (default: synthetic photos)")
    parser.add_argument("--n", type=int, default=200, help="synthetic photos to make")
    parser.add_argument("--size", default="640x480", help="synthetic photo size WxH")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file ('none': real models)")
    parser.add_argument("--kinds", default="grid,objects,caption")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--num-workers", type=int)
    parser.add_argument("--device")
    args = parser.parse_args(argv)

    overrides = {k: v for k, v in (("batch_size", args.batch_size), ("num_workers", args.num_workers),
                                   ("device", args.device)) if v is not None}
    if str(args.params) == "none":
        config = from_dict(ExtractConfig, overrides, source="command line")
    else:
        config = load_section(args.params, "extract", ExtractConfig, overrides=overrides)
    kinds = parse_kinds(args.kinds)

    with tempfile.TemporaryDirectory(prefix="extract-bench-") as tmp:
        tmp = Path(tmp)
        if args.images is None:
            folder = tmp / "images"
            folder.mkdir()
            width, height = (int(v) for v in args.size.lower().split("x"))
            synthetic_photos(folder, args.n, (width, height))
        else:
            folder = args.images
        images = [folder / name for name in select_ids(folder)]

        with TreeMemory() as tree:
            summary = extract(folder, tmp / "bench.h5", config, kinds, progress=False)
        e2e = summary["written"] / (summary["seconds"] - summary["load_seconds"])
        rss_e2e = peak_rss_mib()
        models = Models(config, kinds, resolve_device(config.device))
        fwd = forward_only(models, images, config)
        gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if models.device.type == "cuda" else None
        file_mib = (tmp / "bench.h5").stat().st_size / 2**20

    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "device": str(models.device),
            "gpu": torch.cuda.get_device_name(models.device) if models.device.type == "cuda" else None,
        },
        "images": len(images),
        "kinds": list(kinds),
        "batch_size": config.batch_size,
        "num_workers": config.num_workers,
        "models": {"grid": config.grid.arch, "objects": config.objects.arch if config.objects.backend == "torchvision"
                   else config.objects.detectron2_config, "caption": config.caption.model},
        "end_to_end_images_per_s": round(e2e, 2),
        "forward_only_images_per_s": round(fwd, 2),
        "overhead_ratio": round(e2e / fwd, 3),
        "peak_rss_mib": round(rss_e2e, 1),
        "peak_with_workers_mib": None if tree.peak is None else round(tree.peak, 1),
        "peak_gpu_mib": None if gpu_peak is None else round(gpu_peak, 1),
        "shard_mib": round(file_mib, 2),
    }
    rows = [
        ("machine", f"{result['machine']['platform']}, {result['machine']['cpus']} CPUs, {result['machine']['device']}"
         + (f" ({result['machine']['gpu']})" if result["machine"]["gpu"] else "")),
        ("images, batch, workers", f"{len(images)}, {config.batch_size}, {config.num_workers}"),
        ("end to end", f"{e2e:.2f} images/s"),
        ("forward only", f"{fwd:.2f} images/s"),
        ("overhead ratio", f"{e2e / fwd:.3f}"),
        ("peak RSS", f"{rss_e2e:.0f} MiB"),
        ("peak with workers (USS)", "n/a (no psutil)" if tree.peak is None else f"{tree.peak:.0f} MiB"),
    ]
    if gpu_peak is not None:
        rows.append(("peak GPU memory", f"{gpu_peak:.0f} MiB"))
    for name, value in rows:
        print(f"{name:26s} {value}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
