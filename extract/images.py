"""Which files are images, and how one becomes an RGB picture or a recorded failure.

Decoding never substitutes anything: an image that cannot be read as what it claims
to be raises :class:`UnreadableImage` with the reason, and the caller records a
status-1 row. What a careful viewer would show is what the models get: EXIF
orientation applied, the first frame of an animation, transparency over white,
16-bit samples scaled (not clipped) to 8 bits, CMYK and palette converted to RGB.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from msvse.errors import MsvseError
from msvse.twitter import IMAGE_EXTENSIONS

EXIF_ORIENTATION = 0x0112
# Orientations 5-8 turn the picture a quarter, so width and height swap.
QUARTER_TURNS = (5, 6, 7, 8)


class UnreadableImage(Exception):
    """An image file that cannot be decoded; ``str()`` is the reason."""


@dataclass(frozen=True)
class Decoded:
    """An RGB picture, possibly decoded at a reduced scale, and the size in pixels of
    the upright original (what box coordinates refer to)."""

    image: Image.Image
    original_size: tuple[int, int]  # (width, height), EXIF orientation applied


def is_image_name(name: str) -> bool:
    """Whether a file in an images folder is an id: a visible file with an image
    extension (``.txt``, ``.DS_Store`` and other hidden files are not)."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(folder: Path) -> list[str]:
    """The image file names directly inside ``folder``, sorted."""
    if not folder.is_dir():
        raise MsvseError(f"{folder}: images folder not found")
    return sorted(p.name for p in folder.iterdir() if is_image_name(p.name) and not p.is_dir())


@contextlib.contextmanager
def _own_pixel_limit() -> Iterator[None]:
    # We check the size against max_pixels ourselves, before decoding; Pillow's fixed
    # limit would otherwise warn about, or refuse, images the user's limit allows.
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def decode_image(path: Path, *, max_pixels: int, min_side: int = 0) -> Decoded:
    """Open ``path`` as an upright RGB picture.

    The pixel count is read from the header and checked against ``max_pixels`` before
    any pixel is decoded. With ``min_side`` > 0, a JPEG may be decoded at a reduced
    DCT scale that still leaves both sides at least ``min_side`` pixels (the models
    resize further down anyway; it saves most of the decoding time of big photos).
    """
    return decode_at_sides(path, max_pixels=max_pixels, sides=[min_side])[min_side]


def decode_at_sides(path: Path, *, max_pixels: int, sides: Sequence[int]) -> dict[int, Decoded]:
    """:func:`decode_image` for several ``min_side`` values at once, decoding once per
    distinct JPEG scale they lead to. Each model asks for its own side, so the pixels it
    gets never depend on which other models run (a side of 0 means full scale)."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise UnreadableImage(f"cannot stat file ({exc.strerror})") from None
    if size == 0:
        raise UnreadableImage("empty file")
    wanted = sorted(set(sides), reverse=True)
    opened: list[Image.Image] = []
    decoded: dict[tuple[int, int], Decoded] = {}
    with _own_pixel_limit():
        try:
            first = _open(path)
            opened.append(first)
            original, orientation = _check_header(first, max_pixels)
            # The scale each side leads to is Pillow's to choose (draft): open the file
            # once per side, ask, and decode once per distinct resulting size.
            by_size: dict[tuple[int, int], Image.Image] = {}
            side_to_size: dict[int, tuple[int, int]] = {}
            for side in wanted:
                img = first if not by_size else _open(path)
                if img is not first:
                    opened.append(img)
                if side > 0 and img.format == "JPEG":
                    img.draft(None, (side, side))
                side_to_size[side] = img.size
                by_size.setdefault(img.size, img)
            for key, img in by_size.items():
                decoded[key] = Decoded(_pixels(img, orientation), original)
        finally:
            # Closing an image drops its pixels: keep those returned as opened (an upright
            # RGB picture, whose file Pillow closed when it loaded the single frame).
            kept = {id(d.image) for d in decoded.values()}
            for img in opened:
                if id(img) not in kept:
                    img.close()
    return {side: decoded[side_to_size[side]] for side in wanted}


def _open(path: Path) -> Image.Image:
    try:
        return Image.open(path)
    except (OSError, ValueError, SyntaxError) as exc:
        raise UnreadableImage(f"not a readable image ({_message(exc)})") from None


def _check_header(img: Image.Image, max_pixels: int) -> tuple[tuple[int, int], int]:
    """The upright (width, height) and the EXIF orientation, from the header alone."""
    width, height = img.size
    if width <= 0 or height <= 0:
        raise UnreadableImage(f"header gives an empty size {width} x {height}")
    if width * height > max_pixels:
        raise UnreadableImage(f"{width} x {height} pixels is over the limit of {max_pixels} (extract.max_pixels)")
    try:
        orientation = int(img.getexif().get(EXIF_ORIENTATION, 1))
    except (OSError, ValueError, SyntaxError, TypeError) as exc:
        raise UnreadableImage(f"unreadable EXIF block ({_message(exc)})") from None
    return ((height, width) if orientation in QUARTER_TURNS else (width, height)), orientation


def _pixels(img: Image.Image, orientation: int) -> Image.Image:
    try:
        img.seek(0)  # the first frame of an animation
        img.load()
        upright = ImageOps.exif_transpose(img) if orientation != 1 else img
        return to_rgb(upright)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise UnreadableImage(f"cannot decode pixels ({_message(exc)})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB the way a viewer shows it."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit samples: keep the top 8 bits (a plain convert would clip at 255).
        arr = np.asarray(img, dtype=np.int64)
        arr = np.clip(arr // 257, 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    elif mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        # Transparent pixels hold arbitrary colours; show them over white, as a page does.
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise UnreadableImage(f"unsupported image mode {mode!r} ({exc})") from None


def _message(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

