"""ALBEF-style vision-language model with text-driven soft masks and focal ITC.

Objectives of one :meth:`SoftMaskALBEF.forward` (B pairs):

* ``loss_itc``: :func:`softmask.focal_itc_loss` of the online features against
  ``[momentum features of the batch; queue]`` (passed as the two parts, the queue
  never copied) with momentum-distillation targets (weight ``alpha``), focal
  exponent ``gamma``.
* ``loss_itm``: cross-entropy of the ITM head over B positives, B (text, hard
  negative image) and B (image, hard negative text) pairs; negatives drawn from
  the softmax of the in-batch similarities, diagonal (and, by default, pairs with
  the same caption) excluded.
* ``loss_softmask``: per pair, a random caption word (of ``word_candidates``: every non-special token, or
  with ``softmask_words="content"`` no function word or punctuation); the gradient of the
  positive ITM logits with respect to the Grad-CAM layer's attention output
  (``torch.autograd.grad``, parameter gradients untouched, attention dropout off
  on that layer); :func:`softmask.text_driven_soft_mask` dims the image tokens
  most tied to the word. The dimmed images then enter ITM exactly as the clean
  ones do (``softmask_negatives``, the default): (caption i, dimmed image i) is a
  match, (caption i, dimmed hard-negative image) and (hard-negative caption,
  dimmed image i) are not, so 1 positive per 2 negatives as in ``loss_itm``. By
  default (``softmask_pairs="one"``) each row contributes one of its three pairs, a
  third of the rows each: B soft-masked fusion passes instead of 3B (``"all"``), with
  the same metrics over 3 seeds (docs/TRAINING_NOTES.md, H12). The
  paper leaves open which ITM pairs see soft-masked features; labelling every
  dimmed image a match (``softmask_negatives=False``) makes the dimming itself
  predict the label, and the model learned that shortcut (held-out: dimmed hard
  negatives judged a match with probability 0.94, undimmed 0.06; see
  docs/TRAINING_NOTES.md).
* ``loss_mlm``: masked-token prediction (15 %, 80/10/10) from the fusion encoder.

With ``text_aug`` (multi-modal augmentation) ITC and ITM see the masked
caption, and the MLM logits come from the positive ITM fusion pass (same
inputs as ALBEF's MLM pass); without it they see the clean caption and MLM has
its own text + fusion pass, as in ALBEF. With ``text_aug`` and
``itm_text_aug=False`` only ITC sees the masked caption: ITM and the
soft-masked pairs read the clean one (a second text pass), and MLM has its own
fusion pass over the masked caption's text states.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import softmask
from softmask.model.config import ModelConfig
from softmask.model.layers import FusionEncoder, MLMHead, TextEncoder

__all__ = ["SoftMaskALBEF", "build_vision_encoder", "all_gather_nograd"]


def _conv_stem_embed(extra_convs: int = 0):
    """A timm ``PatchEmbed`` whose single ``patch x patch`` projection is replaced by a stack of 3x3
    stride-2 convolutions (log2(patch) of them, widths doubling up to ``embed_dim``; Xiao et al. 2021,
    "Early convolutions help transformers see better"): overlapping receptive fields give the patch
    tokens local shape features from the first step. ``extra_convs`` more 3x3 stride-1 convolutions at
    the token resolution (``vision_stem="cnn"``: one) widen each token's receptive field by
    ``2 * patch`` pixels each: 31 px at patch 8, a whole object of the shapes data, so that a token
    can tell the object's shape by itself (docs/TRAINING_NOTES.md, H13)."""
    from timm.layers import PatchEmbed

    class ConvStemPatchEmbed(PatchEmbed):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            p = self.patch_size[0]
            n = p.bit_length() - 1
            if p != self.patch_size[1] or 2**n != p or n < 1:
                raise ValueError(f"vision_stem 'conv': patch_size must be a power of 2 >= 2, got {self.patch_size}")
            in_ch, out_dim = self.proj.in_channels, self.proj.out_channels
            widths = [max(8, out_dim >> (n - 1 - i)) for i in range(n)]  # (..., D/2, D)
            layers, c = [], in_ch
            for i, w in enumerate(widths):
                layers.append(nn.Conv2d(c, w, 3, stride=2, padding=1))
                if i < n - 1:
                    layers.append(nn.GELU())
                c = w
            for _ in range(extra_convs):
                layers += [nn.GELU(), nn.Conv2d(c, c, 3, stride=1, padding=1)]
            self.proj = nn.Sequential(*layers)  # (B, 3, S, S) -> (B, D, S / p, S / p)

    return ConvStemPatchEmbed


