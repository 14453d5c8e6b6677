"""The demo data set: deterministic, readable, and built so that only images settle
the type of ambiguous names."""

from __future__ import annotations

import csv
import io
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from msvse.config import load_section
from msvse.errors import ConfigError
from msvse.pipeline.cli import main
from msvse.pipeline.demo import AMBIGUOUS, NEUTRAL, SPLITS, UNRELATED, DemoConfig, generate_demo
from msvse.twitter import ENTITY_TYPES, entities, read_posts


def read_scenes(out_dir) -> dict[str, dict[str, str]]:
    with open(Path(out_dir) / "scenes.tsv", encoding="utf-8", newline="") as f:
        return {row["image_id"]: row for row in csv.DictReader(f, delimiter="\t")}


def data_files(root: Path) -> dict[str, bytes]:
    """Every generated file but config.json (which records when it was written)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != "config.json"}


def ambiguous_mentions(posts):
    for post in posts:
        for ent in entities(post.tags):
            name = " ".join(post.tokens[ent.start : ent.end])
            if name in AMBIGUOUS:
                yield post, ent, name


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path, small_demo):
    generate_demo(small_demo(tmp_path / "a"))
    generate_demo(small_demo(tmp_path / "b"))
    generate_demo(small_demo(tmp_path / "c", seed=14))
    a, b, c = (data_files(tmp_path / x) for x in "abc")
    assert a == b
    assert len([n for n in a if n.startswith("images/")]) > 50
    assert a["train.txt"] != c["train.txt"]
    shared_images = [n for n in a if n.startswith("images/") and n in c]
    assert shared_images and all(a[n] != c[n] for n in shared_images)


def test_files_read_back_and_match_the_summary(tmp_path, small_demo):
    cfg = small_demo(tmp_path / "demo")
    summary = generate_demo(cfg)
    out = Path(cfg.out_dir)
    scenes = read_scenes(out)
    ids = []
    for split in SPLITS:
        posts = read_posts(out / f"{split}.txt")
        assert summary[split]["posts"] == len(posts) == cfg.split_sizes()[split]
        assert summary[split]["entities"] == sum(len(entities(p.tags)) for p in posts)
        ids += [p.image_id for p in posts]
        for post in posts:
            assert post.image_id.isdigit() and scenes[post.image_id]["split"] == split
    assert ids == [str(cfg.first_id + i) for i in range(len(ids))]
    written = {p.stem for p in (out / "images").glob("*.jpg")}
    missing = {i for i in ids if scenes[i]["written"] == "0"}
    assert missing and written == set(ids) - missing
    assert sum(summary[s]["images_missing"] for s in SPLITS) == len(missing)
    image = Image.open(out / "images" / f"{sorted(written)[0]}.jpg")
    assert image.format == "JPEG" and image.mode == "RGB" and image.size == (cfg.image_size, cfg.image_size)
    image.load()


def test_posts_look_like_tweets(full_demo):
    cfg, _ = full_demo
    tokens = Counter(t for p in read_posts(Path(cfg.out_dir) / "train.txt") for t in p.tokens)
    assert tokens["RT"] > 20
    assert sum(n for t, n in tokens.items() if t.startswith("@")) > 20
    assert sum(n for t, n in tokens.items() if t.startswith("#")) > 50
    assert sum(n for t, n in tokens.items() if t.startswith("http://t.co/")) > 50


def test_ambiguous_names_take_several_types_in_neutral_text_and_the_image_shows_the_type(full_demo):
    cfg, summary = full_demo
    out = Path(cfg.out_dir)
    scenes = read_scenes(out)
    assert 0.4 <= summary["ambiguous_share"] <= 0.6
    neutral = [t.split() for t in NEUTRAL]
    types_of = defaultdict(Counter)
    for split in SPLITS:
        in_split = defaultdict(Counter)
        for post, ent, name in ambiguous_mentions(read_posts(out / f"{split}.txt")):
            in_split[name][ent.type] += 1
            types_of[name][ent.type] += 1
            # The image of a post with an ambiguous mention always shows its type ...
            assert scenes[post.image_id]["scene"] == ent.type
            # ... and the words around the name are one of the templates every type uses.
            masked = list(post.tokens[: ent.start]) + ["{E}"] + list(post.tokens[ent.end :])
            assert any(_contains(masked, t) for t in neutral), post.tokens
        # Balanced: within a split, a name takes each of its types equally often (up to one).
        for name, counts in in_split.items():
            spread = [counts[t] for t in AMBIGUOUS[name]]
            assert max(spread) - min(spread) <= 1, (split, name, counts)
    assert set(types_of) == set(AMBIGUOUS)
    assert all(set(types_of[name]) == set(AMBIGUOUS[name]) for name in AMBIGUOUS)


def test_unrelated_images_never_go_with_ambiguous_mentions_and_types_are_balanced(full_demo):
    cfg, summary = full_demo
    out = Path(cfg.out_dir)
    scenes = read_scenes(out)
    posts = [p for s in SPLITS for p in read_posts(out / f"{s}.txt")]
    with_ambiguous = {p.image_id for p, _, _ in ambiguous_mentions(posts)}
    unrelated = {i for i, row in scenes.items() if row["scene"] == UNRELATED}
    assert unrelated and not unrelated & with_ambiguous
    assert abs(len(unrelated) / len(posts) - cfg.unrelated_image_rate) < 0.02
    assert abs(sum(r["written"] == "0" for r in scenes.values()) / len(posts) - cfg.missing_image_rate) < 0.01
    counts = Counter(e.type for p in posts for e in entities(p.tags))
    assert min(counts[t] for t in ENTITY_TYPES) > 0.15 * sum(counts.values())


def test_scenes_differ_in_plain_colour_layout(full_demo):
    """The image types are told apart by plain colour layout (what even a random CNN
    keeps): nearest-centroid on the mean colour of the four quadrants, fitted on train
    images, recognises the scenes of test images."""
    cfg, _ = full_demo
    out = Path(cfg.out_dir)
    features = {"train": defaultdict(list), "test": defaultdict(list)}
    for image_id, row in read_scenes(out).items():
        if row["written"] == "1" and row["split"] in features:
            pixels = np.asarray(Image.open(out / "images" / f"{image_id}.jpg"), dtype=np.float32)
            h = pixels.shape[0] // 2
            quads = [pixels[:h, :h], pixels[:h, h:], pixels[h:, :h], pixels[h:, h:]]
            features[row["split"]][row["scene"]].append(np.concatenate([q.mean(axis=(0, 1)) for q in quads]))
    centre = {s: np.mean(v, axis=0) for s, v in features["train"].items()}
    assert len(centre) == 5
    hits = total = 0
    for scene, rows in features["test"].items():
        for x in rows:
            hits += min(centre, key=lambda s: np.linalg.norm(centre[s] - x)) == scene
            total += 1
    assert hits / total >= 0.9


def test_regenerating_removes_images_of_the_earlier_run(tmp_path, small_demo):
    generate_demo(small_demo(tmp_path / "demo"))
    cfg = small_demo(tmp_path / "demo", train_posts=10, valid_posts=3, test_posts=3, first_id=900)
    generate_demo(cfg)
    scenes = read_scenes(cfg.out_dir)
    on_disk = {p.stem for p in (tmp_path / "demo" / "images").glob("*.jpg")}
    assert on_disk == {i for i, r in scenes.items() if r["written"] == "1"}
    assert all(int(i) >= 900 for i in on_disk)


def _contains(tokens: list[str], template: list[str]) -> bool:
    n = len(template)
    return any(tokens[i : i + n] == template for i in range(len(tokens) - n + 1))


def write_params(tmp_path, body: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(body, encoding="utf-8")
    return path


def test_bad_demo_key_is_a_config_error_naming_it(tmp_path):
    params = write_params(tmp_path, "demo:\n  seed: 1\n  trian_posts: 5\n")
    with pytest.raises(ConfigError, match=r"params.yaml: demo.trian_posts: unknown key"):
        load_section(params, "demo", DemoConfig)
    params = write_params(tmp_path, "demo:\n  ambiguous_rate: 0.95\n  no_entity_rate: 0.0\n")
    with pytest.raises(ConfigError, match=r"demo: unrelated_image_rate must be <="):
        load_section(params, "demo", DemoConfig)
    params = write_params(tmp_path, "demo:\n  missing_image_rate: 1.5\n")
    with pytest.raises(ConfigError, match=r"demo.missing_image_rate: value must be <= 1"):
        load_section(params, "demo", DemoConfig)


def test_cli_writes_the_demo_and_reports_bad_params_in_one_line(tmp_path):
    out = tmp_path / "demo"
    params = write_params(tmp_path, f"demo:\n  out_dir: {out}\n  train_posts: 6\n  valid_posts: 2\n  test_posts: 2\n  image_size: 32\n")
    result = CliRunner().invoke(main, ["demo", "--params", str(params)])
    assert result.exit_code == 0, result.output
    assert len(read_posts(out / "train.txt")) == 6 and (out / "config.json").is_file()

    bad = write_params(tmp_path, "demo:\n  image_size: big\n")
    result = CliRunner().invoke(main, ["demo", "--params", str(bad)])
    assert result.exit_code == 2
    assert "demo.image_size: expected an integer" in result.output and "Traceback" not in result.output


def test_jpeg_bytes_decode_to_the_rendered_scene():
    from msvse.pipeline.demo import encode_jpeg, render_image

    pixels = render_image("LOC", seed=1, image_id=5, size=64, noise=0.0)
    decoded = np.asarray(Image.open(io.BytesIO(encode_jpeg(pixels, 90))), dtype=np.float32)
    assert decoded.shape == (64, 64, 3)
    # Sky on top is blue, ground at the bottom is not.
    top, bottom = decoded[:8].mean(axis=(0, 1)), decoded[-8:].mean(axis=(0, 1))
    assert top[2] > top[0] + 40 and bottom[2] < top[2]
