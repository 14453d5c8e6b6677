"""msvse-predict: a data file plus shards, and a single post extracted on the fly."""

from __future__ import annotations

import json

import numpy as np
import torch
from click.testing import CliRunner
from PIL import Image

from msvse.config import from_dict, to_dict
from msvse.extract.archs import build_resnet
from msvse.extract.config import ExtractConfig
from msvse.features import write_shard
from msvse.train.cli import predict_main
from msvse.train.config import TrainConfig
from msvse.train.predict import predict_post
from msvse.train.trainer import train
from msvse.twitter import TAGS, Post, format_posts, read_posts


def test_predict_file_writes_the_twitter_format(trained, corpus, tmp_path):
    # Unlabelled input (tokens only), plus a post whose image no shard holds.
    posts = read_posts(corpus.test)[:4] + [Post("unseen", ("Obama", "in", "Paris"), ("O", "O", "O"))]
    data = tmp_path / "new.txt"
    data.write_text("".join(f"IMGID:{p.image_id}\n" + "".join(f"{t}\n" for t in p.tokens) + "\n" for p in posts))
    out = tmp_path / "pred.txt"
    args = ["--model", str(trained.out / "model"), "--data", str(data), "--out", str(out)]
    args += [x for f in corpus.features for x in ("--features", str(f))]
    result = CliRunner().invoke(predict_main, args)
    assert result.exit_code == 0, result.output
    assert "no image for 1" in result.output and "not in features 1" in result.output
    predicted = read_posts(out)
    assert [p.tokens for p in predicted] == [p.tokens for p in posts]
    assert all(t in TAGS for p in predicted for t in p.tags)


def test_predict_file_matches_the_run_predictions(trained, corpus, tmp_path):
    out = tmp_path / "pred.txt"
    args = ["--model", str(trained.out / "model"), "--data", str(corpus.test), "--out", str(out)]
    args += [x for f in corpus.features for x in ("--features", str(f))]
    assert CliRunner().invoke(predict_main, args).exit_code == 0
    assert out.read_text() == (trained.out / "predictions" / "test.txt").read_text()


def test_predict_refuses_missing_features_and_bad_input(trained, corpus, tmp_path):
    model = str(trained.out / "model")
    no_features = CliRunner().invoke(predict_main, ["--model", model, "--data", str(corpus.test), "--out", str(tmp_path / "p.txt")])
    assert no_features.exit_code == 2 and "--features" in no_features.output
    bad = tmp_path / "bad.txt"
    bad.write_text("IMGID:1\nParis\tB-CITY\n")
    args = ["--model", model, "--data", str(bad), "--out", str(tmp_path / "p.txt"), "--features", str(corpus.features[0])]
    result = CliRunner().invoke(predict_main, args)
    assert result.exit_code == 2 and "bad.txt:2: unknown tag 'B-CITY'" in result.output
    missing = CliRunner().invoke(predict_main, ["--model", str(tmp_path / "nope"), "--image", "x.jpg", "--text", "hi"])
    assert missing.exit_code == 2 and "checkpoint directory not found" in missing.output


def test_single_post_extracts_on_the_fly_like_the_shards(tmp_path, bert_dir):
    """A tiny ResNet-18 (random weights, saved as a state dict) is the extraction model:
    shards come from it, training reads them, and --image runs it again on the fly."""
    from msvse.extract.run import extract_in_memory

    torch.manual_seed(0)
    weights = tmp_path / "resnet18.pth"
    torch.save(build_resnet("resnet18").state_dict(), weights)
    extract = from_dict(
        ExtractConfig,
        {"grid": {"arch": "resnet18", "weights": str(weights), "image_size": 64}, "device": "cpu", "num_workers": 0},
    )
    rng = np.random.default_rng(0)
    images = []
    for i in range(6):
        path = tmp_path / "images" / f"im{i}.jpg"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 50, 3), dtype=np.uint8)).save(path)
        images.append(path)
    feats = extract_in_memory(images, extract, ["grid"], "cpu")
    shard = tmp_path / "grid.h5"
    write_shard(shard, [p.name for p in images], [f.status for f in feats], grid=np.stack([f.grid for f in feats]), config=to_dict(extract))
    posts = [Post(f"im{i}", ("Obama", "visits", "Paris", "today"), ("B-PER", "O", "B-LOC", "O")) for i in range(6)]
    data = tmp_path / "posts.txt"
    data.write_text(format_posts(posts))
    cfg = from_dict(
        TrainConfig,
        {
            "data": {"train": str(data), "valid": str(data), "test": str(data), "features": [str(shard)]},
            "model": {"encoder": str(bert_dir), "max_length": 40},
            "ablation": {"prefix_scales": ["grid"], "joint_input": "none"},
            "optim": {"epochs": 1, "batch_size": 3, "device": "cpu"},
            "output": str(tmp_path / "run"),
        },
    )
    train(cfg)
    result = predict_post(tmp_path / "run" / "model", images[2], "Obama visits Paris today", device="cpu")
    assert result["image_status"] == "ok" and result["tokens"] == ["Obama", "visits", "Paris", "today"]
    batch_rows = read_posts(tmp_path / "run" / "predictions" / "test.txt")
    assert result["tags"] == list(batch_rows[2].tags)
    assert all(e["text"] == " ".join(result["tokens"][e["start"] : e["end"]]) for e in result["entities"])
    cli = CliRunner().invoke(
        predict_main, ["--model", str(tmp_path / "run" / "model"), "--image", str(images[2]), "--text", "Obama visits Paris today"]
    )
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.output[cli.output.index("{") :])["tags"] == result["tags"]
    # An image that cannot be read still gets a prediction, from a no-image input.
    broken = tmp_path / "images" / "broken.jpg"
    broken.write_bytes(b"not an image")
    fallback = predict_post(tmp_path / "run" / "model", broken, "Obama visits Paris", device="cpu")
    assert fallback["image_status"] == "unreadable" and len(fallback["tags"]) == 3
