"""The ``train`` section of ``params.yaml``: one frozen, typed config for stage 2.

Defaults are the paper's settings (section 3 of the method spec): bert-base-uncased,
30 epochs, batch 32, AdamW at 3e-5, z = 4 prefix features, every module on. Each of the
paper's ablations (Tables 2 to 5) is one key of :class:`Ablation`; the text-only
BERT-CRF baseline is ``ablation.text_only: true`` with ``ablation.multitask_decoder: false``.

Example (``params.yaml``)::

    train:
      data: {train: data/demo/train.txt, valid: ..., test: ..., features: [features/grid.h5]}
      model: {encoder: models/tiny/bert, prefix_length: 4}
      ablation: {prefix_scales: [grid, caption]}
      optim: {epochs: 3, batch_size: 8}
      output: runs/demo

A combination that cannot be built (no visual input left, a scale named twice) is a
:class:`~msvse.errors.ConfigError` naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from msvse.config import bounds, load_section

Scale = Literal["grid", "labels", "caption"]
JointInput = Literal["none", "labels", "caption", "labels+caption"]

#: Which feature kind of the HDF5 shards (schema v1) feeds each visual scale.
SCALE_KIND: dict[str, str] = {"grid": "grid", "labels": "objects", "caption": "caption"}


@dataclass(frozen=True)
class Data:
    """Twitter-format files and the stage-1 feature shards joined to them by image id."""

    train: str = "data/twitter2015/train.txt"
    valid: str = "data/twitter2015/valid.txt"
    test: str = "data/twitter2015/test.txt"
    # Shards are joined by image id; each kind may come from a different file.
    features: tuple[str, ...] = ("features/grid.h5", "features/objects.h5", "features/caption.h5")
    # Tokenized posts, labels and captions, kept between runs (msvse.train.tokens):
    # entries are keyed by the inputs' content and the tokenizer, so none is ever
    # stale; null keeps them in memory only.
    token_cache: str | None = ".msvse-cache/tokens"


@dataclass(frozen=True)
class Model:
    """Encoder and the sizes the paper leaves open. Every other size comes from the
    encoder's own config (hidden size, heads, layers) or from the shards (grid G x C)."""

    # A Hugging Face name or a local save_pretrained directory of any BERT-family encoder.
    encoder: str = "bert-base-uncased"
    # z: visual features each scale is compressed to (eq 10) and prefix length (eq 11).
    prefix_length: int = field(default=4, metadata=bounds(min=1))
    # k_o and k_d: token slots for the label words and the caption, special tokens
    # included; eq 10's w_i maps a fixed k_i features to z, so these are fixed sizes.
    label_tokens: int = field(default=16, metadata=bounds(min=3))
    caption_tokens: int = field(default=32, metadata=bounds(min=3))
    # Longest encoder input; null: the encoder's own limit. Longer posts are windowed.
    max_length: int | None = field(default=None, metadata=bounds(min=8))
    dropout: float = field(default=0.1, metadata=bounds(min=0, max=1, max_inclusive=False))
    # The visual labels C: each class name once, at its best detection (Fig. 1's
    # "chair, hair, handrail, steeple"); false: every detection's name, duplicates and
    # all. The shards keep every detection either way.
    distinct_labels: bool = True
    # Loss of the visual entity classifier (eq 18): "softmax", the paper's CE against
    # the soft label L^E normalised to sum to 1 (a post with no entity adds nothing);
    # "bce", per-type binary cross-entropy against the multi-hot L^E.
    classifier_loss: Literal["softmax", "bce"] = "softmax"


@dataclass(frozen=True)
class Routes:
    """Where each visual input goes under an :class:`Ablation`: the scales filtered by
    eqs 5-10, those mixed into the prefix (eqs 11-14), the parts put before the sentence
    in the joint input (eqs 15-16), and the classifier's inputs (eqs 17-18: scales, and
    ``"H^v"`` for the joint encoder's visual positions)."""

    filtered: tuple[str, ...] = ()
    prefix: tuple[str, ...] = ()
    joint: tuple[str, ...] = ()
    classifier: tuple[str, ...] = ()


