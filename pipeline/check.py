"""The first stage of a real-data pipeline: can it run here, and is the data set where
the params say?

The images and the text of Twitter-2015 and Twitter-2017 do not come with this
repository, and detectron2, the paper pipelines' detector backend, does not come from
the package registry. Before any model is loaded, :func:`check_pipeline` checks both:
that the detector backend of ``extract.objects`` imports (:func:`check_detector`) and
that the three text files and the images folder of the ``data`` section are there
(:func:`check_data`). Each problem is one line that says what to do (the install command
or the switch to torchvision; where to put the data), and all of them come at once.
When all is in place it writes a small report (posts, entities, images found and
missing) that the extraction stages depend on, so that they run only after the check has
passed.

The report holds no timestamp: the same data gives the same file, and DVC then sees no
reason to run the stages after it again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msvse
from msvse.config import bounds, to_dict
from msvse.errors import MsvseError
from msvse.io import write_json_atomic
from msvse.extract.config import ObjectsConfig
from msvse.twitter import read_posts, stats

SPLIT_FILES = {"train": "train.txt", "valid": "valid.txt", "test": "test.txt"}
EXAMPLES = 5  # missing images named in the report and in errors


@dataclass(frozen=True)
class DataConfig:
    """The ``data`` section of a real-data pipeline's ``params.yaml``."""

    name: str = "Twitter-2015"  # how messages name the data set
    dir: str = "data/twitter2015"  # holds train.txt, valid.txt, test.txt
    images: str = "data/twitter2015/images"  # holds <IMGID>.jpg for every post
    features: str = "features/twitter2015"  # where the stage-1 shards and this check's report go
    # Above this share of referenced images missing, the folder is taken to be the wrong
    # one (each post whose image is missing still trains, with the no-image input).
    max_missing_rate: float = field(default=0.1, metadata=bounds(min=0, max=1))

    def split_paths(self) -> dict[str, Path]:
        return {split: Path(self.dir) / name for split, name in SPLIT_FILES.items()}


class DataMissing(MsvseError):
    """The data set is not where the params say."""


def _abs(path: str | Path) -> str:
    return str(Path(path).resolve())


def _what_to_put(cfg: DataConfig) -> str:
    return (
        f"Put the {cfg.name} text files train.txt, valid.txt and test.txt (Twitter format: an 'IMGID:<id>' "
        f"line, then one token<TAB>tag per line) in {_abs(cfg.dir)}/ and its images, <id>.jpg, in "
        f"{_abs(cfg.images)}/, or point data.dir and data.images of the params file at where they are"
    )


class PipelineNotReady(MsvseError):
    """Something the pipeline needs is missing: one line per problem."""


def check_pipeline(data: DataConfig, objects: ObjectsConfig) -> dict[str, Any]:
    """Check the detector backend and the data set; write and return the data report.

    Raises :class:`PipelineNotReady` with every problem found, one line each, so a first
    run names all that is missing instead of one thing per run.
    """
    problems = []
    for check, cfg in ((check_detector, objects), (inspect_data, data)):
        try:
            check(cfg)
        except MsvseError as exc:
            problems.append(str(exc))
    if problems:
        raise PipelineNotReady("\n".join(problems))
    return check_data(data)


def check_detector(cfg: ObjectsConfig) -> None:
    """For ``backend: detectron2``: detectron2 imports and its config resolves (else one
    line with the install command and the switch to torchvision). Nothing falls back:
    the torchvision backend runs only where the params say so."""
    if cfg.backend != "detectron2":
        return
    from msvse.extract.detectron2_backend import config_file, import_detectron2

    import_detectron2()
    config_file(cfg.detectron2_config)


def check_data(cfg: DataConfig) -> dict[str, Any]:
    """Check that the data set is in place; write and return the report.

    Raises :class:`DataMissing` naming every missing file or folder and what belongs
    there, or :class:`~msvse.errors.DataFormatError` (file and line) for a text file
    that breaks the format.
    """
    report = inspect_data(cfg)
    write_json_atomic(Path(cfg.features) / "data_check.json", report)
    return report


def inspect_data(cfg: DataConfig) -> dict[str, Any]:
    """:func:`check_data` without writing the report."""
    paths = cfg.split_paths()
    images = Path(cfg.images)
    missing = [p.name for p in paths.values() if not p.is_file()]
    looked = []
    if missing:
        looked.append(f"{', '.join(missing)} in {_abs(cfg.dir)}")
    if not images.is_dir():
        looked.append(f"images folder {_abs(images)}")
    if looked:
        raise DataMissing(f"{cfg.name} is not in place: no {' and no '.join(looked)}. {_what_to_put(cfg)}")

    splits: dict[str, Any] = {}
    wanted: dict[str, None] = {}
    for split, path in paths.items():
        posts = read_posts(path)
        splits[split] = {"file": str(path), **stats(posts)}
        wanted.update((post.image_file, None) for post in posts)
    absent = [name for name in wanted if not (images / name).is_file()]
    found = len(wanted) - len(absent)
    if found == 0:
        raise DataMissing(
            f"{cfg.name}: none of the {len(wanted)} images the posts reference is in {_abs(images)} "
            f"(looked for e.g. {', '.join(absent[:3])}). Put the {cfg.name} images, <IMGID>.jpg, in "
            f"{_abs(images)}/, or point data.images of the params file at where they are"
        )
    rate = len(absent) / len(wanted)
    if rate > cfg.max_missing_rate:
        raise DataMissing(
            f"{cfg.name}: {len(absent)} of the {len(wanted)} images the posts reference ({100 * rate:.1f}%) are "
            f"not in {_abs(images)}, more than data.max_missing_rate ({100 * cfg.max_missing_rate:.1f}%); "
            f"missing e.g. {', '.join(absent[:EXAMPLES])}. Is it the images folder of {cfg.name}?"
        )
    report = {
        "stage": "check_data",
        "config": to_dict(cfg),
        "splits": splits,
        "images": {
            "referenced": len(wanted),
            "found": found,
            "missing": len(absent),
            "missing_examples": absent[:EXAMPLES],
        },
        "msvse_version": msvse.__version__,
    }
    return report


def summary_line(report: dict[str, Any]) -> str:
    s, im = report["splits"], report["images"]
    posts = ", ".join(f"{split} {row['posts']} posts / {row['entities']} entities" for split, row in s.items())
    line = f"{report['config']['name']}: {posts}; images: {im['found']} of {im['referenced']} found"
    if im["missing"]:
        line += f" ({im['missing']} missing, e.g. {', '.join(im['missing_examples'])}; those posts train with no image)"
    return line
