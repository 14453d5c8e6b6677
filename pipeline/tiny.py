"""Tiny offline models in the formats the real checkpoints come in.

Nothing can be downloaded here, yet stages 1 and 2 must run through the very loaders
a user points at ``bert-base-uncased``, ``Salesforce/blip-image-captioning-base``, an
ImageNet ResNet and a COCO Mask R-CNN. This stage builds small stand-ins locally:

======================  ===============================================================
``tokenizer/``          WordPiece, lowercased like bert-base-uncased, trained with
                        ``tokenizers`` on the demo corpus plus the COCO category names and
                        caption words (``BertTokenizer.save_pretrained``)
``bert/``               a small random ``BertModel`` + that tokenizer
                        (``AutoModel`` / ``AutoTokenizer``)
``blip/``               a small ``BlipForConditionalGeneration`` + ``BlipProcessor``
                        (``AutoModelForImageTextToText`` / ``AutoProcessor``)
``resnet18.pth``        torchvision state dict of ``build_resnet("resnet18")``
``maskrcnn_tiny.pth``   torchvision state dict of
                        ``build_maskrcnn("maskrcnn_resnet18_fpn_tiny")``
``manifest.json``       what each file is, the resolved config, provenance
======================  ===============================================================

All weights are randomly initialised from ``tiny.seed``, except that the captioner is
then fitted for ``tiny.blip.fit_steps`` steps (0 keeps it random) on the demo *train*
images with template captions that describe what the image shows ("a person in a red
shirt", "a colorful picture"), so that captions carry visual content the way a real
captioner's do. The same params give the same weights and vocabulary, byte for byte.
"""

from __future__ import annotations

import csv
import io
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image

from msvse.config import bounds, to_dict
from msvse.errors import DataFormatError
from msvse.extract.archs import build_maskrcnn, build_resnet, num_parameters
from msvse.io import atomic_path, write_resolved_config
from msvse.twitter import read_posts

RESNET_ARCH = "resnet18"
MASKRCNN_ARCH = "maskrcnn_resnet18_fpn_tiny"
RESNET_FILE = "resnet18.pth"
MASKRCNN_FILE = "maskrcnn_tiny.pth"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# BLIP's decoder starts every caption with its own [DEC] token, as in the real checkpoint.
DECODER_BOS = "[DEC]"

# What the captioner learns to say about each demo scene (keys: the scenes of
# ``scenes.tsv``), several phrasings each. It recognises people and tells a photo from
# noise, but describes places, logos and patterns alike, as a generic captioner often
# does: the caption scale then carries part of the visual signal and the grid scale
# the rest, so each scale has something of its own to contribute.
GENERIC = ("a colorful picture", "a picture with bright colors", "a close up of a colorful image")
CAPTIONS: dict[str, tuple[str, ...]] = {
    "PER": ("a person in a red shirt", "a photo of a man standing in front of a wall", "a woman in red smiling"),
    "LOC": GENERIC,
    "ORG": GENERIC,
    "MISC": GENERIC,
    "unrelated": ("a blurry grey photo", "a dark and blurry picture", "a close up of a grey texture"),
}
# Words a real captioner uses, so captions from other sources tokenize into whole words too.
CAPTION_WORDS = (
    "a an the of in on with and at to near next front behind over under top is are "
    "photo picture image view close up group people person man woman men women child "
    "standing sitting walking holding smiling looking playing wearing shirt "
    "sky field street city road building wall sign logo poster pattern stripes background "
    "red blue green brown yellow black white grey gray purple orange pink dark bright "
    "large small blurry colorful checkered striped"
)


@dataclass(frozen=True)
class TinyBert:
    hidden_size: int = field(default=64, metadata=bounds(min=8))
    num_hidden_layers: int = field(default=2, metadata=bounds(min=1))
    num_attention_heads: int = field(default=4, metadata=bounds(min=1))
    intermediate_size: int = field(default=128, metadata=bounds(min=8))
    max_position_embeddings: int = field(default=128, metadata=bounds(min=16))

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")


