"""``msvse-pipeline dry-run PIPELINE_DIR``: a paper pipeline at its real sizes, before the
first GPU hour.

Tests and the demo run tiny models; a paper pipeline meets its real shapes, memory and
file sizes only on a GPU, after the weights are downloaded. A dry run brings that
meeting forward to any machine, CPU included, and to a few minutes:

1. **Models at their real size, random weights, nothing downloaded.** The torchvision
   ResNet of ``extract.grid.arch``; the Mask R-CNN of ``extract.objects`` (torchvision's
   ``arch``, or the detectron2 model built from ``detectron2_config``); BLIP base from a
   ``BlipConfig`` with the base sizes; BERT from a ``BertConfig`` with bert-base-uncased's
   sizes. Both text models share a WordPiece vocabulary trained here on the synthetic
   posts (:func:`~msvse.pipeline.tiny.train_tokenizer`), filled with ``[unusedN]``
   entries to bert-base-uncased's 30,522 (BLIP adds ``[DEC]`` and ``[ENC]``, as its real
   tokenizer does), so the embedding matrices have their real rows. The batch norms of
   the random CNNs get the statistics of what reaches them on the synthetic images
   (:func:`calibrate_norms`), as trained ones have, so activations keep a trained
   network's scale instead of growing through 152 layers past float16. Each model is
   saved in the format its real checkpoint comes in and loads through the loader the
   real one takes.
2. **Synthetic data in the Twitter format.** The demo's generator writes the posts
   (``train.optim.batch_size`` training posts by default, one full batch; an eighth of
   that, at least 2, for dev and test) with one photo-sized JPEG each, in the sizes
   photos come in (portrait, landscape, up to 2048 px), and one image missing, as in the
   real sets.
3. **The pipeline's own stages.** The scratch folder is laid out like the repository
   (``pipelines/NAME/`` with its ``dvc.yaml``; the stages' code beside it), and DVC runs
   each stage of that ``dvc.yaml`` in turn (``dvc repro --single-item``), so the
   commands, dependencies and outputs are the ones a real run uses. ``params.yaml`` is
   the pipeline's, changed only where a dry run must (:func:`dry_params`): the data and
   model paths, one epoch, and ``extract.objects.score_threshold: 0`` (a random
   detector's class scores sit near 1/81, so 0.5 would keep no label; at 0 every image
   gets ``max_objects`` labels, the most that the shards and the trainer must hold).
4. **A report per stage**: wall time, peak memory (:class:`StageMemory`: the processes
   DVC starts for the stage, its DataLoader workers included, each shared page counted
   once), on CUDA the GPU memory the stage recorded, each shard's bytes per image and
   row layout, the checkpoint's size and the model's parameter count beside the
   paper's 119.27 M. It is printed as a table and written to ``dry_run.json`` in the
   scratch folder.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

from msvse.config import from_dict, read_yaml
from msvse.errors import ConfigError, MsvseError
from msvse.extract.archs import build_maskrcnn, build_resnet, num_parameters
from msvse.extract.config import ExtractConfig
from msvse.extract.models import IMAGENET_MEAN, IMAGENET_STD
from msvse.io import write_json_atomic
from msvse.pipeline.check import DataConfig
from msvse.pipeline.demo import DemoConfig, generate_demo
from msvse.pipeline.report import ReportConfig
from msvse.pipeline.tiny import (
    TinyBert,
    TinyBlip,
    build_bert,
    build_blip,
    corpus_lines,
    save_pretrained,
    save_state_dict,
    train_tokenizer,
)
from msvse.train.config import TrainConfig

PAPER_PARAMETERS = 119.27e6  # Table 7 ("MB"; millions of parameters)

#: Encoders a dry run can build (``train.model.encoder``): sizes, vocabulary size and
#: longest token of the published checkpoint. The longest token joins the trained
#: vocabulary, so a captioner on it gets the published caption field width
#: (:func:`~msvse.extract.models.caption_bound`: 31 x 19 = 589 bytes for BLIP base).
ENCODERS: dict[str, tuple[TinyBert, int, str]] = {
    "bert-base-uncased": (
        TinyBert(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 max_position_embeddings=512),
        30522,
        "telecommunications",  # 18 bytes; the longest of bert-base-uncased's vocab.txt (no ##, no [unusedN] longer)
    ),
}
#: Captioners a dry run can build (``extract.caption.model``), likewise.
CAPTIONERS: dict[str, TinyBlip] = {
    "Salesforce/blip-image-captioning-base": TinyBlip(
        image_size=384, patch_size=16,
        vision_hidden_size=768, vision_layers=12, vision_heads=12, vision_intermediate_size=3072,
        text_hidden_size=768, text_layers=12, text_heads=12, text_intermediate_size=3072,
        max_position_embeddings=512, fit_steps=0,
    ),
}  # fmt: skip
BLIP_TOKENS = ("[ENC]",)  # BLIP's tokenizer: bert-base-uncased + [DEC] (build_blip) + [ENC]

#: Photo sizes (width, height) the synthetic images cycle through.
PHOTO_SIZES = ((1024, 768), (640, 480), (480, 640), (2048, 1365), (600, 338), (1200, 1200), (320, 240), (1366, 2048))
CODE_DIRS = ("msvse", "msvse.extract", "msvse.pipeline", "msvse.train")  # dvc.yaml's deps: ../../msvse/..., ../../extract/... etc.
OUTPUT_KEYS = ("data.features", "train.output", "report.run", "report.out_dir")


class DryRunError(MsvseError):
    """A dry run that cannot start, or a stage of it that failed."""


# --------------------------------------------------------------------------- params


def read_pipeline(pipeline_dir: Path, sets: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The pipeline's params (with ``sets`` applied, each key one the file has, as for
    ``dvc exp run -S``) and its ``dvc.yaml``; every section checked like its stage would."""
    params_path = pipeline_dir / "params.yaml"
    dvc_path = pipeline_dir / "dvc.yaml"
    if not dvc_path.is_file():
        raise DryRunError(f"{dvc_path}: not found; PIPELINE_DIR is a folder with dvc.yaml and params.yaml (e.g. pipelines/twitter2015)")
    params = read_yaml(params_path)
    for key, value in sets.items():
        node: Any = params
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            raise ConfigError(f"--set {key}: {params_path} has no such key")
        node[leaf] = value
    for section, cls in (("data", DataConfig), ("extract", ExtractConfig), ("train", TrainConfig), ("report", ReportConfig)):
        if section not in params:
            raise ConfigError(f"{params_path}: missing section '{section}' (a paper pipeline has data, extract, train and report)")
        from_dict(cls, params[section], source=str(params_path), prefix=section)
    for key in OUTPUT_KEYS:
        path = Path(str(_get(params, key)))
        if path.is_absolute() or ".." in path.parts:
            raise ConfigError(
                f"{params_path}: {key} ({path}) leaves the pipeline folder; a dry run writes only inside its scratch folder"
            )
    return params, read_yaml(dvc_path)