def build_vision_encoder(cfg: ModelConfig) -> nn.Module:
    """timm VisionTransformer without a classifier head (random init, nothing downloaded)."""
    from timm.models.vision_transformer import VisionTransformer

    stems = {"conv": 0, "cnn": 1}
    extra = {"embed_layer": _conv_stem_embed(stems[cfg.vision_stem])} if cfg.vision_stem in stems else {}
    vit = VisionTransformer(
        **extra,
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.vision_width,
        depth=cfg.vision_depth,
        num_heads=cfg.vision_heads,
        mlp_ratio=cfg.vision_mlp_ratio,
        qkv_bias=True,
        num_classes=0,
        drop_path_rate=cfg.vision_drop_path,
        reg_tokens=cfg.vision_registers,
    )
    set_vit_attention(vit, cfg.attn_impl)
    if cfg.vision_attn_radius is not None:
        set_local_attention(vit, cfg.vision_attn_radius)
    return vit


def _heads(blk: nn.Module, t: torch.Tensor):
    """A timm block's ``q, k, v`` (``[B, H, N, dh]`` each) of the normalized tokens ``t``."""
    a = blk.attn
    B, N, _ = t.shape
    q, k, v = a.qkv(blk.norm1(t)).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return a.q_norm(q), a.k_norm(k), v


def _block_tail(blk: nn.Module, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """A timm block after its attention product: output projection, residual, MLP, residual."""
    a = blk.attn
    B, N = x.shape[:2]
    x = x + blk.ls1(a.proj(a.norm(ctx.transpose(1, 2).reshape(B, N, a.attn_dim))))
    return x + blk.ls2(blk.mlp(blk.norm2(x)))


def _patch_block(blk: nn.Module, x: torch.Tensor, n: int):
    """One local-attention block on the patch tokens alone (they read no prefix token): ``(k, v, out)``, the
    patches' keys and values for the prefix tokens to read. Equal to the block's patch rows (tested)."""
    q, k, v = _heads(blk, x)
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=blk.local_mask[n:, n:].to(q.dtype))
    return k, v, _block_tail(blk, x, ctx)


def _prefix_block(blk: nn.Module, c: torch.Tensor, k_p: torch.Tensor, v_p: torch.Tensor) -> torch.Tensor:
    """One block on the prefix tokens ``c`` ([CLS], registers), which read every token: their own keys and
    values and the patches' ``k_p, v_p``. Equal to the block's prefix rows (tested)."""
    q, k, v = _heads(blk, c)
    ctx = F.scaled_dot_product_attention(q, torch.cat([k, k_p], dim=2), torch.cat([v, v_p], dim=2))
    return _block_tail(blk, c, ctx)


class _LocalBlock(nn.Module):
    """A timm ViT block whose self-attention gets the additive mask ``local_mask`` when none is given."""

    def forward(self, x, attn_mask=None, is_causal=False):
        if attn_mask is None and not is_causal:
            attn_mask = self.local_mask.to(dtype=x.dtype)
        return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)


def local_attention_mask(grid: int, prefix: int, radius: int) -> torch.Tensor:
    """Additive ``[N, N]`` mask (0 or -inf) of ``vision_attn_radius``: ``N = prefix + grid**2`` tokens; a
    patch token attends to the patch tokens within ``radius`` (Chebyshev distance on the ``grid x grid``
    patch grid) only; a prefix token attends to every token."""
    yy, xx = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    yy, xx = yy.flatten(), xx.flatten()
    near = torch.maximum((yy[:, None] - yy[None, :]).abs(), (xx[:, None] - xx[None, :]).abs()) <= radius
    n = prefix + grid * grid
    allowed = torch.ones(n, n, dtype=torch.bool)
    allowed[prefix:, :prefix] = False
    allowed[prefix:, prefix:] = near
    return torch.zeros(n, n).masked_fill(~allowed, float("-inf"))


def set_local_attention(vit: nn.Module, radius: int) -> None:
    """Restrict ``vit``'s patch tokens to local self-attention (:func:`local_attention_mask`)."""
    grid = vit.patch_embed.grid_size[0]
    mask = local_attention_mask(grid, vit.num_prefix_tokens, radius)
    for blk in vit.blocks:
        if not isinstance(blk, _LocalBlock):
            blk.__class__ = type("Local" + type(blk).__name__, (_LocalBlock, type(blk)), {})
        blk.register_buffer("local_mask", mask.clone(), persistent=False)


def set_vit_attention(vit: nn.Module, attn_impl: str) -> None:
    """timm blocks use SDPA when ``fused_attn``; the reference path uses their eager softmax."""
    for blk in vit.blocks:
        if hasattr(blk.attn, "fused_attn"):
            blk.attn.fused_attn = attn_impl != "eager"