@dataclass(frozen=True)
class TinyBlip:
    image_size: int = field(default=224, metadata=bounds(min=32))
    patch_size: int = field(default=32, metadata=bounds(min=4))
    vision_hidden_size: int = field(default=64, metadata=bounds(min=8))
    vision_layers: int = field(default=2, metadata=bounds(min=1))
    vision_heads: int = field(default=4, metadata=bounds(min=1))
    vision_intermediate_size: int = field(default=128, metadata=bounds(min=8))
    text_hidden_size: int = field(default=64, metadata=bounds(min=8))
    text_layers: int = field(default=2, metadata=bounds(min=1))
    text_heads: int = field(default=4, metadata=bounds(min=1))
    text_intermediate_size: int = field(default=128, metadata=bounds(min=8))
    max_position_embeddings: int = field(default=64, metadata=bounds(min=16))
    # Steps of caption fitting on the demo train images; 0 leaves the captioner random.
    fit_steps: int = field(default=120, metadata=bounds(min=0))
    fit_batch_size: int = field(default=32, metadata=bounds(min=1))
    fit_lr: float = field(default=2e-3, metadata=bounds(min=0, min_inclusive=False))

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        if self.vision_hidden_size % self.vision_heads or self.text_hidden_size % self.text_heads:
            raise ValueError("hidden sizes must be multiples of their head counts")


@dataclass(frozen=True)
class TinyConfig:
    """The ``tiny`` section of ``params.yaml``."""

    seed: int = 7
    data_dir: str = "data/demo"
    out_dir: str = "models/tiny"
    vocab_size: int = field(default=3000, metadata=bounds(min=100))
    bert: TinyBert = field(default_factory=TinyBert)
    blip: TinyBlip = field(default_factory=TinyBlip)


def coco_category_names() -> list[str]:
    """The 80 COCO class names of torchvision's detection label space (no download:
    the names ship with torchvision's weight metadata)."""
    names = torchvision.models.detection.MaskRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"]
    return [n for n in names if n not in ("__background__", "N/A")]


def corpus_lines(corpus_files: Sequence[str | Path]) -> list[str]:
    """The tokenizer's training text: one line per post, then the COCO names and
    caption words, so that visual labels and captions are in-vocabulary."""
    lines = [" ".join(p.tokens) for path in corpus_files for p in read_posts(path)]
    lines += coco_category_names()
    lines += [CAPTION_WORDS] + [c for options in CAPTIONS.values() for c in options]
    return lines


