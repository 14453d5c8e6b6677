"""Fixtures for stage 1: tiny models saved in the real formats, and image folders.

The tiny models are built here, in a session temp folder, with the same code paths as
real checkpoints: torchvision state dicts (``.pth``) for the ResNet and the Mask
R-CNN, and a ``save_pretrained`` folder (BLIP model + processor) for the captioner.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"

from msvse.config import from_dict  # noqa: E402
from msvse.extract.archs import build_maskrcnn, build_resnet  # noqa: E402
from msvse.extract.config import ExtractConfig  # noqa: E402

WORDS = ["a", "photo", "of", "dog", "cat", "man", "woman", "on", "the", "street", "with", "red", "car",
         "in", "park", "group", "people", "standing", "near", "building", "##s", "."]


def _save_blip(folder: Path) -> None:
    from transformers import BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    torch.manual_seed(0)
    config = BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16, initializer_range=0.5),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, initializer_range=0.5,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                         sep_token_id=tokenizer.sep_token_id, eos_token_id=tokenizer.sep_token_id),
        projection_dim=32,
    )
    BlipForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    torch.manual_seed(0)
    torch.save(build_resnet("resnet18").state_dict(), root / "resnet18.pth")
    torch.manual_seed(0)
    detector = build_maskrcnn("maskrcnn_resnet18_fpn_tiny", min_size=128, max_size=128)
    torch.save(detector.state_dict(), root / "maskrcnn_tiny.pth")
    _save_blip(root / "blip")
    return {"resnet": root / "resnet18.pth", "maskrcnn": root / "maskrcnn_tiny.pth", "blip": root / "blip"}


@pytest.fixture(scope="session")
def tiny_section(tiny_models) -> dict:
    """The ``extract`` params section for the tiny models, shrunk for CPU tests."""
    return {
        "grid": {"arch": "resnet18", "weights": str(tiny_models["resnet"]), "image_size": 64},
        "objects": {"arch": "maskrcnn_resnet18_fpn_tiny", "weights": str(tiny_models["maskrcnn"]),
                    "min_size": 64, "max_size": 96, "score_threshold": 0.012, "max_objects": 5},
        "caption": {"model": str(tiny_models["blip"]), "num_beams": 2, "max_new_tokens": 6},
        "batch_size": 3,
        "num_workers": 0,
        "device": "cpu",
    }


@pytest.fixture(scope="session")
def tiny_config(tiny_section) -> ExtractConfig:
    return from_dict(ExtractConfig, tiny_section)


@pytest.fixture()
def params_file(tmp_path, tiny_section) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"extract": tiny_section}))
    return path


def random_photo(path: Path, seed: int, size: tuple[int, int] = (80, 60), **save) -> Path:
    """A smooth random RGB picture (JPEG-friendly), distinct per seed."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    Image.fromarray(small).resize(size, Image.Resampling.BICUBIC).save(path, **save)
    return path


@pytest.fixture()
def photos(tmp_path) -> Path:
    """A folder of 7 good JPEGs plus files that are not ids."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(7):
        random_photo(folder / f"{100 + i}.jpg", i, size=(80 + 8 * i, 60 + 4 * i))
    (folder / "notes.txt").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "._100.jpg").write_bytes(b"\0\5\26\7")
    return folder


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header promises width x height pixels and holds almost no pixel data:
    decoding it would fail, so only a size check made first can name the limit."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


# name -> expected status, for every kind of awkward input the extractor must survive
ODD_IMAGES = {
    "empty.jpg": 1,
    "truncated.jpg": 1,
    "text.jpg": 1,
    "bomb.png": 1,
    "cmyk.jpg": 0,
    "gray16.png": 0,
    "palette.png": 0,
    "palette_transparent.png": 0,
    "rgba.png": 0,
    "gray.jpg": 0,
    "rotated.jpg": 0,
    "animated.gif": 0,
    "good.jpg": 0,
}


def make_odd_images(folder: Path) -> dict[str, int]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    random_photo(folder / "full.tmp", 1, size=(160, 120), format="JPEG", quality=90)
    data = (folder / "full.tmp").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "full.tmp").unlink()
    (folder / "text.jpg").write_text("this is a text file, not a JPEG\n")
    _png_header_only(folder / "bomb.png", 30000, 30000)
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(folder / "cmyk.jpg")  # red in CMYK
    ramp = (np.arange(40 * 30, dtype=np.uint32).reshape(30, 40) * 54).astype(np.uint16)
    ramp[0, 0] = 65535
    Image.fromarray(ramp).save(folder / "gray16.png")
    pal = Image.new("P", (40, 30), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))  # index 1 = green
    pal.save(folder / "palette.png")
    pal.save(folder / "palette_transparent.png", transparency=1)
    rgba = np.zeros((30, 40, 4), np.uint8)
    rgba[:, :20] = (0, 0, 255, 255)  # left half opaque blue, right half fully transparent black
    Image.fromarray(rgba).save(folder / "rgba.png")
    Image.fromarray(np.full((30, 40), 90, np.uint8)).save(folder / "gray.jpg")
    stored = np.zeros((30, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)  # stored left half red, right half blue
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored turned 90 degrees clockwise
    Image.fromarray(stored).save(folder / "rotated.jpg", exif=exif, quality=95)
    frames = [Image.new("RGB", (40, 30), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    random_photo(folder / "good.jpg", 5)
    return dict(ODD_IMAGES)


@pytest.fixture(scope="session")
def odd_expected() -> dict[str, int]:
    return dict(ODD_IMAGES)


@pytest.fixture(scope="session")
def photo_maker():
    return random_photo


@pytest.fixture(scope="session")
def odd_maker():
    return make_odd_images


@pytest.fixture()
def odd_images(tmp_path) -> Path:
    folder = tmp_path / "odd"
    make_odd_images(folder)
    return folder
