"""Files that appear whole or not at all, and the provenance every stage writes."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import msvse


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    A crash or an exception leaves ``path`` as it was (absent or the old version) and
    removes the temporary file, so a reader never sees half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600; the finished file gets the permissions a plain open() would.
    os.chmod(tmp_path, 0o666 & ~current_umask())
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def provenance() -> dict[str, Any]:
    """Who wrote a file: package version, Python, platform, time (UTC)."""
    return {
        "msvse_version": msvse.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def peak_memory(device: Any = None) -> dict[str, float | None]:
    """This process's peak resident memory and, on a CUDA ``device``, the most GPU memory
    PyTorch's allocator held (what the card must have, besides the CUDA context), in MiB.
    Stages record it beside their outputs, so a run says what it needed."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    gpu = None
    if device is not None and getattr(device, "type", None) == "cuda":
        import torch

        gpu = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
    return {"rss_mib": round(rss, 1), "gpu_mib": gpu}


def write_resolved_config(path: str | Path, stage: str, config: dict[str, Any], **extra: Any) -> None:
    """Write the resolved config of ``stage`` as JSON next to that stage's outputs."""
    write_json_atomic(path, {"stage": stage, "config": config, **extra, **provenance()})