def train_tokenizer(
    lines: Sequence[str], vocab_size: int, model_max_length: int, pad_to: int | None = None, words: Sequence[str] = ()
):
    """A WordPiece ``BertTokenizer`` (uncased, ``##`` continuation) trained on ``lines``.

    The normaliser and pre-tokeniser are BERT's, so words split exactly as
    bert-base-uncased would split them; special tokens take ids 0-4. ``pad_to`` fills
    the vocabulary with ``[unusedN]`` entries up to that size, as bert-base-uncased's own
    holds them, so that a model built for it gets the real embedding matrix. ``words``
    are added as whole-word entries after the trained ones (those not there already).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertTokenizer

    raw = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    raw.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
    raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # The trainer numbers "##x" pieces in hash-map order as it meets them, and those ids
    # break ties between equally frequent merges, so the same corpus can give another
    # vocabulary on every run (huggingface/tokenizers#1794). Declaring every "##x" up
    # front, sorted, fixes their ids and makes training deterministic.
    chars = sorted({c for line in lines for word, _ in raw.pre_tokenizer.pre_tokenize_str(raw.normalizer.normalize_str(line)) for c in word})
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=[*SPECIAL_TOKENS, *(f"##{c}" for c in chars)],
        continuing_subword_prefix="##",
        show_progress=False,
    )
    raw.train_from_iterator(lines, trainer=trainer)
    vocab = raw.get_vocab()
    assert [vocab[t] for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    for word in words:
        vocab.setdefault(word, len(vocab))
    trained = len(vocab)
    for i in range((pad_to or 0) - trained):
        vocab[f"[unused{i}]"] = trained + i
    return BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=model_max_length)


def build_bert(cfg: TinyBert, tokenizer, seed: int):
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        type_vocab_size=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return BertModel(config).eval()


def build_blip(cfg: TinyBlip, tokenizer, seed: int):
    """A tiny ``BlipForConditionalGeneration`` and its ``BlipProcessor``.

    ``tokenizer`` gets BLIP's ``[DEC]`` start token; generation starts from it and
    stops at ``[SEP]``, as with the real captioning checkpoint.
    """
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    tokenizer.add_special_tokens({"bos_token": DECODER_BOS})
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden_size,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        intermediate_size=cfg.text_intermediate_size,
        projection_dim=cfg.text_hidden_size,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.sep_token_id,
        sep_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        hidden_size=cfg.vision_hidden_size,
        intermediate_size=cfg.vision_intermediate_size,
        projection_dim=cfg.vision_hidden_size,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        # The real BLIP init (1e-10) leaves a tiny random encoder nearly constant.
        initializer_range=0.02,
    )
    config = BlipConfig(
        text_config=text, vision_config=vision, projection_dim=cfg.text_hidden_size, image_text_hidden_size=cfg.text_hidden_size
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    image_processor = BlipImageProcessor(size={"height": cfg.image_size, "width": cfg.image_size})
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return model, processor


def read_scenes(data_dir: Path, split: str = "train") -> list[tuple[Path, str]]:
    """(image path, scene) of the written images of ``split``, from ``scenes.tsv``."""
    path = data_dir / "scenes.tsv"
    if not path.is_file():
        raise DataFormatError(
            str(path), None, "not found: run `msvse-pipeline demo` first, or set tiny.blip.fit_steps: 0 to keep the captioner random"
        )
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    out = []
    for number, row in enumerate(rows, start=2):
        scene = row.get("scene")
        if scene not in CAPTIONS:
            raise DataFormatError(str(path), number, f"unknown scene {scene!r} (known: {', '.join(CAPTIONS)})")
        if row["split"] == split and row["written"] == "1":
            out.append((data_dir / "images" / f"{row['image_id']}.jpg", scene))
    return out


def fit_captioner(model, processor, examples: Sequence[tuple[Path, str]], cfg: TinyBlip, seed: int) -> dict[str, float]:
    """Teacher-forced caption loss on template captions, ``cfg.fit_steps`` AdamW steps.

    Each caption starts with the decoder's start token in place of ``[CLS]`` (what
    ``generate`` feeds first) and padding is left out of the loss.
    """
    assert examples, "no training images to fit the captioner on"
    rng = np.random.default_rng(seed)
    images = [Image.open(path).convert("RGB") for path, _ in examples]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]  # (N, 3, H, W)
    captions = [CAPTIONS[scene][int(rng.integers(len(CAPTIONS[scene])))] for _, scene in examples]
    enc = processor.tokenizer(captions, padding=True, return_tensors="pt")
    input_ids = enc["input_ids"].clone()  # (N, T)
    input_ids[:, 0] = processor.tokenizer.bos_token_id
    labels = input_ids.masked_fill(enc["attention_mask"] == 0, -100)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.fit_lr, weight_decay=0.01)
    model.train()
    first = last = float("nan")
    for step in range(cfg.fit_steps):
        idx = torch.randint(len(examples), (min(cfg.fit_batch_size, len(examples)),), generator=generator)
        out = model(
            pixel_values=pixels[idx], input_ids=input_ids[idx], attention_mask=enc["attention_mask"][idx], labels=labels[idx]
        )
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        last = out.loss.item()
        if step == 0:
            first = last
    model.eval()
    return {"steps": cfg.fit_steps, "images": len(examples), "first_loss": round(first, 4), "last_loss": round(last, 4)}


def save_state_dict(module: torch.nn.Module, path: Path) -> None:
    """A torchvision-style ``.pth`` state dict, written whole or not at all."""
    # Through a buffer: saved straight to the temporary file, the archive would take
    # its random name and the same weights would give different bytes on every run.
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def save_pretrained(path: Path, *parts: Any) -> None:
    """A Hugging Face folder: each part (model, tokenizer, processor) ``save_pretrained``
    into ``path``, swapped in whole."""

    def save(folder: Path) -> None:
        for part in parts:
            part.save_pretrained(folder)

    _replace_dir(path, save)


def build_tiny_models(cfg: TinyConfig, corpus_files: Sequence[str | Path] | None = None) -> dict[str, Any]:
    """Build every tiny model under ``cfg.out_dir`` and return the manifest's ``files``.

    ``corpus_files`` (Twitter-format files) train the tokenizer; by default the demo
    splits in ``cfg.data_dir``. With ``cfg.blip.fit_steps > 0`` the captioner is fitted
    on the train images listed in ``cfg.data_dir/scenes.tsv``.
    """
    data_dir = Path(cfg.data_dir)
    out = Path(cfg.out_dir)
    if corpus_files is None:
        corpus_files = [data_dir / f"{split}.txt" for split in ("train", "valid", "test")]
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {}

    start = time.perf_counter()
    tokenizer = train_tokenizer(corpus_lines(corpus_files), cfg.vocab_size, cfg.bert.max_position_embeddings)
    _replace_dir(out / "tokenizer", tokenizer.save_pretrained)
    files["tokenizer"] = {
        "kind": "WordPiece BertTokenizer (uncased)",
        "vocab_size": len(tokenizer),
        "trained_on": [str(p) for p in corpus_files] + ["COCO category names", "caption words"],
        "load": "AutoTokenizer.from_pretrained",
    }

    bert = build_bert(cfg.bert, tokenizer, cfg.seed)
    save_pretrained(out / "bert", bert, tokenizer)
    files["bert"] = {
        "kind": "BertModel, random init",
        "config": to_dict(cfg.bert),
        "parameters": num_parameters(bert),
        "load": "AutoModel.from_pretrained / AutoTokenizer.from_pretrained",
    }

    # BLIP gets its own copy: adding [DEC] must not change BERT's vocabulary.
    blip_tokenizer = type(tokenizer).from_pretrained(out / "tokenizer", model_max_length=cfg.blip.max_position_embeddings)
    blip, processor = build_blip(cfg.blip, blip_tokenizer, cfg.seed)
    fit = None
    if cfg.blip.fit_steps > 0:
        fit = fit_captioner(blip, processor, read_scenes(data_dir), cfg.blip, cfg.seed)

    save_pretrained(out / "blip", blip, processor)
    files["blip"] = {
        "kind": "BlipForConditionalGeneration" + (", fitted on demo train captions" if fit else ", random init"),
        "config": to_dict(cfg.blip),
        "parameters": num_parameters(blip),
        "fit": fit,
        "load": "AutoProcessor.from_pretrained / AutoModelForImageTextToText.from_pretrained",
    }

    torch.manual_seed(cfg.seed)
    resnet = build_resnet(RESNET_ARCH)
    save_state_dict(resnet, out / RESNET_FILE)
    files[RESNET_FILE] = {
        "kind": "torchvision state dict, random init",
        "arch": RESNET_ARCH,
        "parameters": num_parameters(resnet),
        "load": f"build_resnet({RESNET_ARCH!r}).load_state_dict(torch.load(path, weights_only=True))",
    }

    torch.manual_seed(cfg.seed)
    maskrcnn = build_maskrcnn(MASKRCNN_ARCH)
    save_state_dict(maskrcnn, out / MASKRCNN_FILE)
    files[MASKRCNN_FILE] = {
        "kind": "torchvision state dict, random init",
        "arch": MASKRCNN_ARCH,
        "num_classes": maskrcnn.roi_heads.box_predictor.cls_score.out_features,
        "parameters": num_parameters(maskrcnn),
        "load": f"build_maskrcnn({MASKRCNN_ARCH!r}, min_size=..., max_size=...).load_state_dict(torch.load(path, weights_only=True))",
    }

    seconds = round(time.perf_counter() - start, 1)
    write_resolved_config(out / "manifest.json", "tiny_models", to_dict(cfg), files=files, seconds=seconds)
    return files


def _replace_dir(path: Path, save) -> None:
    """Save into a fresh sibling folder, then swap it in, so a folder never mixes files
    from two runs."""
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save(tmp)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
