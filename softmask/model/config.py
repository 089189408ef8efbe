"""Configuration of the ALBEF-style model with text-driven soft masks.

:class:`ModelConfig` holds every architectural choice and every loss weight of
the method; :func:`model_preset` gives the two presets:

``tiny``
    fits a 2-core CPU: timm ViT (64 px, patch 8, width 128, 4 blocks, 4 register tokens), BERT width
    128 with 2 text and 2 fusion layers, embed dim 128, queue 1024, no dropout
    (so that ``--impl fused`` and ``--impl reference`` consume the same random
    numbers and agree per step).
``base``
    ALBEF's: ViT-B/16 at 256 px, BERT-base with 6 text and 6 fusion layers
    (BERT layers 6-11 initialize the fusion layers), embed dim 256, queue 65,536,
    Grad-CAM on the third fusion layer (BERT layer 8), as ALBEF's grounding.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, fields
from typing import Optional

__all__ = ["ModelConfig", "model_preset", "PRESETS"]

ATTN_IMPLS = ("auto", "sdpa", "eager")


@dataclass
class ModelConfig:
    # ------------------------------------------------------------------ image encoder (timm ViT)
    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 128
    vision_depth: int = 4
    vision_heads: int = 4
    vision_mlp_ratio: float = 4.0
    vision_drop_path: float = 0.0
    # extra learnable ViT tokens ("registers", Darcet et al. 2024) that are dropped from the image embeddings the
    # fusion encoder sees: without them a ViT can park global information in background patches
    vision_registers: int = 0
    # "patch": ViT's linear patch projection (loads timm / ALBEF weights); "conv": 3x3 stride-2 conv stem;
    # "cnn": the conv stem plus one 3x3 conv at the token resolution (each token sees 4 * patch - 1 pixels)
    vision_stem: str = "patch"
    # None: global self-attention (timm's ViT). r >= 0: every patch token attends only to the patch tokens
    # within r patches (Chebyshev distance) and to no prefix token ([CLS], registers), which attend to all;
    # a patch token's receptive field then grows by r patches per block, as a CNN's does
    vision_attn_radius: Optional[int] = None
    # the ViT's first k blocks, with its patch and position embeddings and [CLS], frozen (no gradient, left out
    # of the optimizer and of the momentum update): their output is computed once per step and the momentum ViT
    # goes on from it, so a frozen block costs one forward a step instead of three passes and the momentum
    # copy's forward (docs/TRAINING_NOTES.md H45). With local attention (vision_attn_radius) no patch token reads
    # [CLS] or the registers, so they keep training: their few rows go through the frozen blocks apart, with
    # their gradient; with global attention they freeze too. Frozen blocks run without stochastic depth (they
    # do not train). 0: every block trains (ALBEF)
    vision_frozen_blocks: int = 0
    # what the ITC image feature reads: "cls" (ALBEF: the [CLS] token) or "max" (the elementwise max over
    # the patch tokens; docs/TRAINING_NOTES.md H8: a ViT learns the shapes data's shapes under max pooling
    # and not through [CLS] within the pretraining budget)
    vision_pool: str = "cls"
    # ------------------------------------------------------------------ text / fusion encoders (BERT layout)
    vocab_size: int = 30522
    hidden_size: int = 128
    num_heads: int = 4
    intermediate_size: int = 512
    text_layers: int = 2
    fusion_layers: int = 2
    # what the fusion encoder's text side reads: "encoder" (ALBEF: the text encoder's output); "embeddings"
    # (BERT's embedding output, word + position: the text encoder then feeds ITC only, and every word's
    # cross-attention query is built by the fusion layers alone; docs/TRAINING_NOTES.md H28); "shared" (the
    # embeddings, through fusion layers whose self-attention and feed-forward are the text layers' own, with
    # cross-attention inserted: BLIP's image-grounded text encoder; needs fusion_layers <= text_layers; H30)
    fusion_text_input: str = "encoder"
    # None: BERT's global self-attention. r >= 0: in every text and fusion self-attention, [CLS] attends to all
    # tokens and every other token only to the tokens within r positions of it ([CLS] excluded), so a word's
    # state describes its phrase, not the caption (docs/TRAINING_NOTES.md H31); cross-attention is unchanged
    text_attn_radius: Optional[int] = None
    max_position_embeddings: int = 64
    type_vocab_size: int = 2
    hidden_dropout: float = 0.0
    attn_dropout: float = 0.0
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    # ------------------------------------------------------------------ contrastive space, momentum, queues
    embed_dim: int = 128
    queue_size: int = 1024
    momentum: float = 0.995
    temperature: float = 0.07
    temperature_min: float = 0.001
    temperature_max: float = 0.5
    # ------------------------------------------------------------------ objectives
    gamma: float = 2.0  # focal ITC exponent; 0 = plain ITC
    alpha: float = 0.4  # momentum-distillation weight (ramped up by the training loop)
    weight_itc: float = 1.0
    weight_itm: float = 1.0
    weight_softmask: float = 1.0
    weight_mlm: float = 1.0
    # caption bag-of-words from the max over the ViT's patch tokens (0: off, no head): which vocabulary words
    # the caption names, a readout of the patches without attention (docs/TRAINING_NOTES.md H10)
    weight_bow: float = 0.0
    # "softmax": cross-entropy against the caption's normalized word counts (H10); "binary": one logistic loss per
    # vocabulary word, "does the caption name it", summed over the vocabulary (H11)
    bow_loss: str = "softmax"
    mlm_prob: float = 0.15
    softmask: bool = True  # False: the --no-softmask ablation
    mask_floor: float = 0.0  # soft mask value on the most word-related patch
    # soft-masked images also in ITM negative pairs, in the clean pairs' 1 : 2 ratio (False: the soft-masked image
    # with its own caption only, always labelled a match, where the dimming itself predicts the label)
    softmask_negatives: bool = True
    # with softmask_negatives: "one" = one of each row's three soft-masked pairs (its positive or one of its two
    # hard negatives), a third of the rows each: B fusion passes, the same 1 : 2 label ratio; "all" = all three
    # (3B passes). Same metrics over 3 seeds, a 7-11 % shorter step (docs/TRAINING_NOTES.md, H12)
    softmask_pairs: str = "one"
    # which caption tokens may be the soft-mask word: "all" (every non-special token) or "content" (not a function
    # word such as "a", "there" or "of", nor punctuation: softmask.data.candidate_word_mask)
    softmask_words: str = "all"
    gradcam_layer: int = 0  # index into the fusion layers (0-based); never the last one
    text_aug: bool = True  # ITC/ITM see the masked-caption view; MLM shares the positive ITM fusion pass
    # with text_aug: False keeps the masked view to ITC alone; ITM and the soft-masked pairs read the clean caption
    # (a masked caption can lose the one word that tells it from its hard negative), MLM gets its own fusion pass
    itm_text_aug: bool = True
    exclude_same_caption_negatives: bool = True  # never sample a hard negative whose caption equals the positive's
    # ------------------------------------------------------------------ execution
    attn_impl: str = "auto"  # "auto": SDPA (xformers on CUDA when installed); "eager": materialized softmax
    op_backend: str = "auto"  # backend of softmask.focal_itc_loss / text_driven_soft_mask

    def __post_init__(self):
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl: expected one of {ATTN_IMPLS}, got {self.attn_impl!r}")
        if not (0 <= self.gradcam_layer < self.fusion_layers):
            raise ValueError(
                f"gradcam_layer: expected an index in [0, {self.fusion_layers}) (fusion layers), got {self.gradcam_layer}"
            )
        if self.softmask and self.gradcam_layer == self.fusion_layers - 1:
            raise ValueError(
                f"gradcam_layer: {self.gradcam_layer} is the last fusion layer, where the [CLS] ITM logit depends on "
                f"no other token's cross-attention output (their Grad-CAM would be 0); use an earlier layer"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if not (0.0 <= self.mask_floor <= 1.0):
            raise ValueError(f"mask_floor: expected a value in [0, 1], got {self.mask_floor}")
        if self.gamma < 0:
            raise ValueError(f"gamma: expected >= 0, got {self.gamma}")
        if not (0.0 <= self.alpha <= 1.0):
            raise ValueError(f"alpha: expected a value in [0, 1], got {self.alpha}")
        if not (0.0 <= self.momentum <= 1.0):
            raise ValueError(f"momentum: expected a value in [0, 1], got {self.momentum}")
        if self.softmask_words not in ("all", "content"):
            raise ValueError(f"softmask_words: expected 'all' or 'content', got {self.softmask_words!r}")
        if self.softmask_pairs not in ("all", "one"):
            raise ValueError(f"softmask_pairs: expected 'all' or 'one', got {self.softmask_pairs!r}")
        if self.vision_stem not in ("patch", "conv", "cnn"):
            raise ValueError(f"vision_stem: expected 'patch', 'conv' or 'cnn', got {self.vision_stem!r}")
        if not (isinstance(self.weight_bow, (int, float)) and not isinstance(self.weight_bow, bool)
                and self.weight_bow >= 0):
            raise ValueError(f"weight_bow: expected a float >= 0, got {self.weight_bow!r}")
        if self.bow_loss not in ("softmax", "binary"):
            raise ValueError(f"bow_loss: expected 'softmax' or 'binary', got {self.bow_loss!r}")
        if not (isinstance(self.mlm_prob, (int, float)) and not isinstance(self.mlm_prob, bool)
                and 0.0 <= self.mlm_prob <= 1.0):
            raise ValueError(f"mlm_prob: expected a value in [0, 1], got {self.mlm_prob!r}")
        if self.fusion_text_input not in ("encoder", "embeddings", "shared"):
            raise ValueError(f"fusion_text_input: expected 'encoder', 'embeddings' or 'shared', "
                             f"got {self.fusion_text_input!r}")
        if self.fusion_text_input == "shared" and self.fusion_layers > self.text_layers:
            raise ValueError(f"fusion_text_input: 'shared' reuses text layer i in fusion layer i; expected "
                             f"fusion_layers <= text_layers, got {self.fusion_layers} > {self.text_layers}")
        if self.vision_pool not in ("cls", "max"):
            raise ValueError(f"vision_pool: expected 'cls' or 'max', got {self.vision_pool!r}")
        for name in ("vision_attn_radius", "text_attn_radius"):
            r = getattr(self, name)
            if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 0):
                raise ValueError(f"{name}: expected None or an int >= 0, got {r!r}")
        k = self.vision_frozen_blocks
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= self.vision_depth:
            raise ValueError(f"vision_frozen_blocks: expected an int in [0, vision_depth = {self.vision_depth}], "
                             f"got {k!r}")
        if self.vision_registers < 0:
            raise ValueError(f"vision_registers: expected >= 0, got {self.vision_registers}")
        if self.queue_size < 0:
            raise ValueError(f"queue_size: expected >= 0, got {self.queue_size}")

    @property
    def itm_reads_masked_caption(self) -> bool:
        """Whether ITM and the soft-masked pairs read the MLM-masked caption (``text_aug`` and ``itm_text_aug``),
        the caption the soft-mask word is drawn from; else they read the clean one."""
        return self.text_aug and self.itm_text_aug

    @property
    def grid(self) -> int:
        """Patches per side: the Grad-CAM maps are ``[grid, grid]``."""
        return self.image_size // self.patch_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"ModelConfig: unknown keys {sorted(unknown)}")
        return cls(**d)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


PRESETS = {
    # 4 ViT registers: colour-word pointing 66.3 % against 55.2 % without (mean of 3 seeds, docs/TRAINING_NOTES.md H5)
    "tiny": dict(vision_registers=4),
    "base": dict(
        image_size=256,
        patch_size=16,
        vision_width=768,
        vision_depth=12,
        vision_heads=12,
        vision_drop_path=0.1,
        hidden_size=768,
        num_heads=12,
        intermediate_size=3072,
        text_layers=6,
        fusion_layers=6,
        max_position_embeddings=512,
        hidden_dropout=0.1,
        attn_dropout=0.1,
        embed_dim=256,
        queue_size=65536,
        gradcam_layer=2,
    ),
}


def model_preset(name: str, **overrides) -> ModelConfig:
    """The ``tiny`` or ``base`` configuration, with ``overrides`` applied."""
    if name not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {name!r}")
    return ModelConfig(**{**PRESETS[name], **overrides})