def _get(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node[part]
    node[leaf] = value


def dry_params(params: dict[str, Any], data: Path, models: Mapping[str, Path], pipe: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The pipeline's params for the dry run and what changed: the data set and the
    models become the synthetic and random ones, one epoch, and every detection kept
    (see the module docstring). Paths are relative to the pipeline folder, as there."""
    rel = lambda p: os.path.relpath(p, pipe)  # noqa: E731
    changes: dict[str, Any] = {
        "data.dir": rel(data),
        "data.images": rel(data / "images"),
        "train.data.train": rel(data / "train.txt"),
        "train.data.valid": rel(data / "valid.txt"),
        "train.data.test": rel(data / "test.txt"),
        "extract.grid.weights": rel(models["grid"]),
        "extract.objects.weights": rel(models["objects"]),
        "extract.objects.score_threshold": 0.0,
        "extract.caption.model": rel(models["caption"]),
        "train.model.encoder": rel(models["encoder"]),
        "train.optim.epochs": 1,
    }
    out = json.loads(json.dumps(params))
    for key, value in changes.items():
        _set(out, key, value)
    return out, {key: {"was": _get(params, key), "now": value} for key, value in changes.items() if _get(params, key) != value}


# --------------------------------------------------------------------------- data


def make_data(folder: Path, train_posts: int, max_missing_rate: float, seed: int) -> dict[str, Any]:
    """Synthetic posts (the demo's generator) with photo-sized JPEGs, one image missing
    when ``max_missing_rate`` allows one."""
    held_out = max(2, train_posts // 8)
    total = train_posts + 2 * held_out
    # Missing images are drawn per split, round(n * rate): 1/train_posts gives exactly one, in train.
    missing = 1 / train_posts if 1 / total <= max_missing_rate else 0.0
    cfg = DemoConfig(seed=seed, out_dir=str(folder), train_posts=train_posts, valid_posts=held_out, test_posts=held_out,
                     missing_image_rate=missing, image_size=224)  # fmt: skip
    summary = generate_demo(cfg)
    images = sorted((folder / "images").glob("*.jpg"))
    for i, path in enumerate(images):
        size = PHOTO_SIZES[i % len(PHOTO_SIZES)]
        Image.open(path).convert("RGB").resize(size, Image.Resampling.BICUBIC).save(path, quality=90)
    return {
        "posts": {split: summary[split]["posts"] for split in ("train", "valid", "test")},
        "images": len(images),
        "missing": sum(summary[split]["images_missing"] for split in ("train", "valid", "test")),
        "sizes": sorted({PHOTO_SIZES[i % len(PHOTO_SIZES)] for i in range(len(images))}),
    }


# --------------------------------------------------------------------------- models


def calibrate_norms(model: torch.nn.Module, forward: Callable[[], Any]) -> int:
    """Give every batch norm of ``model`` (``BatchNorm2d``, torchvision's and detectron2's
    ``FrozenBatchNorm2d``) the per-channel mean and variance of what reaches it during
    ``forward()``, one pass, in order: each layer then sees the inputs its predecessors
    already normalise. Weights stay random; returns how many norms were set."""
    norms = [m for m in model.modules()
             if isinstance(getattr(m, "running_mean", None), torch.Tensor) and m.running_mean.ndim == 1]  # fmt: skip

    def set_stats(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].float()  # (N, C, H, W)
        if x.numel() < 2 * x.shape[1]:
            return  # e.g. a mask head given no detection: it keeps its initial statistics
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)).clamp_min(1e-6))

    hooks = [m.register_forward_pre_hook(set_stats) for m in norms]
    try:
        with torch.no_grad():
            forward()
    finally:
        for hook in hooks:
            hook.remove()
    return len(norms)


def _calibration_images(images: Sequence[Path], count: int = 4) -> list[Image.Image]:
    return [Image.open(path).convert("RGB") for path in images[:count]]


def build_models(extract: ExtractConfig, train: TrainConfig, corpus: Sequence[Path], images: Sequence[Path], out: Path,
                 seed: int) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Every model of the pipeline at its real size with random weights (batch norms
    calibrated on ``images``), saved under ``out`` in its real format; returns, per kind,
    its path, what it is and its size."""
    encoder_name, captioner_name = train.model.encoder, extract.caption.model
    if encoder_name not in ENCODERS:
        raise ConfigError(
            f"train.model.encoder: a dry run builds the encoder from its published sizes, and knows those of "
            f"{', '.join(ENCODERS)}, not of {encoder_name!r}; use --set train.model.encoder=bert-base-uncased"
        )
    if captioner_name not in CAPTIONERS:
        raise ConfigError(
            f"extract.caption.model: a dry run builds the captioner from its published sizes, and knows those of "
            f"{', '.join(CAPTIONERS)}, not of {captioner_name!r}; use --set extract.caption.model={next(iter(CAPTIONERS))}"
        )
    models: dict[str, dict[str, Any]] = {}
    objects = extract.objects
    pictures = _calibration_images(images)
    torch.manual_seed(seed)
    resnet = build_resnet(extract.grid.arch).eval()
    side = extract.grid.image_size
    batch = torch.stack([torch.from_numpy(np.asarray(p.resize((side, side)), np.float32)).permute(2, 0, 1) for p in pictures])
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    calibrate_norms(resnet, lambda: resnet((batch / 255 - mean) / std))
    save_state_dict(resnet, out / f"{extract.grid.arch}.pth")
    models["grid"] = _entry(out / f"{extract.grid.arch}.pth", extract.grid.arch, num_parameters(resnet))
    del resnet

    torch.manual_seed(seed)
    tensors = [torch.from_numpy(np.asarray(p, np.float32)).permute(2, 0, 1) for p in pictures[:2]]  # (3, H, W) 0..255
    if objects.backend == "detectron2":
        path, n = _detectron2_model(objects.detectron2_config, out / "detectron2", tensors)
        models["objects"] = _entry(path, f"{objects.detectron2_config} (detectron2)", n)
    else:
        maskrcnn = build_maskrcnn(objects.arch, min_size=objects.min_size, max_size=objects.max_size).eval()
        calibrate_norms(maskrcnn, lambda: maskrcnn([t / 255 for t in tensors]))
        save_state_dict(maskrcnn, out / f"{objects.arch}.pth")
        models["objects"] = _entry(out / f"{objects.arch}.pth", f"{objects.arch} (torchvision)", num_parameters(maskrcnn))
        del maskrcnn

    sizes, vocab, longest = ENCODERS[encoder_name]
    tokenizer = train_tokenizer(corpus_lines(corpus), vocab, sizes.max_position_embeddings, pad_to=vocab, words=[longest])
    tokenizer.save_pretrained(out / "tokenizer")
    bert = build_bert(sizes, tokenizer, seed)
    save_pretrained(out / "bert", bert, tokenizer)
    models["encoder"] = _entry(out / "bert", encoder_name, num_parameters(bert), vocabulary=len(tokenizer))
    del bert

    blip_sizes = CAPTIONERS[captioner_name]
    blip_tokenizer = type(tokenizer).from_pretrained(out / "tokenizer", model_max_length=blip_sizes.max_position_embeddings)
    blip_tokenizer.add_special_tokens({"additional_special_tokens": list(BLIP_TOKENS)})
    blip, processor = build_blip(blip_sizes, blip_tokenizer, seed)
    save_pretrained(out / "blip", blip, processor)
    models["caption"] = _entry(out / "blip", captioner_name, num_parameters(blip), vocabulary=len(blip_tokenizer))
    return models


def _entry(path: Path, what: str, parameters: int, **extra: Any) -> dict[str, Any]:
    return {"path": path, "model": what, "parameters": parameters, "bytes": _size(path), **extra}


def _detectron2_model(name: str, folder: Path, images: Sequence[torch.Tensor]) -> tuple[Path, int]:
    """The detectron2 model of config ``name`` with random weights (norms calibrated on
    ``images``, RGB 0..255), as a detectron2 checkpoint (``model.pth``), the format of
    the model zoo's own."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from msvse.extract.detectron2_backend import config_file

    cfg = get_cfg()
    cfg.merge_from_file(config_file(name))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    fx_log = logging.getLogger("torch.fx._symbolic_trace")
    level = fx_log.level
    with warnings.catch_warnings():
        # detectron2's own deprecation notes (torch.meshgrid, is_fx_tracing); the stage's log has them too.
        warnings.simplefilter("ignore", UserWarning)
        fx_log.setLevel(logging.ERROR)
        try:
            model = build_model(cfg).eval()
            bgr = cfg.INPUT.FORMAT == "BGR"
            inputs = [{"image": x.flip(0) if bgr else x, "height": x.shape[1], "width": x.shape[2]} for x in images]
            calibrate_norms(model, lambda: model(inputs))
        finally:
            fx_log.setLevel(level)
    folder.mkdir(parents=True, exist_ok=True)
    DetectionCheckpointer(model, save_dir=str(folder)).save("model")
    return folder / "model.pth", num_parameters(model)


# --------------------------------------------------------------------------- stages


def _dvc() -> Path:
    """DVC of this install (beside this Python), else the one on PATH."""
    here = Path(sys.executable).parent / "dvc"
    found = here if here.is_file() else shutil.which("dvc")
    if found is None:
        raise DryRunError("dvc: not found beside this Python or on PATH; install the package (it depends on dvc)")
    return Path(found)


def run_stages(dvc: Path, pipe: Path, stages: Sequence[str], logs: Path, echo: Callable[[str], None]) -> list[dict[str, Any]]:
    """``dvc repro --single-item STAGE`` for each stage in turn, timed, with the peak
    resident memory of its largest process; a failed stage stops the run, naming it and
    ending with its output's last lines."""
    env = {
        **os.environ,
        # The stage commands (msvse-*) of this install, first.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        # Every model is local: a stage that reached for the network would be a bug.
        "HF_HUB_OFFLINE": "1",
        "DVC_NO_ANALYTICS": "1",
    }
    logs.mkdir(parents=True, exist_ok=True)
    results = []
    for number, stage in enumerate(stages, start=1):
        echo(f"[{number}/{len(stages)}] {stage} ...")
        log = logs / f"{stage}.log"
        start = time.perf_counter()
        with log.open("wb") as out:
            process = subprocess.Popen([str(dvc), "repro", "--single-item", stage], cwd=pipe, env=env, stdout=out,
                                       stderr=subprocess.STDOUT)  # fmt: skip
            with StageMemory(process.pid) as memory:
                code = process.wait()
        seconds = time.perf_counter() - start
        if code != 0:
            tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-15:])
            raise DryRunError(f"dry run: stage {stage} failed (exit status {code}) after {seconds:.0f} s; its output ends:\n{tail}\n(all of it: {log})")
        results.append({"stage": stage, "seconds": round(seconds, 1), "peak_mib": round(memory.peak, 1),
                        "largest_process_mib": round(memory.largest, 1), "dvc_mib": round(memory.dvc, 1)})  # fmt: skip
        echo(f"      {seconds:.1f} s, peak {memory.peak:,.0f} MiB")
    return results


class StageMemory:
    """Peak memory of the processes DVC (process ``pid``) starts for a stage, sampled every
    ``interval`` seconds while it runs: ``peak``, the most their proportional set sizes
    summed to (a page shared by the stage and its forked DataLoader workers counts once
    in all); ``largest``, the largest resident set of one of them; ``dvc``, DVC's own.
    In MiB. Sampled, not exact: a peak shorter than ``interval`` can be missed, and
    memory counters of processes that cannot be read are left out. (Each sample has the
    kernel walk every page of every process: at 0.1 s it took a third of a CPU core
    beside a 6 GB captioner and its eight workers.)"""

    def __init__(self, pid: int, interval: float = 0.5):
        import psutil

        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak = self.largest = self.dvc = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                self.dvc = max(self.dvc, self.root.memory_info().rss / 2**20)
                children = self.root.children(recursive=True)
            except psutil.Error:
                return  # DVC has exited
            total = 0.0
            for child in children:
                try:
                    info = child.memory_full_info()
                except psutil.Error:
                    continue
                total += info.pss / 2**20
                self.largest = max(self.largest, info.rss / 2**20)
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> StageMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def stage_outputs(dvc_yaml: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, list[str]]:
    """Each stage's outs and metrics as paths, ``${key}`` replaced from ``params``."""
    def expand(text: str) -> str:
        return re.sub(r"\$\{([\w.]+)\}", lambda m: str(_get(params, m.group(1))), text)

    out: dict[str, list[str]] = {}
    for stage, spec in dvc_yaml.get("stages", {}).items():
        paths = []
        for field in ("outs", "metrics", "plots"):
            for item in spec.get(field) or []:
                paths.append(expand(next(iter(item)) if isinstance(item, dict) else str(item)))
        out[stage] = paths
    return out


# --------------------------------------------------------------------------- measuring


VLEN_REFERENCE = 16  # bytes of a variable-length string's entry in its dataset (the text is on the heap)


def shard_layout(path: Path) -> dict[str, Any]:
    """A shard's rows, file bytes, bytes per image and each dataset's row shape, type and
    bytes per row (a variable-length id counts its 16-byte reference, not its text on the
    file's heap)."""
    import h5py

    datasets: dict[str, Any] = {}
    with h5py.File(path, "r") as f:
        rows = len(f["ids"])

        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset):
                shape = tuple(obj.shape[1:])
                string = h5py.check_string_dtype(obj.dtype)
                item = VLEN_REFERENCE if string is not None and string.length is None else obj.dtype.itemsize
                datasets[name] = {
                    "row_shape": list(shape),
                    "dtype": _dtype_name(obj),
                    "row_bytes": int(item * int(np.prod(shape, dtype=np.int64))),
                }

        f.visititems(visit)
    size = path.stat().st_size
    return {"rows": rows, "bytes": size, "bytes_per_image": round(size / rows) if rows else 0,
            "row_bytes": sum(d["row_bytes"] for d in datasets.values()), "datasets": datasets}  # fmt: skip


