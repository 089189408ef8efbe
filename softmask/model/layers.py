"""BERT-layout text and fusion encoders with switchable attention.

The modules mirror the parameter names of Hugging Face ``BertModel``
(``embeddings.*``, ``layer.{i}.attention.self.query`` ..., ``intermediate``,
``output``) so that a BERT checkpoint maps onto them key by key: its first
``text_layers`` layers go to :class:`TextEncoder`, the next ones to
:class:`FusionEncoder` (ALBEF: BERT layers 6-11). Embeddings, the output
sub-blocks and the feed-forward blocks are the ``transformers`` modules
themselves; the attention is written here so that the Grad-CAM layer can hand
out its per-head query / key / value and its attention output (the context
before the output projection) without materializing the attention
probabilities.

Attention implementations (``attn_impl``):

``"auto"`` / ``"sdpa"``
    :func:`torch.nn.functional.scaled_dot_product_attention`; with ``"auto"``,
    xformers' memory-efficient attention when it is installed, the tensors are
    on CUDA and there is no key padding mask (the cross-attention to the image
    tokens).
``"eager"``
    ``softmax(q k^T * scale + mask) @ v`` materialized: the reference path.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertEmbeddings, BertIntermediate, BertOutput, BertSelfOutput

from softmask.model.config import ModelConfig

__all__ = [
    "attention",
    "Captured",
    "TextEncoder",
    "FusionEncoder",
    "MLMHead",
    "bert_config",
    "xformers_available",
]

_XFORMERS = None


def xformers_available() -> bool:
    global _XFORMERS
    if _XFORMERS is None:
        try:
            import xformers.ops  # noqa: F401

            _XFORMERS = True
        except Exception:  # ImportError, or a broken build
            _XFORMERS = False
    return _XFORMERS


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: Optional[torch.Tensor] = None,
    *,
    dropout_p: float = 0.0,
    impl: str = "auto",
) -> torch.Tensor:
    """Multi-head attention ``softmax(q k^T / sqrt(dh), masked) @ v``.

    Args:
        q: ``[B, H, T, dh]``; k, v: ``[B, H, N, dh]``.
        key_mask: ``Bool[B, N]``, True where a key takes part, or ``Bool[B, T, N]`` per query (None: all).
        dropout_p: dropout on the attention probabilities.
        impl: "auto", "sdpa" or "eager" (see the module docstring).

    Returns:
        the context ``[B, H, T, dh]`` in the dtype of ``q``.
    """
    if impl == "eager":
        scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)  # (B, H, T, N)
        if key_mask is not None:
            m = key_mask[:, None, None, :] if key_mask.dim() == 2 else key_mask[:, None]
            scores = scores.masked_fill(~m, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1)
        if dropout_p > 0:
            probs = F.dropout(probs, p=dropout_p)
        return torch.matmul(probs, v)
    if impl == "auto" and key_mask is None and q.is_cuda and xformers_available():
        import xformers.ops as xops

        out = xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), p=dropout_p
        )  # (B, T, H, dh)
        return out.transpose(1, 2)
    if key_mask is None:
        mask = None
    else:  # (B, 1, 1, N) or (B, 1, T, N) bool
        mask = key_mask[:, None, None, :] if key_mask.dim() == 2 else key_mask[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def bert_config(cfg: ModelConfig) -> BertConfig:
    """The ``transformers`` BertConfig of the text side of ``cfg``."""
    return BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.text_layers + cfg.fusion_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        hidden_act=cfg.hidden_act,
        hidden_dropout_prob=cfg.hidden_dropout,
        attention_probs_dropout_prob=cfg.attn_dropout,
        max_position_embeddings=cfg.max_position_embeddings,
        type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.layer_norm_eps,
        pad_token_id=cfg.pad_token_id,
    )


class Captured(NamedTuple):
    """What the Grad-CAM cross-attention layer hands out (all still in the graph).

    query ``[B, H, T, dh]``, key / value ``[B, H, N, dh]``, context ``[B, H, T, dh]``
    (the attention output before the output projection: differentiate the ITM
    logits with respect to it to get ``grad_context``).
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    context: torch.Tensor


