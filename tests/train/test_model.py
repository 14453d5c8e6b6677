"""The network: label matrices, prefixes through the encoder's cache, positions, KL, sizes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, BertConfig, BertModel

from msvse.train.config import Ablation
from msvse.train.data import TAG_LABELS
from msvse.errors import ConfigError
from msvse.train.model import (
    DynamicMapping,
    MsvseModel,
    SalientFilter,
    cache_argument,
    check_prefix,
    consistency_kl,
    task_matrix,
)


def tags_of(p: int, label: str) -> set[str]:
    from msvse.train.model import SUBTASK_LABELS

    row = task_matrix(p)[SUBTASK_LABELS[p].index(label)]
    return {TAG_LABELS[j] for j in range(len(TAG_LABELS)) if row[j] == 1}


def test_task_matrices_map_each_subtask_label_to_exactly_its_tags():
    bio = {f"{b}-{t}" for t in ("PER", "LOC", "ORG", "MISC") for b in "BI"}
    assert tags_of(2, "entity") == bio
    assert tags_of(2, "not-entity") == {"O", "[CLS]", "[SEP]"}
    assert tags_of(5, "B") == {"B-PER", "B-LOC", "B-ORG", "B-MISC"}
    assert tags_of(5, "I") == {"I-PER", "I-LOC", "I-ORG", "I-MISC"}
    for label in ("O", "[CLS]", "[SEP]"):
        assert tags_of(5, label) == {label}
        assert tags_of(7, label) == {label}
    for etype in ("PER", "LOC", "ORG", "MISC"):
        assert tags_of(7, etype) == {f"B-{etype}", f"I-{etype}"}
    assert torch.equal(task_matrix(11), torch.eye(11))
    for p in (2, 5, 7, 11):
        t = task_matrix(p)
        assert t.shape == (p, 11)
        assert torch.equal(t.sum(0), torch.ones(11)), f"T_{p}: every tag belongs to exactly one label"


def test_consistency_kl_is_zero_for_equal_branches_and_positive_otherwise():
    y = torch.randn(2, 5, 11)
    mask = torch.tensor([[False, True, True, True, False], [False, True, False, False, False]])
    assert consistency_kl(y, y.clone(), mask).item() == pytest.approx(0.0, abs=1e-7)
    other = y.clone()
    other[0, 2] += torch.randn(11) * 3
    assert consistency_kl(y, other, mask).item() > 0
    # A difference at a masked position ([CLS], [SEP], padding) does not count.
    masked = y.clone()
    masked[1, 3] += 10
    assert consistency_kl(y, masked, mask).item() == pytest.approx(0.0, abs=1e-7)


def _tiny(family: str, path) -> torch.nn.Module:
    return AutoModel.from_pretrained(path)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_prefixes_change_encoder_output_and_receive_gradients(family, bert_dir, roberta_dir):
    encoder = _tiny(family, bert_dir if family == "bert" else roberta_dir).eval()
    model = MsvseModel(encoder, Ablation(), grid_shape=(4, 6), prefix_length=3, label_tokens=8, caption_tokens=8, dropout=0.0)
    cfg = encoder.config
    h, du, layers = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads, cfg.num_hidden_layers
    ids = torch.randint(5, cfg.vocab_size, (2, 7))
    ids[:, 0] = 0 if family == "roberta" else 2
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    plain = model.encode(ids, mask)
    prefix = [(torch.randn(2, h, 3, du, requires_grad=True), torch.randn(2, h, 3, du, requires_grad=True)) for _ in range(layers)]
    with_prefix = model.encode(ids, mask, prefix=prefix)
    assert with_prefix.shape == plain.shape
    assert (with_prefix[0] - plain[0]).abs().max() > 1e-3
    # A random readout: a plain sum of LayerNorm outputs is constant and has no gradient.
    (with_prefix[mask] * torch.randn(with_prefix[mask].shape)).sum().backward()
    for keys, values in prefix:
        assert keys.grad is not None and keys.grad.abs().sum() > 0
        assert values.grad is not None and values.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_positions_follow_the_family_and_ignore_the_prefix(family, bert_dir, roberta_dir, monkeypatch):
    encoder = _tiny(family, bert_dir if family == "bert" else roberta_dir).eval()
    model = MsvseModel(encoder, Ablation(), grid_shape=(4, 6), prefix_length=2, label_tokens=8, caption_tokens=8, dropout=0.0)
    seen = []
    original = encoder.embeddings.forward

    def spy(*args, **kwargs):
        if kwargs.get("position_ids") is not None:
            seen.append(kwargs["position_ids"].clone())
        return original(*args, **kwargs)

    monkeypatch.setattr(encoder.embeddings, "forward", spy)
    ids = torch.full((1, 5), 7)
    mask = torch.ones(1, 5, dtype=torch.bool)
    cfg = encoder.config
    h, du = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    prefix = [(torch.zeros(1, h, 2, du), torch.zeros(1, h, 2, du)) for _ in range(cfg.num_hidden_layers)]
    out = model.encode(ids, mask, prefix=prefix)
    start = 0 if family == "bert" else cfg.pad_token_id + 1
    assert seen[-1].tolist() == [list(range(start, start + 5))]
    # Without a prefix our explicit positions give what the model computes on its own.
    reference = encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    assert torch.allclose(model.encode(ids, mask), reference, atol=1e-5)
    assert out.shape == reference.shape


class PrefixBlindBert(BertModel):
    """A BERT whose forward takes the cache keyword and drops it: no prefix reaches it."""

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, cache=None, use_cache=None):
        if attention_mask is not None:
            attention_mask = attention_mask[:, -input_ids.shape[1] :]  # the prefix's mask ones, dropped too
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, position_ids=position_ids
        )


class CachelessBert(BertModel):
    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, use_cache=None):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_the_cache_keyword_follows_the_installed_transformers(family, bert_dir, roberta_dir):
    import inspect

    encoder = _tiny(family, bert_dir if family == "bert" else roberta_dir).train()
    params = inspect.signature(encoder.forward).parameters
    expected = "cache" if "cache" in params else "past_key_values"
    assert expected in params
    assert cache_argument(encoder) == expected
    assert check_prefix(encoder) == expected
    assert encoder.training, "the check leaves the encoder's mode as it found it"


def test_an_encoder_that_ignores_the_prefix_is_refused_at_load(bert_dir, monkeypatch):
    import transformers

    from msvse.train.trainer import load_encoder

    blind = PrefixBlindBert(BertConfig.from_pretrained(bert_dir))
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", lambda *a, **k: blind)
    with pytest.raises(ConfigError) as err:
        load_encoder(str(bert_dir))
    message = str(err.value)
    assert message.startswith("model.encoder: PrefixBlindBert (transformers ")
    assert transformers.__version__ in message
    assert "ignores prefixes" in message
    # A text-only model needs no prefix, so the same encoder loads for it.
    assert load_encoder(str(bert_dir), prefix=False)[1] is blind


def test_an_encoder_without_a_cache_argument_is_refused(bert_dir):
    encoder = CachelessBert(BertConfig.from_pretrained(bert_dir))
    assert cache_argument(encoder) is None
    with pytest.raises(ValueError, match=r"CachelessBert \(transformers .*\) takes no key/value cache"):
        check_prefix(encoder)
    with pytest.raises(ValueError, match="takes no key/value cache"):
        MsvseModel(encoder, Ablation(), grid_shape=(4, 6), prefix_length=2, label_tokens=8, caption_tokens=8, dropout=0.0)
    # Text only: nothing to pass a prefix through, so it builds.
    MsvseModel(encoder, Ablation(text_only=True), grid_shape=None, prefix_length=2, label_tokens=8, caption_tokens=8, dropout=0.0)


def test_sizes_come_from_the_encoder_config():
    config = BertConfig(vocab_size=50, hidden_size=48, num_attention_heads=6, num_hidden_layers=3, intermediate_size=64)
    model = MsvseModel(BertModel(config), Ablation(), grid_shape=(5, 7), prefix_length=4, label_tokens=6, caption_tokens=9, dropout=0.0)
    v_m = {s: torch.randn(2, 4, 48) for s in ("grid", "labels", "caption")}
    prefixes = model.mapping(v_m)
    assert len(prefixes) == 3
    for keys, values in prefixes:
        assert keys.shape == values.shape == (2, 6, 4, 8)
    assert model.grid_proj.in_features == 7 and model.grid_proj.out_features == 48
    assert model.filter.compress["grid"].in_features == 5
    assert model.filter.compress["caption"].in_features == 9


def test_gates_are_convex_mixes_of_the_scales_per_layer_and_head():
    mapping = DynamicMapping(d=16, heads=4, layers=2, scales=("grid", "caption"))
    mapping.to_prefix["caption"].load_state_dict(mapping.to_prefix["grid"].state_dict())
    v = torch.randn(3, 2, 16)
    e_p = mapping.to_prefix["grid"](v).view(3, 2, 2, 4, 4)  # (B, z, 2, h, du)
    for keys, values in mapping({"grid": v, "caption": v}):
        # Weights that sum to one over scales leave identical scales unchanged (eq 13).
        assert keys.shape == values.shape == (3, 4, 2, 4)
        assert torch.allclose(keys, e_p[:, :, 0].permute(0, 2, 1, 3), atol=1e-5)
        assert torch.allclose(values, e_p[:, :, 1].permute(0, 2, 1, 3), atol=1e-5)


def test_filter_zeroes_padding_and_compresses_to_z():
    filt = SalientFilter(8, 3, {"caption": 5}, self_attention=True, similarity=True)
    v = torch.randn(2, 5, 8)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    text = torch.randn(2, 4, 8)
    text_mask = torch.ones(2, 4, dtype=torch.bool)
    out = filt("caption", v, mask, text, text_mask)
    assert out.shape == (2, 3, 8)
    # Changing a padded feature changes nothing.
    v2 = v.clone()
    v2[0, 4] += 100
    assert torch.allclose(filt("caption", v2, mask, text, text_mask)[0], out[0], atol=1e-5)
