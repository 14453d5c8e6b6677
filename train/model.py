"""The MSVSE network (section 2 of the method spec), in the order of its equations.

    H^s = BERT(S)                                             eq 1   text features
    V^g' = W_g G + b_g,  V^o' = BERT(C),  V^d' = BERT(D)      eqs 5-7   representation
    V^a_i, V^s_i, V^m_i                                       eqs 8-10  filtering
    E^p_i, gate_j, E^kv_j, (E^k_j, E^v_j)                     eqs 11-14 dynamic mapping
    (H^v, H^m) = BERT([D; S], (E^k, E^v))                     eqs 15-16 joint encoding
    L_VE                                                      eqs 17-18 visual entity classifier
    Y^H = sum_p (W_p H + b_p) T_p,  CRF                       eqs 19-23 multi-task label decoder
    L_KL                                                      eq 24     consistency
    L = L^s_MTD + L^m_MTD + L_KL + L_VE                        eq 25

``BERT`` is one shared encoder: any BERT-family model loaded through ``AutoModel``
whose attention takes a key/value cache (BERT, RoBERTa, XLM-R, ...; see
:func:`cache_argument` and :func:`check_prefix`). Every size comes
from its config (``hidden_size`` d, ``num_attention_heads`` h, ``num_hidden_layers`` l)
or from the feature shards (grid G x C); z, k_o and k_d from the train config.
Where the spec marks a **Reading**, the block's docstring states it.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torchcrf import CRF
from transformers import DynamicCache

from msvse.train.config import Ablation, TrainConfig
from msvse.train.data import CLS_TAG, SEP_TAG, TAG_LABELS, Batch
from msvse.twitter import ENTITY_TYPES

# --------------------------------------------------------------------------- label spaces

#: Sub-task label spaces of the multi-task decoder (eq 19). p = 11 is the NER tag space.
SUBTASK_LABELS: dict[int, tuple[str, ...]] = {
    2: ("not-entity", "entity"),
    5: ("B", "I", "O", "[CLS]", "[SEP]"),
    7: ("O",) + ENTITY_TYPES + ("[CLS]", "[SEP]"),
    11: TAG_LABELS,
}


def subtask_label(p: int, tag: str) -> str:
    """The label of sub-task ``p`` that NER tag ``tag`` stands for. [CLS] and [SEP] are
    no entity for p = 2 (so that every tag has exactly one label in every sub-task)."""
    prefix, _, etype = tag.partition("-")
    is_entity = prefix in ("B", "I") and bool(etype)
    if p == 2:
        return "entity" if is_entity else "not-entity"
    if p == 5:
        return prefix if is_entity else tag
    if p == 7:
        return etype if is_entity else tag
    if p == 11:
        return tag
    raise ValueError(f"no sub-task with {p} labels")


def task_matrix(p: int) -> torch.Tensor:
    """T_p (eq 20): the fixed p x 11 0/1 matrix with T_p[a, t] = 1 iff NER tag t is one
    of the tags sub-task label a stands for. T_11 is the identity."""
    labels = SUBTASK_LABELS[p]
    t = torch.zeros(p, len(TAG_LABELS))
    for j, tag in enumerate(TAG_LABELS):
        t[labels.index(subtask_label(p, tag)), j] = 1.0
    return t


# --------------------------------------------------------------------------- output


@dataclass
class MsvseOutput:
    """What :meth:`MsvseModel.forward` returns. Emissions are over the CRF positions
    ([CLS], the first sub-word of each word, [SEP]); ``losses`` holds each term of eq 25
    that the settings switch on."""

    emissions: torch.Tensor  # (B, T, 11): Y^m, or Y^s for a text-only model
    crf_mask: torch.Tensor  # (B, T) bool
    loss: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    text_emissions: torch.Tensor | None = None  # (B, T, 11): Y^s


# --------------------------------------------------------------------------- encoder helpers


def position_offset(encoder: nn.Module) -> int | None:
    """``padding_idx`` of the encoder's position embeddings (RoBERTa, XLM-R: positions
    start at padding_idx + 1), or None when positions start at 0 (BERT)."""
    embeddings = getattr(encoder, "embeddings", None)
    positions = getattr(embeddings, "position_embeddings", None)
    return getattr(positions, "padding_idx", None)


def encoder_limit(encoder: nn.Module) -> int:
    """The longest sequence the encoder's position embeddings cover."""
    offset = position_offset(encoder)
    return encoder.config.max_position_embeddings - (0 if offset is None else offset + 1)