@dataclass(frozen=True)
class Ablation:
    """The paper's ablations, each one setting away (all on = the full MSVSE)."""

    self_attention: bool = True  # eq 8 (Table 2)
    similarity: bool = True  # eq 9 (Table 2)
    multitask_decoder: bool = True  # eqs 19-20; off: a plain CRF on the 11 tags (Table 2)
    visual_classifier: bool = True  # eqs 17-18 (Table 2)
    consistency: bool = True  # eq 24, the KL term
    joint_input: JointInput = "caption"  # what precedes the sentence in the joint encoder (Table 3)
    prefix: bool = True  # off: no visual prefix at all (Table 5)
    # The visual scales the model uses: filtering, prefix and classifier (Tables 4, 5).
    prefix_scales: tuple[Scale, ...] = field(default=("grid", "labels", "caption"), metadata=bounds(min=1))
    # Text-only baseline: BERT on the sentence and the label decoder, nothing visual.
    text_only: bool = False

    def __post_init__(self) -> None:
        if len(set(self.prefix_scales)) != len(self.prefix_scales):
            raise ValueError(f"prefix_scales: a scale is named twice in {list(self.prefix_scales)}")
        if not self.text_only and not self.prefix and self.joint_input == "none":
            raise ValueError(
                "prefix is false and joint_input is 'none': no visual input reaches the tagger; "
                "set text_only: true for a text-only model"
            )

    @property
    def scales(self) -> tuple[str, ...]:
        """Scales in the canonical order grid, labels, caption."""
        return tuple(s for s in ("grid", "labels", "caption") if s in self.prefix_scales)

    @property
    def routes(self) -> Routes:
        """Which scales reach the prefix, the joint input and the classifier; the model
        is built from this, and each of the paper's settings is tested against it."""
        if self.text_only:
            return Routes()
        scales = self.scales
        joint = () if self.joint_input == "none" else tuple(self.joint_input.split("+"))
        classifier = (scales + (("H^v",) if joint else ())) if self.visual_classifier else ()
        return Routes(
            filtered=scales if (self.prefix or self.visual_classifier) else (),
            prefix=scales if self.prefix else (),
            joint=joint,
            classifier=classifier,
        )

    @property
    def uses_prefix(self) -> bool:
        return not self.text_only and self.prefix

    @property
    def uses_labels(self) -> bool:
        return not self.text_only and ("labels" in self.prefix_scales or "labels" in self.joint_input)

    @property
    def uses_caption(self) -> bool:
        return not self.text_only and ("caption" in self.prefix_scales or "caption" in self.joint_input)

    @property
    def needed_kinds(self) -> dict[str, str]:
        """Feature kind -> the config key that needs it."""
        if self.text_only:
            return {}
        need = {SCALE_KIND[s]: "ablation.prefix_scales" for s in self.routes.filtered}
        for part in ("labels", "caption"):
            if part in self.joint_input:
                need.setdefault(SCALE_KIND[part], "ablation.joint_input")
        return need


