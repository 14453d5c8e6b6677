"""Where the model follows the paper's printed words: eq 24's direction, eq 18's loss,
distinct visual labels, and one named setting per row of Tables 2-5."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from msvse.config import from_dict
from msvse.features import FeatureStore, write_shard
from msvse.train.config import PAPER_SETTINGS, Ablation, TrainConfig
from msvse.train.data import build_dataset
from msvse.train.model import VisualEntityClassifier, consistency_kl
from msvse.twitter import Post

README = Path(__file__).resolve().parents[2] / "README.md"


def _log(p: list[float]) -> torch.Tensor:
    return torch.tensor(p).log().view(1, 1, -1)  # (1, 1, 11): logits whose softmax is p


def test_consistency_kl_is_kl_of_text_only_against_multimodal():
    p_s = [0.5, 0.3] + [0.2 / 9] * 9
    p_m = [0.2, 0.6] + [0.2 / 9] * 9
    mask = torch.ones(1, 1, dtype=torch.bool)
    # KL(P^s || P^m) = 0.5 ln(0.5/0.2) + 0.3 ln(0.3/0.6); the other nine tags agree.
    by_hand = 0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(0.3 / 0.6)
    got = consistency_kl(_log(p_m), _log(p_s), mask).item()
    assert got == pytest.approx(by_hand, abs=1e-6)
    reverse = 0.2 * math.log(0.2 / 0.5) + 0.6 * math.log(0.6 / 0.3)  # KL(P^m || P^s), the first reading
    assert abs(got - reverse) > 0.01


def test_classifier_loss_is_cross_entropy_against_the_normalised_soft_label():
    clf = VisualEntityClassifier(4, 0.0)
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 3.0, 1.0], [5.0, -1.0, 0.0, 2.0]])
    target = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    z0 = math.log(math.exp(2) + 3)
    ce0 = -(0.5 * (2 - z0) + 0.5 * (0 - z0))  # p = (1/2, 0, 1/2, 0)
    z1 = math.log(2 + math.exp(3) + math.exp(1))
    ce1 = -(3 - z1)  # p = (0, 0, 1, 0)
    # The third post has no entity: no target, no loss; the mean is over the two others.
    assert clf.criterion(logits, target).item() == pytest.approx((ce0 + ce1) / 2, abs=1e-6)


def test_a_post_with_no_entity_adds_no_classifier_loss_and_no_gradient():
    clf = VisualEntityClassifier(4, 0.0)
    logits = torch.randn(3, 4, requires_grad=True)
    loss = clf.criterion(logits, torch.zeros(3, 4))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0
    # The per-type BCE setting (the first reading) does push the types down there.
    bce = VisualEntityClassifier(4, 0.0, loss="bce")
    assert bce.criterion(logits.detach(), torch.zeros(3, 4)).item() > 0


def test_classifier_loss_is_summed_over_its_inputs():
    torch.manual_seed(0)
    clf = VisualEntityClassifier(8, 0.0)
    pooled = [torch.randn(2, 8) for _ in range(3)]
    target = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    parts = [clf.criterion(clf.mlp(x), target) for x in pooled]
    assert clf(pooled, target).item() == pytest.approx(sum(p.item() for p in parts), rel=1e-6)


def test_classifier_loss_setting_is_typed(config_for):
    assert config_for().model.classifier_loss == "softmax"
    assert config_for(model={"classifier_loss": "bce"}).model.classifier_loss == "bce"
    from msvse.errors import ConfigError

    with pytest.raises(ConfigError, match="model.classifier_loss"):
        config_for(model={"classifier_loss": "hinge"})


# --------------------------------------------------------------------------- labels C


def _label_store(tmp_path: Path, labels: list[str]) -> FeatureStore:
    path = tmp_path / "objects.h5"
    write_shard(path, ["p1.jpg"], [0], labels=[labels], config={"synthetic": True})
    return FeatureStore([path])


@pytest.mark.parametrize("distinct", [True, False])
def test_duplicate_labels_encode_each_class_name_once(distinct, parts_for, tmp_path):
    parts = parts_for(model={"distinct_labels": distinct})
    raw = ["person", "person", "dog", "person", "car", "dog"]
    store = _label_store(tmp_path, raw)
    assert store.get("p1.jpg").labels == tuple(raw), "the shard keeps every detection"
    dataset = build_dataset([Post("p1", ("Paris",), ("B-LOC",))], parts.text, Ablation(prefix_scales=("labels",)), store)
    ids = dataset.items[0].visual.label_ids
    words = ["person", "dog", "car"] if distinct else raw  # best first: the first occurrence's place
    assert ids == parts.text.text_ids(" ".join(words), parts.text.label_content)
    assert parts.tokenizer.convert_ids_to_tokens(ids)[:3] == (["person", "dog", "car"] if distinct else raw[:3])


# --------------------------------------------------------------------------- Tables 2-5

ALL = ("grid", "labels", "caption")
# The spec's section 4, row by row: (prefix scales, joint input parts, classifier inputs).
EXPECTED = {
    "full": (ALL, ("caption",), ALL + ("H^v",)),
    "t2-no-self-attention": (ALL, ("caption",), ALL + ("H^v",)),
    "t2-no-similarity": (ALL, ("caption",), ALL + ("H^v",)),
    "t2-no-filtering": (ALL, ("caption",), ALL + ("H^v",)),
    "t2-plain-crf": (ALL, ("caption",), ALL + ("H^v",)),
    "t2-no-visual-classifier": (ALL, ("caption",), ()),
    "t3-joint-none": (ALL, (), ALL),
    "t3-joint-labels": (ALL, ("labels",), ALL + ("H^v",)),
    "t3-joint-labels-caption": (ALL, ("labels", "caption"), ALL + ("H^v",)),
    "t4-grid": (("grid",), ("caption",), ("grid", "H^v")),
    "t4-grid-labels": (("grid", "labels"), ("caption",), ("grid", "labels", "H^v")),
    "t4-grid-caption": (("grid", "caption"), ("caption",), ("grid", "caption", "H^v")),
    "t5-grid": (("grid",), (), ("grid",)),
    "t5-labels": (("labels",), (), ("labels",)),
    "t5-caption": (("caption",), (), ("caption",)),
    "t5-no-prefix": ((), ("caption",), ("caption", "H^v")),
}


def test_every_table_row_is_one_named_setting():
    assert set(PAPER_SETTINGS) == set(EXPECTED)
    tables = {table for table, _, _ in PAPER_SETTINGS.values()}
    assert {"Table 2", "Table 3", "Table 4", "Table 5"} <= tables


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_named_setting_routes_the_scales_the_spec_says(name, parts_for):
    prefix, joint, classifier = EXPECTED[name]
    overrides = PAPER_SETTINGS[name][2]
    parts = parts_for(ablation=dict(overrides))
    routes = parts.model.routes
    assert (routes.prefix, routes.joint, routes.classifier) == (prefix, joint, classifier)

    # What the forward pass really feeds each block.
    seen: dict[str, object] = {}
    model = parts.model
    if hasattr(model, "mapping"):
        original_mapping = model.mapping.forward

        def mapping_spy(v_m):
            seen["prefix"] = tuple(v_m)
            return original_mapping(v_m)

        model.mapping.forward = mapping_spy
    if hasattr(model, "classifier"):
        original_classifier = model.classifier.forward

        def classifier_spy(pooled, target):
            seen["classifier"] = len(pooled)
            return original_classifier(pooled, target)

        model.classifier.forward = classifier_spy
    batch = parts.collator(parts.train.items[:4])
    out = model(batch)
    assert seen.get("prefix", ()) == prefix
    assert seen.get("classifier", 0) == len(classifier)
    assert ("visual" in out.losses) == bool(classifier)
    # The joint input holds exactly the parts named, in front of the sentence.
    visual_tokens = int(batch.joint_visual.sum())
    expected_tokens = sum(
        sum(len(it.visual.label_ids) for it in batch.items) if part == "labels" else sum(len(it.visual.caption_ids) for it in batch.items)
        for part in joint
    )
    assert visual_tokens == expected_tokens
    # Only the kinds that some block reads are required from the shards.
    kinds = {"grid": "grid", "labels": "objects", "caption": "caption"}
    assert set(parts.cfg.ablation.needed_kinds) == {kinds[s] for s in set(prefix) | set(joint) | set(classifier) - {"H^v"}}


def _readme_experiments() -> dict[str, dict[str, object]]:
    """``dvc exp run -n NAME -S train.ablation.KEY=VALUE ...`` lines of the README's
    experiment table, as ablation overrides by name."""
    rows: dict[str, dict[str, object]] = {}
    for line in README.read_text(encoding="utf-8").splitlines():
        found = re.search(r"`dvc exp run -n (\S+)((?: -S '?train\.ablation\.[^ `']+'?)*)`", line)
        if not found or not found.group(1).startswith(("t2-", "t3-", "t4-", "t5-")):
            continue
        overrides: dict[str, object] = {}
        for key, value in re.findall(r"train\.ablation\.([a-z_]+)=([^ `']+)", found.group(2)):
            if value.startswith("["):
                overrides[key] = [v for v in value.strip("[]").split(",") if v]
            else:
                overrides[key] = {"true": True, "false": False}.get(value, value)
        rows[found.group(1)] = overrides
    return rows


def test_the_readme_commands_are_the_named_settings():
    rows = _readme_experiments()
    named = {k: v[2] for k, v in PAPER_SETTINGS.items() if k != "full"}
    assert rows == named
    for overrides in rows.values():  # each builds
        from_dict(TrainConfig, {"ablation": overrides}, source="README.md", prefix="train")


def test_the_readme_routing_table_is_what_the_settings_route():
    listed = {}
    for line in README.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and (cells[0] == "full" or re.fullmatch(r"`t[2-5]-[a-z-]+`", cells[0])):
            parts = [() if c == "none" else tuple(x.strip() for x in c.split(",")) for c in cells[1:]]
            listed[cells[0].strip("`")] = tuple(parts)
    assert len(listed) >= 12
    for name, routes in listed.items():
        assert routes == EXPECTED[name], name