def _dtype_name(dataset: Any) -> str:
    import h5py

    info = h5py.check_string_dtype(dataset.dtype)
    if info is not None:
        return "utf-8, variable length" if info.length is None else f"utf-8, {info.length} bytes"
    return str(dataset.dtype)


def trainer_inputs(shards: Sequence[Path]) -> dict[str, Any]:
    """What the trainer's reader sees in the shards: the grid's shape, the most labels
    of one image, the longest caption."""
    from msvse.features import FeatureStore

    store = FeatureStore(shards, lazy=True)
    try:
        rows = [store.get(image) for image in store.ids]
    finally:
        store.close()
    ok = [r for r in rows if r.status == 0]
    return {
        "images": len(rows),
        "ok": len(ok),
        "grid_shape": list(store.grid_shape) if store.grid_shape else None,
        "grid_dtype": "float16",
        "max_labels": max((len(r.labels or ()) for r in ok), default=0),
        "max_caption_words": max((len((r.caption or "").split()) for r in ok), default=0),
        "example_labels": list(ok[0].labels or ()) if ok else [],
        "example_caption": ok[0].caption if ok else "",
    }


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


# --------------------------------------------------------------------------- the run


def dry_run(
    pipeline_dir: str | Path,
    scratch: str | Path,
    *,
    posts: int | None = None,
    sets: Mapping[str, Any] | None = None,
    seed: int = 13,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the pipeline of ``pipeline_dir`` in ``scratch`` (new or empty) on synthetic data
    with random real-size models; return the report (also ``scratch/dry_run.json``)."""
    pipeline_dir = Path(pipeline_dir)
    params, dvc_yaml = read_pipeline(pipeline_dir, sets or {})
    train_cfg = from_dict(TrainConfig, params["train"], prefix="train")
    extract_cfg = from_dict(ExtractConfig, params["extract"], prefix="extract")
    data_cfg = from_dict(DataConfig, params["data"], prefix="data")
    if extract_cfg.objects.backend == "detectron2":
        # Before anything is built: the same one line as the pipeline's first stage.
        from msvse.extract.detectron2_backend import config_file, import_detectron2

        try:
            import_detectron2()
        except MsvseError as exc:
            raise DryRunError(f"{exc}; for the dry run alone: --set extract.objects.backend=torchvision") from None
        config_file(extract_cfg.objects.detectron2_config)
    dvc = _dvc()
    root = _scratch(Path(scratch))
    name = pipeline_dir.resolve().name
    pipe = root / "pipelines" / name
    pipe.mkdir(parents=True)
    for file in ("dvc.yaml", ".dvcignore"):
        if (pipeline_dir / file).is_file():
            shutil.copy(pipeline_dir / file, pipe / file)
    for package in CODE_DIRS:
        source = Path(importlib.import_module(package).__file__).parent
        shutil.copytree(source, root / package.split(".")[-1], ignore=shutil.ignore_patterns("__pycache__"))

    started = time.perf_counter()
    n_train = posts or train_cfg.optim.batch_size
    echo(f"dry run of {pipeline_dir} in {root}: {n_train} training posts, random weights at the real sizes")
    data_dir = root / "data" / name
    data = make_data(data_dir, n_train, data_cfg.max_missing_rate, seed)
    echo(f"data: {data['posts']} posts, {data['images']} images ({data['missing']} missing); building the models ...")
    t0 = time.perf_counter()
    corpus = [data_dir / f"{split}.txt" for split in ("train", "valid", "test")]
    models = build_models(extract_cfg, train_cfg, corpus, sorted((data_dir / "images").glob("*.jpg")), root / "models", seed)
    models_seconds = time.perf_counter() - t0
    run_params, changed = dry_params(params, data_dir, {kind: m["path"] for kind, m in models.items()}, pipe)
    (pipe / "params.yaml").write_text(
        "# The dry run's params: the pipeline's, with the changes listed in ../../dry_run.json.\n"
        + yaml.safe_dump(run_params, sort_keys=False),
        encoding="utf-8",
    )
    subprocess.run([str(dvc), "init", "--no-scm", "-q"], cwd=pipe, check=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})

    stages = run_stages(dvc, pipe, list(dvc_yaml.get("stages", {})), root / "logs", echo)
    report = _measure(pipe, run_params, dvc_yaml, stages)
    report.update(
        pipeline=str(pipeline_dir),
        scratch=str(root),
        backend=extract_cfg.objects.backend,
        device=_device(run_params),
        data=data,
        models={kind: {**m, "path": os.path.relpath(m["path"], root)} for kind, m in models.items()},
        models_seconds=round(models_seconds, 1),
        changed_params=changed,
        seconds=round(time.perf_counter() - started, 1),
        machine=_machine(),
    )
    write_json_atomic(root / "dry_run.json", report)
    return report


def _scratch(path: Path) -> Path:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise DryRunError(f"--out {path}: not an empty folder; a dry run writes a few GB into a new or empty one")
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def _device(params: Mapping[str, Any]) -> str:
    wanted = str(_get(params, "extract.device"))
    return ("cuda" if torch.cuda.is_available() else "cpu") if wanted == "auto" else wanted


def _machine() -> dict[str, Any]:
    import platform

    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _measure(pipe: Path, params: Mapping[str, Any], dvc_yaml: Mapping[str, Any], stages: list[dict[str, Any]]) -> dict[str, Any]:
    outputs = stage_outputs(dvc_yaml, params)
    missing = [p for paths in outputs.values() for p in paths if not (pipe / p).exists()]
    assert not missing, f"DVC ran every stage, yet these outputs are missing: {missing}"
    shards = {Path(p).stem: pipe / p for p in _get(params, "train.data.features")}
    run = pipe / str(_get(params, "train.output"))
    metrics = _read_json(run / "metrics.json")
    for row in stages:
        row["outputs"] = {p: _size(pipe / p) for p in outputs.get(row["stage"], [])}
        recorded = []
        for p in row["outputs"]:
            if p.endswith(".h5"):
                recorded.append(_read_json(pipe / (p[: -len(".h5")] + ".json")).get("summary", {}).get("peak_memory"))
        if row["stage"] == "train":
            recorded.append(_read_json(run / "train_config.json").get("peak_memory"))
        gpu = [r["gpu_mib"] for r in recorded if r and r.get("gpu_mib") is not None]
        row["peak_gpu_mib"] = max(gpu) if gpu else None
    return {
        "stages": stages,
        "shards": {kind: shard_layout(path) for kind, path in shards.items() if path.is_file()},
        "trainer_inputs": trainer_inputs([p for p in shards.values() if p.is_file()]),
        "checkpoint": {"path": str((run / "model").relative_to(pipe)), "bytes": _size(run / "model"),
                       "parameters": metrics.get("parameters"), "paper_parameters": PAPER_PARAMETERS},  # fmt: skip
        # DVC keeps a copy of every cached output in .dvc/cache (unless links are configured).
        "disk": {"pipeline_folder": _size(pipe), "dvc_cache": _size(pipe / ".dvc" / "cache")},
    }


# --------------------------------------------------------------------------- the table


def format_report(report: Mapping[str, Any]) -> str:
    """The per-stage table and the lines around it."""
    data, inputs, ckpt = report["data"], report["trainer_inputs"], report["checkpoint"]
    width = max(len(m["model"]) for m in report["models"].values()) + 2
    lines = [
        f"Dry run of {report['pipeline']} ({report['backend']} backend) on {report['device']}: "
        f"{sum(data['posts'].values())} posts, {data['images']} images + {data['missing']} missing, "
        f"random weights at the real sizes ({report['seconds']:.0f} s in all, {report['models_seconds']:.0f} s building the models)",
        "",
        f"{'model':<9}{'architecture':<{width}}{'parameters':>14}{'on disk':>12}",
    ]
    for kind, m in report["models"].items():
        lines.append(f"{kind:<9}{m['model']:<{width}}{m['parameters']:>14,}{_mb(m['bytes']):>12}")
    lines += ["", f"{'stage':<17}{'seconds':>9}{'peak memory':>13}{'peak GPU':>11}  writes"]
    for row in report["stages"]:
        gpu = "-" if row["peak_gpu_mib"] is None else f"{row['peak_gpu_mib']:,.0f} MiB"
        lines.append(f"{row['stage']:<17}{row['seconds']:>9.1f}{row['peak_mib']:>9,.0f} MiB{gpu:>11}  {_writes(row, report)}")
    grid = inputs["grid_shape"]
    lines += [
        "",
        f"into the trainer: grids {grid[0]} x {grid[1]} {inputs['grid_dtype']}, up to {inputs['max_labels']} labels, "
        f"captions up to {inputs['max_caption_words']} words ({inputs['ok']} of {inputs['images']} images ok)"
        if grid else "into the trainer: no grids",
        f"checkpoint {ckpt['path']}: {_mb(ckpt['bytes'])}, {ckpt['parameters'] / 1e6:.2f} M parameters "
        f"(paper, Table 7: {ckpt['paper_parameters'] / 1e6:.2f} M)",
        f"disk: {_mb(report['disk']['pipeline_folder'])} in the pipeline folder, of which {_mb(report['disk']['dvc_cache'])} "
        "is DVC's cache (a copy of each cached output)",
        f"peak memory: the stage's processes under DVC, workers included (DVC itself: up to "
        f"{max(r['dvc_mib'] for r in report['stages']):,.0f} MiB more)",
        f"everything is in {report['scratch']} (dry_run.json, logs/)",
    ]
    return "\n".join(lines)


SCHEMA_ORDER = ("grid", "objects/labels", "objects/scores", "objects/boxes", "caption")


def _writes(row: Mapping[str, Any], report: Mapping[str, Any]) -> str:
    parts = []
    for path in row["outputs"]:
        kind = Path(path).stem
        if path.endswith(".h5") and kind in report["shards"]:
            s = report["shards"][kind]
            layout = ", ".join(_layout(name, s["datasets"][name]) for name in SCHEMA_ORDER if name in s["datasets"])
            parts.append(f"{path}: {s['bytes_per_image']:,} B/image, rows of {s['row_bytes']:,} B ({layout})")
        elif path.endswith("/model"):
            parts.append(f"{path}: {_mb(row['outputs'][path])}")
    return "; ".join(parts) or ", ".join(Path(p).name for p in row["outputs"])


def _layout(name: str, dataset: Mapping[str, Any]) -> str:
    """``labels 10 x 14-byte UTF-8``: a dataset's row as the README's schema writes it."""
    kind = re.sub(r"utf-8, (\d+) bytes", r"\1-byte UTF-8", dataset["dtype"])
    shape = " x ".join(map(str, dataset["row_shape"]))
    if not shape:
        return f"{name} {kind}"
    return f"{name.removeprefix('objects/')} {shape}{' x ' if 'UTF-8' in kind else ' '}{kind}"


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def temporary_scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="msvse-dry-run-"))