#: The paper's ablations (Tables 2-5), each exactly one named setting: the ``ablation``
#: keys that differ from the full model (every module on, Tables 2-5's last row), with
#: the table and the row's name. The README's experiment table gives one ``dvc exp run``
#: per entry, and a test checks both against each other and against the spec's routing.
PAPER_SETTINGS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "full": ("Tables 2-5", "full MSVSE: grid, labels and caption in the prefix, caption in the joint input", {}),
    "t2-no-self-attention": ("Table 2", "without self-attention (eq 8)", {"self_attention": False}),
    "t2-no-similarity": ("Table 2", "without similarity (eq 9)", {"similarity": False}),
    "t2-no-filtering": ("Table 2", "without both", {"self_attention": False, "similarity": False}),
    "t2-plain-crf": ("Table 2", "without the multi-task decoder (plain CRF)", {"multitask_decoder": False}),
    "t2-no-visual-classifier": ("Table 2", "without the visual entity classifier", {"visual_classifier": False}),
    "t3-joint-none": ("Table 3", "joint input: the sentence only", {"joint_input": "none"}),
    "t3-joint-labels": ("Table 3", "joint input: labels + sentence", {"joint_input": "labels"}),
    "t3-joint-labels-caption": ("Table 3", "joint input: labels + caption + sentence", {"joint_input": "labels+caption"}),
    "t4-grid": ("Table 4", "prefix from the grid only", {"prefix_scales": ["grid"]}),
    "t4-grid-labels": ("Table 4", "prefix from grid + labels", {"prefix_scales": ["grid", "labels"]}),
    "t4-grid-caption": ("Table 4", "prefix from grid + caption", {"prefix_scales": ["grid", "caption"]}),
    "t5-grid": ("Table 5", "only the grid", {"prefix_scales": ["grid"], "joint_input": "none"}),
    "t5-labels": ("Table 5", "only the labels", {"prefix_scales": ["labels"], "joint_input": "none"}),
    "t5-caption": ("Table 5", "only the caption", {"prefix_scales": ["caption"], "joint_input": "none"}),
    "t5-no-prefix": (
        "Table 5",
        "without the visual prefix: the caption in the joint input only",
        {"prefix": False, "prefix_scales": ["caption"], "joint_input": "caption"},
    ),
}


@dataclass(frozen=True)
class Optim:
    """AdamW with linear warm-up and decay; the encoder, the new modules and the CRF
    each have their own learning rate."""

    epochs: int = field(default=30, metadata=bounds(min=1))
    batch_size: int = field(default=32, metadata=bounds(min=1))
    eval_batch_size: int = field(default=64, metadata=bounds(min=1))
    lr_encoder: float = field(default=3e-5, metadata=bounds(min=0, min_inclusive=False))
    # The paper gives one rate (3e-5); the new modules follow it. The CRF's transition
    # scores start near zero and barely move at that rate, hence a rate of their own.
    # HVPNeT gives 5e-2 to its CRF and to the emission layer before it; here only the
    # CRF's transition and start/end scores get lr_crf (the decoder's heads of eq 19
    # take lr_heads).
    lr_heads: float = field(default=3e-5, metadata=bounds(min=0, min_inclusive=False))
    lr_crf: float = field(default=5e-2, metadata=bounds(min=0, min_inclusive=False))
    warmup_ratio: float = field(default=0.1, metadata=bounds(min=0, max=1))
    weight_decay: float = field(default=0.01, metadata=bounds(min=0))
    # Max gradient norm; null: no clipping.
    grad_clip: float | None = field(default=1.0, metadata=bounds(min=0, min_inclusive=False))
    seed: int = 13
    # bf16 autocast, used on CUDA only (CPU runs in float32).
    bf16: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # DataLoader worker processes; batches are cheap to build, so 0 is usually right.
    workers: int = field(default=0, metadata=bounds(min=0))
    # torch intra-op CPU threads; null: torch's default. Small CPU models run faster on 1.
    threads: int | None = field(default=None, metadata=bounds(min=1))


@dataclass(frozen=True)
class TrainConfig:
    """The whole ``train`` section."""

    data: Data = field(default_factory=Data)
    model: Model = field(default_factory=Model)
    ablation: Ablation = field(default_factory=Ablation)
    optim: Optim = field(default_factory=Optim)
    # Run folder: model/, metrics.json, plots/epochs.csv, predictions/, train_config.json.
    output: str = "runs/demo"

    @property
    def out(self) -> Path:
        return Path(self.output)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The ``train`` section of a params file, with dotted ``overrides`` applied."""
    return load_section(path, "train", TrainConfig, overrides=overrides)