class _QKV(nn.Module):
    """``query`` / ``key`` / ``value`` projections with BertSelfAttention's names."""

    def __init__(self, hidden: int, heads: int, kv_width: int):
        super().__init__()
        self.heads = heads
        self.head_dim = hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.heads, self.head_dim).transpose(1, 2)  # (B, H, L, dh)


class Attention(nn.Module):
    """Self- or cross-attention with BertAttention's layout (``self`` + ``output``)."""

    def __init__(self, cfg: ModelConfig, bcfg: BertConfig, kv_width: int):
        super().__init__()
        self.self = _QKV(cfg.hidden_size, cfg.num_heads, kv_width)
        self.output = BertSelfOutput(bcfg)
        self.attn_dropout = cfg.attn_dropout
        self.impl = cfg.attn_impl

    def forward(
        self,
        hidden: torch.Tensor,
        kv: torch.Tensor,
        key_mask: Optional[torch.Tensor],
        *,
        capture: bool = False,
        attn_dropout: bool = True,
        kv_proj: Optional[tuple] = None,
        kv_index: Optional[torch.Tensor] = None,
    ):
        """``kv_proj``: this layer's ``(key, value)`` from :meth:`project_kv` instead of ``kv`` (then ``kv`` is
        unused); ``kv_index`` ``[B]`` picks each row's key / value row out of them."""
        s = self.self
        q = s.split(s.query(hidden))  # (B, H, T, dh)
        k, v = self.project_kv(kv) if kv_proj is None else kv_proj  # (M, H, N, dh)
        if kv_index is not None:
            # index_select: its backward is index_add_, several times faster on CPU than advanced indexing's
            k, v = k.index_select(0, kv_index), v.index_select(0, kv_index)  # (B, H, N, dh)
        p = self.attn_dropout if (self.training and attn_dropout) else 0.0
        ctx = attention(q, k, v, key_mask, dropout_p=p, impl=self.impl)  # (B, H, T, dh)
        B, H, T, dh = ctx.shape
        out = self.output(ctx.transpose(1, 2).reshape(B, T, H * dh), hidden)
        return out, (Captured(q, k, v, ctx) if capture else None)

    def project_kv(self, kv: torch.Tensor) -> tuple:
        """``kv [M, N, kv_width] -> (key, value)``, each ``[M, H, N, dh]``."""
        s = self.self
        return s.split(s.key(kv)), s.split(s.value(kv))


class Layer(nn.Module):
    """BERT layer: self-attention, optional cross-attention to the image tokens, feed-forward."""

    def __init__(self, cfg: ModelConfig, bcfg: BertConfig, cross: bool, encoder_width: int):
        super().__init__()
        self.attention = Attention(cfg, bcfg, cfg.hidden_size)
        self.crossattention = Attention(cfg, bcfg, encoder_width) if cross else None
        self.intermediate = BertIntermediate(bcfg)
        self.output = BertOutput(bcfg)

    def forward(self, hidden, text_mask, image_embeds=None, *, capture=False, cross_attn_dropout=True,
                image_kv=None, image_index=None):
        hidden, _ = self.attention(hidden, hidden, text_mask)
        cap = None
        if self.crossattention is not None:
            hidden, cap = self.crossattention(
                hidden, image_embeds, None, capture=capture, attn_dropout=cross_attn_dropout,
                kv_proj=image_kv, kv_index=image_index,
            )
        hidden = self.output(self.intermediate(hidden), hidden)
        return hidden, cap


def text_self_attention_mask(attention_mask: torch.Tensor, radius: Optional[int]) -> torch.Tensor:
    """The text self-attention's key mask: ``attention_mask`` ``[B, L]`` as a bool key mask (``radius`` None),
    or ``Bool[B, L, L]`` in which [CLS] (position 0) attends to every token and every other token only to the
    tokens within ``radius`` positions of it, [CLS] excluded (``ModelConfig.text_attn_radius``). A query row
    left with no key (a padding row) keeps [CLS], so that no softmax is empty."""
    pad = attention_mask.bool()
    if radius is None:
        return pad
    L = pad.shape[1]
    pos = torch.arange(L, device=pad.device)
    near = ((pos[:, None] - pos[None, :]).abs() <= radius) & (pos[None, :] > 0)
    near[0] = True
    mask = near[None] & pad[:, None, :]  # (B, L, L)
    mask[:, :, 0] |= ~mask.any(-1)
    return mask