def all_gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """``[B, D]`` per rank -> ``[world * B, D]`` (rank order); identity without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


class SoftMaskALBEF(nn.Module):
    """The model. Inputs of :meth:`forward`:

    image ``[B, 3, S, S]`` (normalized), input_ids / attention_mask ``[B, L]``,
    mlm_input_ids / mlm_labels ``[B, L]`` (from :func:`softmask.data.mask_tokens`,
    labels -100 where not predicted), word_candidates ``Bool[B, L]`` (the caption
    words the soft mask may pick: never [CLS]/[SEP]/[PAD]/[MASK]), alpha (the
    current distillation weight).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.visual_encoder = build_vision_encoder(cfg)
        self.text_encoder = TextEncoder(cfg)
        self.fusion_encoder = FusionEncoder(cfg)
        if cfg.fusion_text_input == "shared":  # BLIP: fusion layer i = text layer i + its own cross-attention
            for fl, tl in zip(self.fusion_encoder.layer, self.text_encoder.layer):
                fl.attention, fl.intermediate, fl.output = tl.attention, tl.intermediate, tl.output
        self.vision_proj = nn.Linear(cfg.vision_width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.hidden_size, cfg.embed_dim)
        self.itm_head = nn.Linear(cfg.hidden_size, 2)
        self.mlm_head = MLMHead(cfg)
        self.temp = nn.Parameter(torch.tensor(float(cfg.temperature)))

        # momentum copies (EMA), never trained by the optimizer
        self.visual_encoder_m = copy.deepcopy(self.visual_encoder)
        self.text_encoder_m = copy.deepcopy(self.text_encoder)
        self.vision_proj_m = copy.deepcopy(self.vision_proj)
        self.text_proj_m = copy.deepcopy(self.text_proj)
        for p in self.momentum_parameters():
            p.requires_grad_(False)
        for p in self._frozen_vit_parameters():
            p.requires_grad_(False)

        # queues, row layout [Q, D], initialized with random unit vectors (ALBEF)
        self.register_buffer("image_queue", F.normalize(torch.randn(cfg.queue_size, cfg.embed_dim), dim=1))
        self.register_buffer("text_queue", F.normalize(torch.randn(cfg.queue_size, cfg.embed_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        # the positive id of every queue slot (ALBEF's idx_queue); -100: empty, or written without ids
        self.register_buffer("idx_queue", torch.full((cfg.queue_size,), -100, dtype=torch.long))
        self._register_load_state_dict_pre_hook(self._fill_missing_idx_queue)
        if cfg.fusion_text_input == "shared":  # each shared tensor is saved once, under its text-encoder name
            self._register_state_dict_hook(SoftMaskALBEF._drop_shared_aliases)
            self._register_load_state_dict_pre_hook(self._fill_shared_aliases)
        # created last and only when used, so that the other weights' initialization does not depend on it
        self.bow_head = nn.Linear(cfg.vision_width, cfg.vocab_size) if cfg.weight_bow > 0 else None

    def _fill_missing_idx_queue(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before the id queue existed: every slot unknown (-100 matches nothing)
        if prefix + "image_queue" in state_dict and prefix + "idx_queue" not in state_dict:
            state_dict[prefix + "idx_queue"] = torch.full_like(self.idx_queue, -100)

    _SHARED_PARTS = ("attention.", "intermediate.", "output.")

    @staticmethod
    def _drop_shared_aliases(module, state_dict, prefix, local_metadata):
        # fusion_text_input="shared": fusion layer i's self-attention / feed-forward tensors are text layer i's;
        # safetensors refuses two names for one tensor, and one copy on disk is all a load needs
        for key in [k for k in state_dict if k.startswith(prefix + "fusion_encoder.layer.")]:
            rest = key[len(prefix + "fusion_encoder.layer."):].split(".", 1)[1]
            if rest.startswith(SoftMaskALBEF._SHARED_PARTS):
                del state_dict[key]
        return state_dict

    def _fill_shared_aliases(self, state_dict, prefix, *args, **kwargs):
        head = prefix + "text_encoder.layer."
        for key in [k for k in state_dict if k.startswith(head)]:
            i, rest = key[len(head):].split(".", 1)
            if int(i) < self.cfg.fusion_layers and rest.startswith(self._SHARED_PARTS):
                state_dict.setdefault(f"{prefix}fusion_encoder.layer.{i}.{rest}", state_dict[key])

    # ------------------------------------------------------------------ parameter groups

    def _pairs(self):
        return [
            (self.visual_encoder, self.visual_encoder_m),
            (self.text_encoder, self.text_encoder_m),
            (self.vision_proj, self.vision_proj_m),
            (self.text_proj, self.text_proj_m),
        ]

    def _frozen_vit_parameters(self):
        """The online ViT's parameters that ``cfg.vision_frozen_blocks`` freezes: the patch and position
        embeddings, the first k blocks, and with global attention [CLS] and the registers (none when k is 0)."""
        k, vit = self.cfg.vision_frozen_blocks, self.visual_encoder
        if k == 0:
            return
        for mod in (vit.patch_embed, vit.norm_pre, *vit.blocks[:k]):
            yield from mod.parameters()
        tokens = ("pos_embed",) if self._vit_prefix_trains() else ("cls_token", "reg_token", "pos_embed")
        for name in tokens:
            if getattr(vit, name, None) is not None:
                yield getattr(vit, name)

    def momentum_parameters(self):
        for _, m in self._pairs():
            yield from m.parameters()

    def set_attn_impl(self, impl: str) -> None:
        """Switch every attention (ViT, text, fusion, momentum copies) to ``impl``."""
        self.cfg = self.cfg.replace(attn_impl=impl)
        for mod in self.modules():
            if hasattr(mod, "impl") and hasattr(mod, "attn_dropout"):
                mod.impl = impl
        set_vit_attention(self.visual_encoder, impl)
        set_vit_attention(self.visual_encoder_m, impl)

    @torch.no_grad()
    def copy_to_momentum(self) -> None:
        """Momentum copies := online weights (after loading pretrained weights)."""
        for online, m in self._pairs():
            m.load_state_dict(online.state_dict())

    @torch.no_grad()
    def momentum_update(self) -> None:
        """``p_m = m * p_m + (1 - m) * p`` for every momentum parameter."""
        online, mom = [], []
        for o, m in self._pairs():
            for p, pm in zip(o.parameters(), m.parameters()):
                if p.requires_grad:  # a frozen online part stays equal to its copy (copy_to_momentum)
                    online.append(p.detach())
                    mom.append(pm)
        torch._foreach_mul_(mom, self.cfg.momentum)
        torch._foreach_add_(mom, online, alpha=1.0 - self.cfg.momentum)

    @torch.no_grad()
    def enqueue(self, image_feat_m: torch.Tensor, text_feat_m: torch.Tensor, ids: Optional[torch.Tensor] = None) -> None:
        """Write the (all-gathered) momentum features ``[B, D]`` and positive ids ``[B]`` (None: -100,
        unknown) into the ring queues."""
        Q = self.cfg.queue_size
        if Q == 0:
            return
        if ids is None:
            ids = torch.full((image_feat_m.shape[0],), -100, dtype=torch.long, device=image_feat_m.device)
        img, txt, pid = all_gather_nograd(image_feat_m), all_gather_nograd(text_feat_m), all_gather_nograd(ids)
        n = img.shape[0]
        if n >= Q:
            img, txt, pid, n = img[-Q:], txt[-Q:], pid[-Q:], Q
        ptr = int(self.queue_ptr)
        idx = (torch.arange(n, device=img.device) + ptr) % Q
        self.image_queue[idx] = img.to(self.image_queue.dtype)
        self.text_queue[idx] = txt.to(self.text_queue.dtype)
        self.idx_queue[idx] = pid.to(self.idx_queue.dtype)
        self.queue_ptr.fill_((ptr + n) % Q)

    # ------------------------------------------------------------------ encoders

    def _image_tokens(self, vit: nn.Module, image: torch.Tensor) -> torch.Tensor:
        """ViT tokens ``[B, 1+P, Dv]``: [CLS] then the patches (register tokens, if any, dropped)."""
        return self._drop_registers(vit.forward_features(image))  # from (B, 1 + R + P, Dv)

    def _drop_registers(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 1+R+P, Dv]`` ViT output -> ``[B, 1+P, Dv]``: [CLS] then the patches."""
        R = self.cfg.vision_registers
        return torch.cat([x[:, :1], x[:, 1 + R :]], dim=1) if R else x

    def _vit_prefix_trains(self) -> bool:
        """Whether [CLS] and the registers keep training under ``vision_frozen_blocks``: with local attention
        (``vision_attn_radius``) no patch token reads them, so their path through the frozen blocks is computed
        apart, with its gradient, at the cost of a few tokens; with global attention they freeze too."""
        return self.cfg.vision_attn_radius is not None

    def _vit_frozen_part(self, image: torch.Tensor):
        """The online ViT through its ``cfg.vision_frozen_blocks`` frozen blocks: ``(prefix, patches, kv)``, the
        [CLS] and register tokens ``[B, n, Dv]`` (with their gradient when :meth:`_vit_prefix_trains`), the patch
        tokens ``[B, P, Dv]`` (no graph) and each frozen block's patch keys and values (for the momentum ViT's
        prefix, :meth:`_vit_frozen_prefix`). The momentum ViT's frozen blocks and embeddings equal the online's."""
        vit, n = self.visual_encoder, self.visual_encoder.num_prefix_tokens
        with torch.no_grad():
            patches = vit.patch_embed(image)
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(patches)))
        prefix, x = x[:, :n], x[:, n:].detach()
        kv = []
        for blk in vit.blocks[: self.cfg.vision_frozen_blocks]:
            if not self._vit_prefix_trains():  # global attention: every token through the block, no graph
                with torch.no_grad():
                    y = blk(torch.cat([prefix, x], dim=1))
                prefix, x = y[:, :n], y[:, n:]
                continue
            with torch.no_grad():
                k, v, x = _patch_block(blk, x, n)
            kv.append((k, v))
            prefix = _prefix_block(blk, prefix, k, v)
        return prefix, x, kv

    def _vit_frozen_prefix(self, vit: nn.Module, patches: torch.Tensor, kv: list) -> torch.Tensor:
        """``vit``'s own [CLS] and registers through the frozen blocks, reading the patch keys and values ``kv``
        that :meth:`_vit_frozen_part` computed (no graph): the momentum ViT's prefix."""
        n = vit.num_prefix_tokens
        with torch.no_grad():
            prefix = vit.norm_pre(vit._pos_embed(patches))[:, :n]  # [CLS] and registers: no patch value enters
            for blk, (k, v) in zip(vit.blocks, kv):
                prefix = _prefix_block(blk, prefix, k, v)
        return prefix

    def _vit_rest(self, vit: nn.Module, prefix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``vit``'s blocks after the frozen ones and its final norm, from the frozen part's prefix and patch
        tokens; [CLS] then the patches, as :meth:`_image_tokens`."""
        x = torch.cat([prefix, x], dim=1)
        for blk in vit.blocks[self.cfg.vision_frozen_blocks:]:
            x = blk(x)
        return self._drop_registers(vit.norm(x))

    def encode_image(self, image: torch.Tensor):
        """``image [B,3,S,S] -> (embeds [B, 1+P, Dv], feat [B, E] unit-norm)``."""
        embeds = self._image_tokens(self.visual_encoder, image)
        return embeds, self._image_feature(embeds, self.vision_proj)

    def _image_feature(self, embeds: torch.Tensor, proj: nn.Module) -> torch.Tensor:
        """The unit-norm ITC image feature from ViT tokens ``[B, 1+P, Dv]``: the projection of [CLS]
        (``vision_pool="cls"``, ALBEF) or of the elementwise max over the patch tokens ("max")."""
        pooled = embeds[:, 1:].amax(1) if self.cfg.vision_pool == "max" else embeds[:, 0]
        return F.normalize(proj(pooled).float(), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """``ids [B, L] -> (embeds [B, L, hidden], feat [B, E] unit-norm)``: ``embeds`` is what the fusion
        encoder reads (the text encoder's output, or its embedding layer's with
        ``fusion_text_input="embeddings"``), ``feat`` the ITC feature from the text encoder's [CLS]."""
        hidden, emb = self.text_encoder(input_ids, attention_mask, return_embeddings=True)
        fusion_in = hidden if self.cfg.fusion_text_input == "encoder" else emb
        return fusion_in, F.normalize(self.text_proj(hidden[:, 0]).float(), dim=-1)

    def itm_logits(self, text_embeds, attention_mask, image_embeds=None, capture_layer=None, *, image_kv=None,
                   image_index=None):
        """Fusion pass + ITM head: ``-> (logits [B, 2], fused [B, L, hidden], Captured | None)``.
        ``image_kv`` / ``image_index``: shared image keys and values (see :class:`FusionEncoder`)."""
        fused, cap = self.fusion_encoder(text_embeds, attention_mask, image_embeds, capture_layer,
                                         image_kv=image_kv, image_index=image_index)
        return self.itm_head(fused[:, 0]), fused, cap

    def word_gradcam_inputs(self, text_embeds, attention_mask, image_embeds=None, *, retain_graph=True,
                            image_kv=None, layer: Optional[int] = None):
        """Positive ITM logits and the Grad-CAM layer's (q, k, v, grad_context).

        ``grad_context = d sum_b logits[b, 1] / d context`` at ``cfg.gradcam_layer`` (``layer``: another fusion layer),
        computed with :func:`torch.autograd.grad` (a partial backward: parameter
        ``.grad`` fields are not touched). Returns ``(logits [B, 2], fused, q, k, v, grad_context)``;
        q/k/v/grad_context are detached.
        """
        with torch.enable_grad():
            logits, fused, cap = self.itm_logits(
                text_embeds, attention_mask, image_embeds, image_kv=image_kv,
                capture_layer=self.cfg.gradcam_layer if layer is None else layer
            )
            (grad_ctx,) = torch.autograd.grad(
                logits[:, 1].sum(), cap.context, retain_graph=retain_graph
            )
        return logits, fused, cap.query.detach(), cap.key.detach(), cap.value.detach(), grad_ctx.detach()

    # ------------------------------------------------------------------ training forward

    @torch.no_grad()
    def hard_negatives(self, image_feat, text_feat, image_feat_m, text_feat_m, input_ids, ids=None, holds=None):
        """In-batch ITM hard negatives ``(neg_text [B], neg_image [B])``: a text per image and an image per
        text, drawn from the softmax of the ITC similarities (ALBEF). Never the pair itself, never a pair
        with an identical caption (``exclude_same_caption_negatives``), never a pair with the same
        ``ids`` (false negatives in retrieval fine-tuning), never a caption true of the image (``holds[i, j]``:
        caption j of image i; for the text-to-image draw, ``holds[j, i]``). A row left with no allowed pair (e.g. every
        pair of the batch shares one id) falls back to any other pair of the batch."""
        B = image_feat.shape[0]
        eye = torch.eye(B, dtype=torch.bool, device=image_feat.device)
        temp = self.temp.detach().float()
        w_i2t = torch.softmax(image_feat.detach() @ text_feat_m.t() / temp, dim=1)  # (B, B)
        w_t2i = torch.softmax(text_feat.detach() @ image_feat_m.t() / temp, dim=1)  # (B, B)
        allowed = ~eye
        if self.cfg.exclude_same_caption_negatives:
            same = (input_ids[:, None, :] == input_ids[None, :, :]).all(-1)  # (B, B)
            allowed &= ~same
        if ids is not None:  # a pair with the same id is a positive, never a negative
            allowed &= ids[:, None] != ids[None, :]
        allowed_t2i = allowed
        if holds is not None:  # row i of w_i2t: captions j for image i; row i of w_t2i: images j for caption i
            allowed, allowed_t2i = allowed & ~holds, allowed & ~holds.t()
        allowed = torch.where(~allowed.any(1, keepdim=True), ~eye, allowed)
        allowed_t2i = torch.where(~allowed_t2i.any(1, keepdim=True), ~eye, allowed_t2i)
        w_i2t = torch.where(allowed, w_i2t + 1e-5, torch.zeros_like(w_i2t))
        w_t2i = torch.where(allowed_t2i, w_t2i + 1e-5, torch.zeros_like(w_t2i))
        neg_text = torch.multinomial(w_i2t, 1).squeeze(1)
        neg_image = torch.multinomial(w_t2i, 1).squeeze(1)
        return neg_text, neg_image

    def forward(
        self,
        image: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        mlm_input_ids: torch.Tensor,
        mlm_labels: torch.Tensor,
        word_candidates: Optional[torch.Tensor] = None,
        alpha: float = 0.0,
        ids: Optional[torch.Tensor] = None,
        holds: Optional[torch.Tensor] = None,
    ) -> dict:
        """All losses of one step: ``{"loss", "loss_itc", "loss_itm", "loss_softmask", "loss_mlm"}``
        (0-dim tensors; ``loss`` is the weighted sum), plus ``"mask_mean"`` (detached).

        ``ids`` (``[B]`` int64, optional; ALBEF's retrieval fine-tuning): the positive id of each pair,
        e.g. its image id. ITC then counts every key with the same id (batch and id queue) as a
        positive, ITM hard negatives are drawn only among pairs with a different id, and the ids
        enter the id queue. Without ids a pair's only positive is itself (pretraining). ``holds`` (``[B, B]``
        bool, optional; captions that name part of their image): ``holds[i, j]`` marks caption j as true of
        image i, and ITM never draws that pair as a hard negative (ITC keeps its one-hot targets)."""
        cfg = self.cfg
        B = image.shape[0]
        if B < 2:
            raise ValueError(f"image: expected a batch of at least 2 pairs (ITM draws its negatives in the batch), got {B}")
        if ids is not None:
            if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64 or tuple(ids.shape) != (B,):
                got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
                raise ValueError(f"ids: expected an int64 tensor of shape ({B},), got {got}")
            ids = ids.to(image.device)
        if holds is not None:
            if not isinstance(holds, torch.Tensor) or holds.dtype != torch.bool or tuple(holds.shape) != (B, B):
                got = f"{holds.dtype} {tuple(holds.shape)}" if isinstance(holds, torch.Tensor) else type(holds).__name__
                raise ValueError(f"holds: expected a bool tensor of shape ({B}, {B}), got {got}")
            holds = holds.to(image.device)
        with torch.no_grad():
            self.temp.clamp_(cfg.temperature_min, cfg.temperature_max)

        text_ids = mlm_input_ids if cfg.text_aug else input_ids
        if cfg.vision_frozen_blocks:  # the frozen blocks' patch tokens once, for the online and the momentum ViT
            vit_prefix, vit_patches, vit_kv = self._vit_frozen_part(image)
            image_embeds = self._vit_rest(self.visual_encoder, vit_prefix, vit_patches)
            image_feat = self._image_feature(image_embeds, self.vision_proj)
        else:
            image_embeds, image_feat = self.encode_image(image)
        text_embeds, text_feat = self.encode_text(text_ids, attention_mask)
        itc_text_embeds = text_embeds  # the caption ITC reads: with text_aug the masked one, which MLM predicts
        if cfg.text_aug and not cfg.itm_reads_masked_caption:  # ITM and the soft-masked pairs: the clean caption
            text_embeds, _ = self.encode_text(input_ids, attention_mask)

        # ---------------------------------------------------------------- ITC (focal, momentum distillation)
        with torch.no_grad():
            self.momentum_update()
            if cfg.vision_frozen_blocks:
                prefix_m = (self._vit_frozen_prefix(self.visual_encoder_m, vit_patches, vit_kv)
                            if self._vit_prefix_trains() else vit_prefix)
                image_embeds_m = self._vit_rest(self.visual_encoder_m, prefix_m, vit_patches)
            else:
                image_embeds_m = self._image_tokens(self.visual_encoder_m, image)
            image_feat_m = self._image_feature(image_embeds_m, self.vision_proj_m)
            text_embeds_m = self.text_encoder_m(text_ids, attention_mask)
            text_feat_m = F.normalize(self.text_proj_m(text_embeds_m[:, 0]).float(), dim=-1)
        # key banks [momentum features of the batch; queue] passed as parts: no per-step copy of the queue; the op
        # keeps no part for its backward, so the enqueue below cannot change the gradients
        image_keys = (image_feat_m, self.image_queue)  # (B + Q, E) logically
        text_keys = (text_feat_m, self.text_queue)
        loss_itc = softmask.focal_itc_loss(
            image_feat, text_feat, self.temp, gamma=cfg.gamma, image_keys=image_keys, text_keys=text_keys,
            image_feat_m=image_feat_m, text_feat_m=text_feat_m, alpha=float(alpha), backend=cfg.op_backend,
            ids=ids, key_ids=None if ids is None else (ids, self.idx_queue),
        )
        self.enqueue(image_feat_m, text_feat_m, ids)

        # ---------------------------------------------------------------- ITM positives (+ Grad-CAM inputs)
        # every fusion pass below pairs texts with these B images (or their soft-masked copies): their
        # cross-attention keys / values are projected once and indexed per pair
        image_kv = self.fusion_encoder.image_kv(image_embeds)
        if cfg.softmask:
            pos_logits, fused_pos, q, k, v, grad_ctx = self.word_gradcam_inputs(
                text_embeds, attention_mask, image_kv=image_kv
            )
        else:
            pos_logits, fused_pos, _ = self.itm_logits(text_embeds, attention_mask, image_kv=image_kv)

        # ---------------------------------------------------------------- ITM hard negatives
        neg_text, neg_image = self.hard_negatives(image_feat, text_feat, image_feat_m, text_feat_m, input_ids, ids,
                                                  holds=holds)
        rows = torch.arange(B, device=image.device)
        text_all = torch.cat([text_embeds, text_embeds[neg_text]], dim=0)  # (2B, L, hidden)
        mask_all = torch.cat([attention_mask, attention_mask[neg_text]], dim=0)
        image_all = torch.cat([neg_image, rows])  # (2B,) image of each pair
        neg_logits, _, _ = self.itm_logits(text_all, mask_all, image_kv=image_kv, image_index=image_all)
        itm_logits = torch.cat([pos_logits, neg_logits], dim=0).float()  # (3B, 2)
        itm_labels = torch.cat(
            [torch.ones(B, dtype=torch.long), torch.zeros(2 * B, dtype=torch.long)]
        ).to(image.device)
        loss_itm = F.cross_entropy(itm_logits, itm_labels)

        # ---------------------------------------------------------------- soft-masked pairs
        if cfg.softmask:
            if word_candidates is None:
                raise ValueError("word_candidates: required when cfg.softmask is True")
            cand = word_candidates.bool() & attention_mask.bool()
            # a caption without any candidate word keeps position 1 (mask computed, never all-special in practice)
            cand[:, 1] |= ~cand.any(1)
            word_index = torch.multinomial(cand.float(), 1).squeeze(1)  # (B,)
            masked_embeds, mask = softmask.text_driven_soft_mask(
                image_embeds, q, k, v, grad_ctx, word_index, floor=cfg.mask_floor, backend=cfg.op_backend
            )
            if cfg.softmask_negatives:
                # the soft-masked images in the same 1 : 2 label ratio as the clean ITM pairs, so that
                # the dimming itself carries no information about the label
                sm_text_idx = torch.cat([rows, rows, neg_text])  # (3B,) caption of each pair
                sm_image = torch.cat([rows, neg_image, rows])  # (3B,) masked image of each pair
                sm_labels = itm_labels
                if cfg.softmask_pairs == "one":  # one of the three pairs per row, a third of the rows each
                    role = torch.randperm(B, device=image.device) % 3  # 0: positive, 1 / 2: the two negatives
                    pick = role * B + rows
                    sm_text_idx, sm_image, sm_labels = sm_text_idx[pick], sm_image[pick], sm_labels[pick]
                sm_text, sm_mask = text_embeds[sm_text_idx], attention_mask[sm_text_idx]
            else:  # the soft-masked image with its own caption only, always labelled a match
                sm_text, sm_mask, sm_image = text_embeds, attention_mask, None
                sm_labels = itm_labels[:B]
            sm_logits, _, _ = self.itm_logits(sm_text, sm_mask, image_kv=self.fusion_encoder.image_kv(masked_embeds),
                                              image_index=sm_image)
            loss_softmask = F.cross_entropy(sm_logits.float(), sm_labels)
            mask_mean = mask[:, 1:].mean().detach()
        else:
            loss_softmask = image_feat.new_zeros(())
            mask_mean = image_feat.new_ones(())

        # ---------------------------------------------------------------- caption bag of words (optional)
        if self.bow_head is not None:
            L = input_ids.shape[1]
            pos = torch.arange(L, device=input_ids.device)
            last = attention_mask.long().sum(1, keepdim=True) - 1  # [SEP]
            words = attention_mask.bool() & (pos[None, :] > 0) & (pos[None, :] < last)  # not [CLS] / [SEP] / [PAD]
            target = torch.zeros(B, cfg.vocab_size, device=image.device)
            target.scatter_add_(1, input_ids, words.float())
            bow_logits = self.bow_head(image_embeds[:, 1:].amax(1)).float()
            if cfg.bow_loss == "binary":
                loss_bow = F.binary_cross_entropy_with_logits(
                    bow_logits, (target > 0).float(), reduction="sum") / B
            else:
                target = target / target.sum(1, keepdim=True).clamp_min(1.0)
                loss_bow = -(target * F.log_softmax(bow_logits, dim=1)).sum(1).mean()
        else:
            loss_bow = image_feat.new_zeros(())

        # ---------------------------------------------------------------- MLM
        if cfg.itm_reads_masked_caption:  # the positive ITM pass read the masked caption: MLM shares it
            fused_mlm = fused_pos
        elif cfg.text_aug:  # ITM read the clean caption: MLM's own fusion pass over ITC's masked one
            fused_mlm, _ = self.fusion_encoder(itc_text_embeds, attention_mask, image_kv=image_kv)
        else:
            mlm_text, _ = self.encode_text(mlm_input_ids, attention_mask)
            fused_mlm, _ = self.fusion_encoder(mlm_text, attention_mask, image_kv=image_kv)
        sel = mlm_labels != -100
        if bool(sel.any()):
            mlm_logits = self.mlm_head(fused_mlm[sel]).float()  # (n_masked, vocab)
            loss_mlm = F.cross_entropy(mlm_logits, mlm_labels[sel])
        else:  # keep the head in the graph (DDP) with a zero loss
            loss_mlm = self.mlm_head(fused_mlm[:, :1]).float().sum() * 0.0

        loss = (
            cfg.weight_itc * loss_itc
            + cfg.weight_itm * loss_itm
            + cfg.weight_softmask * loss_softmask
            + cfg.weight_mlm * loss_mlm
            + cfg.weight_bow * loss_bow
        )
        return dict(
            loss=loss,
            loss_itc=loss_itc,
            loss_itm=loss_itm,
            loss_softmask=loss_softmask,
            loss_mlm=loss_mlm,
            loss_bow=loss_bow,
            mask_mean=mask_mean,
        )
