"""Decoding: every awkward input becomes an upright RGB picture or a recorded reason."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from msvse.errors import MsvseError
from msvse.extract.images import UnreadableImage, decode_image, is_image_name, list_images

LIMIT = 10_000_000


def decode(path, **kw):
    return decode_image(path, max_pixels=kw.pop("max_pixels", LIMIT), **kw)


def test_every_odd_image_is_decoded_or_refused_as_expected(odd_images, odd_expected):
    for name, status in odd_expected.items():
        if status == 0:
            d = decode(odd_images / name)
            assert d.image.mode == "RGB", name
        else:
            with pytest.raises(UnreadableImage):
                decode(odd_images / name)


@pytest.mark.parametrize(
    "name, words",
    [
        ("empty.jpg", "empty file"),
        ("truncated.jpg", "truncated"),
        ("text.jpg", "not a readable image"),
        ("bomb.png", "over the limit"),
    ],
)
def test_unreadable_reasons(odd_images, name, words):
    with pytest.raises(UnreadableImage, match=words):
        decode(odd_images / name)


def test_pixel_limit_is_checked_before_decoding(odd_images):
    # bomb.png has a header and no pixel data: had it been decoded, the reason would
    # be a decoding error, not the limit.
    with pytest.raises(UnreadableImage, match="30000 x 30000 pixels is over the limit"):
        decode(odd_images / "bomb.png")
    with pytest.raises(UnreadableImage, match="over the limit of 100"):
        decode(odd_images / "good.jpg", max_pixels=100)


def test_cmyk_becomes_rgb(odd_images):
    r, g, b = decode(odd_images / "cmyk.jpg").image.getpixel((20, 15))
    assert r > 200 and g < 60 and b < 60


def test_16_bit_is_scaled_not_clipped(odd_images):
    src = np.asarray(Image.open(odd_images / "gray16.png"), dtype=np.int64)
    out = np.asarray(decode(odd_images / "gray16.png").image)
    assert out.shape == (30, 40, 3)
    np.testing.assert_array_equal(out[..., 0], src // 257)
    assert out[0, 0, 0] == 255 and len(np.unique(out[..., 0])) > 100


def test_palette_and_transparency(odd_images):
    assert decode(odd_images / "palette.png").image.getpixel((5, 5)) == (0, 255, 0)
    # a transparent palette entry is shown over white, not as its stored colour
    assert decode(odd_images / "palette_transparent.png").image.getpixel((5, 5)) == (255, 255, 255)


def test_rgba_is_composited_over_white(odd_images):
    img = decode(odd_images / "rgba.png").image
    assert img.getpixel((5, 5)) == (0, 0, 255)
    assert img.getpixel((35, 5)) == (255, 255, 255)


def test_grayscale_becomes_three_equal_channels(odd_images):
    arr = np.asarray(decode(odd_images / "gray.jpg").image).astype(int)
    assert arr.shape == (30, 40, 3)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()


def test_exif_orientation_is_applied(odd_images):
    d = decode(odd_images / "rotated.jpg")
    assert d.image.size == (30, 40) and d.original_size == (30, 40)
    top = np.asarray(d.image)[:15].reshape(-1, 3).mean(0)
    bottom = np.asarray(d.image)[25:].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 60  # stored left (red) is shown on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_animated_gif_gives_its_first_frame(odd_images):
    r, g, b = decode(odd_images / "animated.gif").image.getpixel((10, 10))
    assert r > 200 and g < 60 and b < 60


def test_jpeg_draft_keeps_both_sides_at_least_min_side(tmp_path, photo_maker):
    path = photo_maker(tmp_path / "big.jpg", 3, size=(1000, 700))
    d = decode(path, min_side=300)
    assert min(d.image.size) >= 300 and d.image.size[0] < 1000
    assert d.original_size == (1000, 700)
    assert decode(path).image.size == (1000, 700)


def test_only_visible_image_files_are_ids(photos):
    (photos / "sub.jpg").mkdir()
    names = list_images(photos)
    assert names == sorted(f"{100 + i}.jpg" for i in range(7))
    assert not is_image_name(".DS_Store") and not is_image_name("notes.txt") and not is_image_name("._x.jpg")
    assert is_image_name("A.JPEG") and is_image_name("b.png")


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(MsvseError, match="images folder not found"):
        list_images(tmp_path / "nope")


def test_each_side_gets_the_pixels_it_would_get_alone(tmp_path, photo_maker):
    from msvse.extract.images import decode_at_sides

    big = photo_maker(tmp_path / "big.jpg", 4, size=(1800, 1700))
    both = decode_at_sides(big, max_pixels=LIMIT, sides=[224, 800])
    assert min(both[224].image.size) >= 224 and min(both[800].image.size) >= 800
    assert both[224].image.size < both[800].image.size
    for side in (224, 800):
        alone = decode(big, min_side=side).image
        np.testing.assert_array_equal(np.asarray(both[side].image), np.asarray(alone))
    small = photo_maker(tmp_path / "small.jpg", 5, size=(300, 200))
    shared = decode_at_sides(small, max_pixels=LIMIT, sides=[224, 800, 0])
    assert shared[224] is shared[800] is shared[0]  # no reduced scale possible: one decode