class TextEncoder(nn.Module):
    """BERT embeddings + the first ``text_layers`` BERT layers (self-attention only).

    ``forward(input_ids [B, L] long, attention_mask [B, L]) -> [B, L, hidden]``.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        bcfg = bert_config(cfg)
        self.embeddings = BertEmbeddings(bcfg)
        self.layer = nn.ModuleList(Layer(cfg, bcfg, False, cfg.hidden_size) for _ in range(cfg.text_layers))
        self.radius = cfg.text_attn_radius

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, return_embeddings: bool = False):
        """``-> hidden [B, L, hidden]``, or ``(hidden, embeddings)`` with ``return_embeddings`` (the embedding
        layer's output, before the first layer)."""
        emb = self.embeddings(input_ids=input_ids)
        mask = text_self_attention_mask(attention_mask, self.radius)
        hidden = emb
        for layer in self.layer:
            hidden, _ = layer(hidden, mask)
        return (hidden, emb) if return_embeddings else hidden


class FusionEncoder(nn.Module):
    """The remaining BERT layers with cross-attention to the image tokens.

    ``forward(text_embeds [B, L, hidden], attention_mask [B, L], image_embeds [B, N, vision_width],
    capture_layer=None) -> (hidden [B, L, hidden], Captured | None)``. The layer named by
    ``capture_layer`` runs its cross-attention without attention dropout and hands out
    its q / k / v / context.

    Pairs that share images (ITM's hard negatives, the soft-masked pairs) need the images' cross-attention
    keys and values once: ``kv = image_kv(images [M, N, vision_width])``, then
    ``forward(text_embeds, attention_mask, image_kv=kv, image_index=idx)`` with ``idx [B]`` (long, values
    in ``[0, M)``) naming each pair's image; the same as passing ``images[idx]``, without projecting an
    image once per pair (per pair and layer the projections are ``2 N d^2`` MACs against about ``14 L d^2`` for
    the L text tokens: about a third of a fusion pass at the tiny preset's 65 image and 16 text tokens, more
    than half at ALBEF's 257 image tokens).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        bcfg = bert_config(cfg)
        self.layer = nn.ModuleList(Layer(cfg, bcfg, True, cfg.vision_width) for _ in range(cfg.fusion_layers))
        self.radius = cfg.text_attn_radius

    def image_kv(self, image_embeds: torch.Tensor) -> list:
        """Every layer's cross-attention ``(key, value)`` of ``image_embeds [M, N, vision_width]``."""
        return [layer.crossattention.project_kv(image_embeds) for layer in self.layer]

    def forward(self, text_embeds, attention_mask, image_embeds=None, capture_layer: Optional[int] = None, *,
                image_kv: Optional[list] = None, image_index: Optional[torch.Tensor] = None):
        if (image_embeds is None) == (image_kv is None):
            raise ValueError("fusion encoder: expected exactly one of image_embeds and image_kv")
        if image_index is not None and image_kv is None:
            raise ValueError("fusion encoder: image_index needs image_kv (index image_embeds instead)")
        mask = text_self_attention_mask(attention_mask, self.radius)
        hidden, captured = text_embeds, None
        for i, layer in enumerate(self.layer):
            hit = capture_layer == i
            hidden, cap = layer(hidden, mask, image_embeds, capture=hit, cross_attn_dropout=not hit,
                                image_kv=None if image_kv is None else image_kv[i], image_index=image_index)
            if hit:
                captured = cap
        return hidden, captured


class MLMHead(nn.Module):
    """BERT's MLM head (``transform.dense``/``transform.LayerNorm``/``decoder``): ``[.., hidden] -> [.., vocab]``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        bcfg = bert_config(cfg)
        from transformers.models.bert.modeling_bert import BertPredictionHeadTransform

        self.transform = BertPredictionHeadTransform(bcfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden))