def cache_argument(encoder: nn.Module) -> str | None:
    """The keyword under which ``encoder.forward`` takes a key/value cache: ``cache``
    (transformers 5.24 renamed it and warns on the old name), else ``past_key_values``
    (earlier 5.x); None when it takes neither. Read from the signature once per encoder."""
    params = inspect.signature(encoder.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None


def encoder_forward(
    encoder: nn.Module,
    cache_arg: str | None,
    ids: torch.Tensor,
    mask: torch.Tensor,
    types: torch.Tensor,
    positions: torch.Tensor,
    prefix: list[tuple[torch.Tensor, torch.Tensor]] | None,
) -> torch.Tensor:
    """Token outputs (B, L, d) of ``encoder``; with ``prefix`` (one (keys, values) pair
    per layer, each (B, h, z, d_u)) in a ``DynamicCache`` under ``cache_arg``, and the
    attention mask extended by z ones in front."""
    extra = {}
    if prefix is not None:
        assert cache_arg is not None, "a prefix needs an encoder that takes a cache"
        cache = DynamicCache()
        for layer, (keys, values) in enumerate(prefix):
            cache.update(keys, values, layer)
        extra[cache_arg] = cache
        mask = torch.cat([mask.new_ones(ids.shape[0], prefix[0][0].shape[2]), mask], 1)
    out = encoder(input_ids=ids, attention_mask=mask, token_type_ids=types, position_ids=positions, use_cache=False, **extra)
    return out.last_hidden_state


def check_prefix(encoder: nn.Module) -> str:
    """The encoder's cache keyword (:func:`cache_argument`), after checking that a prefix
    reaches its attention: a 4-token forward with a small non-zero one-feature prefix in
    every layer must differ from the same forward without it. Costs two short forwards,
    even for bert-base. Raises ValueError naming the class and the transformers version
    when the encoder takes no cache or ignores the one it is given."""
    import transformers

    name = f"{type(encoder).__name__} (transformers {transformers.__version__})"
    cache_arg = cache_argument(encoder)
    if cache_arg is None:
        raise ValueError(f"{name} takes no key/value cache (neither `cache` nor `past_key_values`), which the visual prefix needs")
    cfg = encoder.config
    heads = cfg.num_attention_heads
    head_size = cfg.hidden_size // heads
    param = next(encoder.parameters())
    ids = torch.full((1, 4), 1, dtype=torch.long, device=param.device)  # (1, 4)
    mask = torch.ones_like(ids)
    offset = position_offset(encoder)
    positions = torch.arange(4, device=ids.device)[None] + (0 if offset is None else offset + 1)
    gen = torch.Generator().manual_seed(0)
    kv = (0.5 * torch.randn(1, heads, 1, head_size, generator=gen)).to(param.device, param.dtype)  # (1, h, 1, d_u)
    prefix = [(kv, kv) for _ in range(cfg.num_hidden_layers)]
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            plain = encoder_forward(encoder, cache_arg, ids, mask, torch.zeros_like(ids), positions, None)
            with_prefix = encoder_forward(encoder, cache_arg, ids, mask, torch.zeros_like(ids), positions, prefix)
    finally:
        encoder.train(was_training)
    if torch.allclose(plain, with_prefix):
        raise ValueError(
            f"{name} ignores prefixes: its output is the same with and without keys and values in its "
            f"`{cache_arg}` argument, so the visual prefix could not reach it"
        )
    return cache_arg


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` (B, n, d) over the positions where ``mask`` (B, n) holds; zero
    where none does."""
    m = mask.to(x.dtype).unsqueeze(-1)  # (B, n, 1)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, d)


def _pad_to(x: torch.Tensor, mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (B, n, d) features and their mask to exactly k positions (eq 10 needs fixed k_i)."""
    n = x.shape[1]
    assert n <= k, (n, k)
    return F.pad(x, (0, 0, 0, k - n)), F.pad(mask, (0, k - n))


# --------------------------------------------------------------------------- eqs 8-10


class SalientFilter(nn.Module):
    """Filtering, eqs 8-10, applied to each visual scale separately.

    (8)  V^a_i = softmax((W1 V_i)(W2 V_i)^T / sqrt(d)) (W3 V_i), over the k_i features
         of scale i (padding masked).
         **Reading:** W1, W2, W3 carry no scale index in eq 8 (w_i and W^p_i do), so
         they are shared by the three scales; this also matches the paper's model size.
    (9)  V^s_i = cos(H^s, V^a_i): an n x k_i matrix of cosines.
         **Reading:** reduced over the text tokens by a max over non-pad tokens, to one
         relevance score per visual feature.
    (10) V^m_i = w_i (V^s_i (x) V^a_i) + b_i: each feature scaled by its relevance, then
         the k_i features compressed to z by w_i, a z x k_i linear map over the feature
         axis (one per scale). Padding features are zeroed before the map.

    ``self_attention=False`` (ablation) takes V^a_i = V_i; ``similarity=False`` takes
    V^s_i = 1.
    """

    def __init__(self, d: int, z: int, sizes: dict[str, int], *, self_attention: bool, similarity: bool):
        super().__init__()
        self.d = d
        self.similarity = similarity
        self.attention = nn.ModuleList([nn.Linear(d, d) for _ in range(3)]) if self_attention else None
        self.compress = nn.ModuleDict({scale: nn.Linear(k, z) for scale, k in sizes.items()})

    def forward(
        self, scale: str, v: torch.Tensor, v_mask: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        # v: (B, k, d), v_mask: (B, k), text: (B, n, d), text_mask: (B, n)
        if self.attention is not None:  # eq 8
            w1, w2, w3 = self.attention
            scores = w1(v) @ w2(v).transpose(1, 2) / math.sqrt(self.d)  # (B, k, k)
            scores = scores.masked_fill(~v_mask[:, None, :], torch.finfo(scores.dtype).min)
            v = scores.softmax(-1) @ w3(v)  # (B, k, d)
        if self.similarity:  # eq 9
            cos = F.normalize(text, dim=-1) @ F.normalize(v, dim=-1).transpose(1, 2)  # (B, n, k)
            cos = cos.masked_fill(~text_mask[:, :, None], -2.0)  # below any cosine
            relevance = cos.max(dim=1).values  # (B, k)
        else:
            relevance = torch.ones_like(v[..., 0])  # (B, k)
        relevance = relevance * v_mask.to(relevance.dtype)
        scaled = relevance.unsqueeze(-1) * v  # (B, k, d)
        return self.compress[scale](scaled.transpose(1, 2)).transpose(1, 2)  # eq 10: (B, z, d)


# --------------------------------------------------------------------------- eqs 11-14


class DynamicMapping(nn.Module):
    """Dynamic mapping network, eqs 11-14: visual features to per-layer key/value prefixes.

    (11) E^p_i = W^p_i V^m_i + b^p_i: one fully connected map per scale, each of the z
         features to 2 x h x d_u (key and value for every head).
    (12) gate_j(.) = softmax(ReLU(w'_j(.) + b'_j)), one gate per encoder layer j.
         **Reading:** gate_j takes the pooled (mean over z) E^p_i of every scale in use,
         concatenated, and gives one logit per scale and attention head; the softmax runs
         across the scales, separately for each head, so each layer and head gets its
         own mix of scales. (With bert-base this puts the full model at 118.98 M
         parameters against the paper's 119.27 M.)
    (13) E^kv_j = sum_i E^p_i * gate_j(E^p_i)
    (14) (E^k_j, E^v_j) = split(E^kv_j), each (B, h, z, d_u).
    """

    def __init__(self, d: int, heads: int, layers: int, scales: tuple[str, ...]):
        super().__init__()
        assert d % heads == 0, (d, heads)
        self.heads, self.head_size = heads, d // heads
        self.scales = scales
        self.to_prefix = nn.ModuleDict({s: nn.Linear(d, 2 * d) for s in scales})
        n = len(scales)
        self.gates = nn.ModuleList([nn.Linear(n * 2 * d, n * heads) for _ in range(layers)])

    def forward(self, v_m: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        B, z, _ = v_m[self.scales[0]].shape
        h, du = self.heads, self.head_size
        e_p = torch.stack([self.to_prefix[s](v_m[s]) for s in self.scales], 1)  # eq 11: (B, S, z, 2d)
        S = len(self.scales)
        pooled = e_p.mean(2).flatten(1)  # (B, S * 2d)
        e_p = e_p.view(B, S, z, 2, h, du)  # (B, S, z, 2, h, du)
        prefixes = []
        for gate in self.gates:
            g = F.relu(gate(pooled)).view(B, S, h).softmax(dim=1)  # eq 12: (B, S, h), sums to 1 over scales
            e_kv = (e_p * g[:, :, None, None, :, None]).sum(1)  # eq 13: (B, z, 2, h, du)
            keys = e_kv[:, :, 0].permute(0, 2, 1, 3)  # eq 14: (B, h, z, du)
            values = e_kv[:, :, 1].permute(0, 2, 1, 3)  # (B, h, z, du)
            prefixes.append((keys, values))
        return prefixes


# --------------------------------------------------------------------------- eqs 17-18


class VisualEntityClassifier(nn.Module):
    """Visual entity classifier, eqs 17-18. L^E in {0,1}^4 over [PER, LOC, ORG, MISC]
    marks the types the post's gold tags contain. One shared MLP classifies each pooled
    input (V^m of each scale in use and H^v, each a mean over its positions; H^v covers
    whatever the joint input puts before the sentence: caption, labels or both), and
    L_VE is the sum of the classification losses over those inputs.

    ``loss="softmax"`` (the default) follows eq 18 as printed: CE(p, q) =
    -sum_i p(x_i) ln q(x_i), "where p and q are probability distributions", over the
    "soft label" L^E. **Reading:** q = softmax of the MLP's 4 logits, p = L^E / sum(L^E);
    a post with no entity has no target distribution and contributes nothing; the loss
    of one input is the mean over the posts of the batch that have a target (zero when
    none has). ``loss="bce"``, our first reading, is per-type binary cross-entropy
    against the multi-hot L^E (mean over batch and types); unlike the paper's loss it
    also pushes every type down on posts with no entity.
    """

    def __init__(self, d: int, dropout: float, n_types: int = len(ENTITY_TYPES), loss: str = "softmax"):
        super().__init__()
        if loss not in ("softmax", "bce"):
            raise ValueError(f"classifier loss must be 'softmax' or 'bce', not {loss!r}")
        self.loss = loss
        self.mlp = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Dropout(dropout), nn.Linear(d, n_types))

    def forward(self, pooled: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        # pooled: each (B, d); target: (B, 4) multi-hot L^E
        return sum(self.criterion(self.mlp(x).float(), target) for x in pooled)

    def criterion(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of one input's logits (B, 4) against the multi-hot ``target`` (B, 4)."""
        target = target.to(logits.dtype)
        if self.loss == "bce":
            return F.binary_cross_entropy_with_logits(logits, target)
        mass = target.sum(-1, keepdim=True)  # (B, 1)
        has_target = mass.squeeze(-1) > 0  # (B,)
        p = target / mass.clamp(min=1.0)  # (B, 4), each row sums to 1 or is all zero
        ce = -(p * logits.log_softmax(-1)).sum(-1)  # (B,): zero where p is
        return ce.sum() / has_target.sum().clamp(min=1)


# --------------------------------------------------------------------------- eqs 19-23


class LabelDecoder(nn.Module):
    """Multi-task label decoder, eqs 19-23, shared by the multimodal (H^m, eq 22) and the
    text-only (H^s, eq 23) branch.

    (19) H_p = W_p H + b_p for p in 2 (entity or not), 5 (boundary), 7 (category), 11 (tag).
    (20) Y^H = sum_p H_p T_p with the fixed 0/1 matrices of :func:`task_matrix`.
    (21) L^H_MTD = CRF(Y^H, Y): negative log-likelihood of the gold tags under a CRF over
         the 11 tags, averaged over the batch.

    The CRF runs over [CLS], the first sub-word of each word and the closing [SEP], so
    the label space's [CLS] and [SEP] tags are the gold tags of those two positions;
    the other sub-words are left out of the CRF and the loss.

    ``multitask=False`` (ablation) keeps only p = 11: a plain CRF on the tags.
    """

    def __init__(self, d: int, multitask: bool):
        super().__init__()
        self.tasks = (2, 5, 7, 11) if multitask else (11,)
        self.heads = nn.ModuleDict({str(p): nn.Linear(d, p) for p in self.tasks})
        for p in self.tasks:
            self.register_buffer(f"T{p}", task_matrix(p), persistent=False)
        self.crf = CRF(len(TAG_LABELS), batch_first=True)

    def emissions(self, h: torch.Tensor) -> torch.Tensor:
        # h: (B, T, d) -> (B, T, 11), in float32 for the CRF
        y = sum(self.heads[str(p)](h).float() @ getattr(self, f"T{p}") for p in self.tasks)  # eqs 19-20
        return y

    def nll(self, y: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return -self.crf(y, tags, mask=mask, reduction="mean")  # eq 21

    def decode(self, y: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
        return self.crf.decode(y, mask=mask)


def consistency_kl(y_m: torch.Tensor, y_s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_KL, eq 24, pulling the text-only and multimodal tag distributions together.

    The paper prints L_KL = sum_y p(y|Y^s) ln p(y|Y^m): the text-only distribution P^s
    weights the sum. **Reading:** KL(P^s || P^m) = sum_y P^s(y) (ln P^s(y) - ln P^m(y)),
    between the per-token softmax of Y^s (eq 23) and of Y^m (eq 22); the printed form's
    missing minus sign and entropy term are taken as typesetting (with them it is this
    KL up to a constant in Y^m). Summed over the 11 tags and averaged over real tokens
    (first sub-words of words; no [CLS]/[SEP], no padding). Gradients reach both
    branches.
    """
    log_m = y_m.float().log_softmax(-1)  # (B, T, 11)
    log_s = y_s.float().log_softmax(-1)
    # kl_div(input, target) = sum target * (log target - input): KL(target || input)
    kl = F.kl_div(log_m, log_s, log_target=True, reduction="none").sum(-1)  # (B, T)
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp(min=1.0)


# --------------------------------------------------------------------------- the network


class MsvseModel(nn.Module):
    """MSVSE: a shared encoder, the visual branch of eqs 5-14, the joint encoder of
    eqs 15-16, the classifier of eqs 17-18 and the decoder of eqs 19-23; loss eq 25.

    Args:
        encoder: the ``AutoModel`` encoder (BERT family, attention taking a key/value cache).
        ablation: which blocks are on (see :class:`~msvse.train.config.Ablation`).
        grid_shape: (G, C) of the grid features; needed when the grid scale is used.
        prefix_length: z.
        label_tokens, caption_tokens: k_o and k_d, the fixed feature counts of those scales.
        dropout: on the token representations before the decoder and inside the classifier.
        classifier_loss: "softmax" (eq 18 as printed) or "bce"; see :class:`VisualEntityClassifier`.
    """

    def __init__(
        self,
        encoder: nn.Module,
        ablation: Ablation,
        *,
        grid_shape: tuple[int, int] | None,
        prefix_length: int,
        label_tokens: int,
        caption_tokens: int,
        dropout: float,
        classifier_loss: str = "softmax",
    ):
        super().__init__()
        cfg = encoder.config
        d, h, layers = cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers
        self.encoder = encoder
        self.ablation = ablation
        self.z = prefix_length
        self.d = d
        self._position_offset = position_offset(encoder)
        self._cache_arg = cache_argument(encoder)  # decided once per encoder, not per call
        if self._cache_arg is None and ablation.uses_prefix:
            raise ValueError(f"{type(encoder).__name__} takes no key/value cache, which the visual prefix needs")
        self._typed = getattr(cfg, "type_vocab_size", 1) > 1
        self.dropout = nn.Dropout(dropout)
        self.decoder = LabelDecoder(d, ablation.multitask_decoder)
        self.routes = ablation.routes
        self.scales: tuple[str, ...] = self.routes.filtered
        self.visual = bool(self.scales)
        if self.visual:
            sizes = {"grid": None, "labels": label_tokens, "caption": caption_tokens}
            if "grid" in self.scales:
                if grid_shape is None:
                    raise ValueError("the grid scale needs grid_shape (G, C)")
                sizes["grid"] = grid_shape[0]
                self.grid_proj = nn.Linear(grid_shape[1], d)  # eq 5
            self.filter = SalientFilter(
                d,
                prefix_length,
                {s: sizes[s] for s in self.scales},
                self_attention=ablation.self_attention,
                similarity=ablation.similarity,
            )
        if self.routes.prefix:
            self.mapping = DynamicMapping(d, h, layers, self.routes.prefix)
        if self.routes.classifier:
            self.classifier = VisualEntityClassifier(d, dropout, loss=classifier_loss)
        self.grid_shape = grid_shape
        self.label_tokens, self.caption_tokens = label_tokens, caption_tokens

    # -- the shared encoder, with optional prefixes (eqs 1, 6, 7, 15-16)

    def encode(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        types: torch.Tensor | None = None,
        prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Token outputs (B, L, d) of the encoder. With ``prefix`` (one (keys, values)
        pair per layer, each (B, h, z, d_u)), every layer attends to [E^k_j; K_j] and
        [E^v_j; V_j] (eqs 15-16): the pairs fill a ``DynamicCache`` and the attention
        mask is extended by z ones in front. Positions are passed explicitly (BERT:
        0..n-1; RoBERTa/XLM-R: from padding_idx + 1), else the model would shift them
        by the prefix length."""
        mask_long = mask.long()
        if self._position_offset is None:
            positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)  # (B, L)
        else:
            positions = mask_long.cumsum(1) * mask_long + self._position_offset  # (B, L)
        if prefix is not None and torch.is_autocast_enabled(ids.device.type):
            # The gate's softmax runs in float32 under autocast; the layers' own keys
            # and values are in the autocast dtype, and the cache joins the two.
            dtype = torch.get_autocast_dtype(ids.device.type)
            prefix = [(k.to(dtype), v.to(dtype)) for k, v in prefix]
        types = types if (types is not None and self._typed) else torch.zeros_like(ids)
        return encoder_forward(self.encoder, self._cache_arg, ids, mask_long, types, positions, prefix)

    # -- eqs 5-7

    def represent(self, batch: Batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """V^g' = W_g G + b_g (eq 5), V^o' = BERT(C) (eq 6), V^d' = BERT(D) (eq 7), each
        (B, k_i, d) with its mask; C and D token outputs include their special tokens."""
        feats = {}
        if "grid" in self.scales:
            grid = self.grid_proj(batch.grid.to(self.grid_proj.weight.dtype))  # (B, G, d)
            feats["grid"] = (grid, torch.ones(grid.shape[:2], dtype=torch.bool, device=grid.device))
        if "labels" in self.scales:
            v = self.encode(batch.label_ids, batch.label_mask)  # (B, Lo, d)
            feats["labels"] = _pad_to(v, batch.label_mask, self.label_tokens)
        if "caption" in self.scales:
            v = self.encode(batch.caption_ids, batch.caption_mask)  # (B, Ld, d)
            feats["caption"] = _pad_to(v, batch.caption_mask, self.caption_tokens)
        return feats

    def forward(self, batch: Batch, *, compute_loss: bool = True) -> MsvseOutput:
        ab = self.ablation
        h_s_tokens = self.encode(batch.text_ids, batch.text_mask, batch.text_types)  # eq 1: (B, Ls, d)
        h_s = _gather(h_s_tokens, batch.text_index)  # (B, T, d)
        if ab.text_only:
            y_s = self.decoder.emissions(self.dropout(h_s))  # eq 23: (B, T, 11)
            out = MsvseOutput(emissions=y_s, crf_mask=batch.crf_mask, text_emissions=y_s)
            if compute_loss:
                out.losses["text"] = self.decoder.nll(y_s, batch.tags, batch.crf_mask)
                out.loss = out.losses["text"]
            return out

        v_m: dict[str, torch.Tensor] = {}
        if self.visual:
            for scale, (v, v_mask) in self.represent(batch).items():  # eqs 5-7
                v_m[scale] = self.filter(scale, v, v_mask, h_s_tokens, batch.text_mask)  # eqs 8-10: (B, z, d)
        prefix = self.mapping(v_m) if self.routes.prefix else None  # eqs 11-14
        joint = self.encode(batch.joint_ids, batch.joint_mask, batch.joint_types, prefix)  # eqs 15-16: (B, Lj, d)
        h_m = _gather(joint, batch.joint_index)  # (B, T, d)
        y_m = self.decoder.emissions(self.dropout(h_m))  # eq 22: (B, T, 11)
        out = MsvseOutput(emissions=y_m, crf_mask=batch.crf_mask)
        if not compute_loss:
            return out

        # Eq 25 is a plain sum; the paper gives no reductions. Ours, which weight the
        # terms against each other: each CRF term is the negative log-likelihood summed
        # over a sentence's positions and averaged over the batch; L_KL is averaged over
        # real tokens; L_VE is summed over its inputs, each averaged over the posts with
        # a target (softmax) or over posts and types (bce).
        y_s = self.decoder.emissions(self.dropout(h_s))  # eq 23
        out.text_emissions = y_s
        out.losses["multimodal"] = self.decoder.nll(y_m, batch.tags, batch.crf_mask)
        out.losses["text"] = self.decoder.nll(y_s, batch.tags, batch.crf_mask)
        if ab.consistency:
            out.losses["kl"] = consistency_kl(y_m, y_s, batch.word_mask)  # eq 24
        if self.routes.classifier:
            pooled = [v_m[s].mean(1) if s != "H^v" else masked_mean(joint, batch.joint_visual) for s in self.routes.classifier]
            out.losses["visual"] = self.classifier(pooled, batch.types)  # eqs 17-18: each input (B, d)
        out.loss = sum(out.losses.values())  # eq 25
        return out

    @torch.no_grad()
    def predict(self, batch: Batch) -> list[list[str]]:
        """Viterbi tags of every word of every item (the multimodal branch, Y^m; Y^s for
        a text-only model). The [CLS] and [SEP] tags are kept off word positions, so
        every word gets one of the 9 BIO tags."""
        out = self.forward(batch, compute_loss=False)
        y = out.emissions.float().clone()  # (B, T, 11)
        special = [TAG_LABELS.index(CLS_TAG), TAG_LABELS.index(SEP_TAG)]
        y[..., special] = y[..., special].masked_fill(batch.word_mask.unsqueeze(-1), -1e4)
        paths = self.decoder.decode(y, out.crf_mask)
        return [[TAG_LABELS[t] for t in path[1:-1]] for path in paths]

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by learning-rate group: the encoder, the CRF, the other new modules."""
        crf = set(id(p) for p in self.decoder.crf.parameters())
        enc = set(id(p) for p in self.encoder.parameters())
        groups: dict[str, list[nn.Parameter]] = {"encoder": [], "heads": [], "crf": []}
        for p in self.parameters():
            groups["encoder" if id(p) in enc else "crf" if id(p) in crf else "heads"].append(p)
        return groups


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` (B, T) of ``x`` (B, L, d) -> (B, T, d)."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def build_model(cfg: TrainConfig, encoder: nn.Module, grid_shape: tuple[int, int] | None) -> MsvseModel:
    """The MSVSE network the train config describes, around ``encoder``."""
    return MsvseModel(
        encoder,
        cfg.ablation,
        grid_shape=grid_shape,
        prefix_length=cfg.model.prefix_length,
        label_tokens=cfg.model.label_tokens,
        caption_tokens=cfg.model.caption_tokens,
        dropout=cfg.model.dropout,
        classifier_loss=cfg.model.classifier_loss,
    )
