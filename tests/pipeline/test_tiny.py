"""The tiny models load through the same loaders as the real checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from msvse.errors import DataFormatError
from msvse.extract.archs import build_maskrcnn, build_resnet
from msvse.pipeline.cli import main
from msvse.twitter import read_posts
from msvse.pipeline.tiny import (
    MASKRCNN_ARCH,
    MASKRCNN_FILE,
    RESNET_ARCH,
    RESNET_FILE,
    TinyBlip,
    TinyConfig,
    build_tiny_models,
    corpus_lines,
    train_tokenizer,
)


def demo_images(cfg: TinyConfig, count: int) -> list[Image.Image]:
    paths = sorted((Path(cfg.data_dir) / "images").glob("*.jpg"))[:count]
    return [Image.open(p) for p in paths]


def test_bert_and_tokenizer_load_through_auto_classes(tiny_models):
    from transformers import AutoModel, AutoTokenizer

    cfg, files = tiny_models
    path = Path(cfg.out_dir) / "bert"
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    assert type(model).__name__ == "BertModel"
    assert model.config.hidden_size == cfg.bert.hidden_size and model.config.vocab_size == len(tokenizer)
    assert files["tokenizer"]["vocab_size"] == len(tokenizer)
    # Uncased WordPiece: the demo's names, COCO class names and caption words are whole words.
    posts = read_posts(Path(cfg.data_dir) / "train.txt")
    name = next(tok for post in posts for tok, tag in zip(post.tokens, post.tags) if tag.startswith("B-"))
    assert tokenizer.tokenize(f"{name.upper()} Teddy Bear colorful") == [name.lower(), "teddy", "bear", "colorful"]
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    batch = tokenizer(["Can't stop thinking about Jordan today #mood", "hi"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, 0] == tokenizer.cls_token_id
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape == (2, batch["input_ids"].shape[1], cfg.bert.hidden_size)
    assert tokenizer.model_max_length == cfg.bert.max_position_embeddings


def test_blip_captioner_loads_and_generates_captions(tiny_models):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cfg, files = tiny_models
    path = Path(cfg.out_dir) / "blip"
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path)
    assert type(model).__name__ == "BlipForConditionalGeneration"
    assert files["blip"]["fit"]["steps"] == cfg.blip.fit_steps
    inputs = processor(images=demo_images(cfg, 3), return_tensors="pt")
    assert inputs["pixel_values"].shape == (3, 3, cfg.blip.image_size, cfg.blip.image_size)
    ids = model.generate(**inputs, max_new_tokens=8)
    assert ids.shape[0] == 3 and 2 <= ids.shape[1] <= 9
    assert (ids[:, 0] == processor.tokenizer.bos_token_id).all()
    captions = processor.batch_decode(ids, skip_special_tokens=True)
    assert all(isinstance(c, str) for c in captions) and any(c.strip() for c in captions)


def test_visual_state_dicts_load_into_the_torchvision_builders(tiny_models):
    cfg, files = tiny_models
    out = Path(cfg.out_dir)
    resnet = build_resnet(RESNET_ARCH)
    resnet.load_state_dict(torch.load(out / RESNET_FILE, weights_only=True))
    with torch.no_grad():
        assert resnet.eval()(torch.rand(1, 3, 64, 64)).shape == (1, 1000)

    maskrcnn = build_maskrcnn(MASKRCNN_ARCH, min_size=64, max_size=64)
    maskrcnn.load_state_dict(torch.load(out / MASKRCNN_FILE, weights_only=True))
    with torch.no_grad():
        (result,) = maskrcnn.eval()([torch.rand(3, 64, 64)])
    assert set(result) >= {"boxes", "labels", "scores", "masks"}
    assert result["boxes"].shape[1:] == (4,) and result["masks"].shape[1:] == (1, 64, 64)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "tiny_models" and manifest["config"]["seed"] == cfg.seed
    assert manifest["files"][RESNET_FILE]["arch"] == RESNET_ARCH and manifest["msvse_version"]
    assert set(manifest["files"]) == {"tokenizer", "bert", "blip", RESNET_FILE, MASKRCNN_FILE}


def test_tokenizer_training_is_deterministic(tiny_models):
    cfg, _ = tiny_models
    lines = corpus_lines([Path(cfg.data_dir) / f"{s}.txt" for s in ("train", "valid", "test")])
    first, second = (train_tokenizer(lines, 600, 64).get_vocab() for _ in range(2))
    assert first == second


def test_caption_fitting_without_scenes_names_the_missing_file(tmp_path, small_demo):
    from msvse.pipeline.demo import generate_demo

    demo = small_demo(tmp_path / "demo", train_posts=4, valid_posts=1, test_posts=1, image_size=32)
    generate_demo(demo)
    (tmp_path / "demo" / "scenes.tsv").unlink()
    cfg = TinyConfig(data_dir=demo.out_dir, out_dir=str(tmp_path / "models"), blip=TinyBlip(fit_steps=1))
    with pytest.raises(DataFormatError, match=r"scenes.tsv: not found"):
        build_tiny_models(cfg)


def test_cli_reports_bad_tiny_params_in_one_line(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("tiny:\n  bert:\n    hidden_size: 66\n    num_attention_heads: 4\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["tiny-models", "--params", str(params)])
    assert result.exit_code == 2
    assert "tiny.bert: hidden_size must be a multiple of num_attention_heads" in result.output
    params.write_text("tiny:\n  blip:\n    fit_step: 3\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["tiny-models", "--params", str(params)])
    assert result.exit_code == 2 and "tiny.blip.fit_step: unknown key" in result.output
    assert "Traceback" not in result.output


def test_a_vocabulary_filled_to_a_real_models_size_tokenizes_as_before():
    lines = ["Kobe Bryant at the Staples Center", "a man in a red shirt", "Jordan is trending again"]
    plain = train_tokenizer(lines, 200, 32)
    filled = train_tokenizer(lines, 200, 32, pad_to=1000)
    assert len(filled) == 1000 and filled.convert_ids_to_tokens([len(plain), 999]) == ["[unused0]", f"[unused{999 - len(plain)}]"]
    text = "Kobe is trending at the Center"
    assert filled(text)["input_ids"] == plain(text)["input_ids"]


def test_added_words_are_whole_entries_before_the_filling():
    lines = ["Kobe Bryant at the Staples Center", "a man in a red shirt", "Jordan is trending again"]
    plain = train_tokenizer(lines, 200, 32)
    filled = train_tokenizer(lines, 200, 32, pad_to=1000, words=["telecommunications", "kobe"])
    assert len(filled) == 1000
    assert filled.convert_ids_to_tokens([len(plain), len(plain) + 1]) == ["telecommunications", "[unused0]"]  # kobe was there
    assert filled.tokenize("telecommunications in kobe") == ["telecommunications", "in", "kobe"]
