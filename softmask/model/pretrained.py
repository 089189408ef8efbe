"""Load real weights from local paths only (nothing is ever downloaded).

* ``vit_checkpoint``: a timm ViT state dict file (``.safetensors``, or a
  ``torch.save`` file, optionally wrapped in ``{"model": ...}`` / ``{"state_dict": ...}``);
  the position embeddings are resampled when the image size differs.
* ``bert_dir``: a Hugging Face BERT directory (``model.safetensors`` or
  ``pytorch_model.bin``; ``BertModel`` or ``BertForMaskedLM`` keys). BERT layers
  ``0..text_layers-1`` initialize the text encoder, the following
  ``fusion_layers`` layers the fusion encoder's self-attention and feed-forward
  blocks (ALBEF: layers 6-11); the cross-attention stays randomly initialized.
  ``cls.predictions`` initializes the MLM head when present.

The momentum copies are set equal to the loaded online weights.
"""

from __future__ import annotations

import os
import re
from typing import Optional

import torch

__all__ = ["load_pretrained", "bert_key_map", "read_checkpoint_file", "fit_pos_embed"]


def read_checkpoint_file(path: str, *, what: str = "checkpoint") -> dict:
    """The state dict held by ``path`` (``.safetensors``, or a ``torch.save`` file whose dict may
    wrap it under ``model`` / ``state_dict`` / ``module``), read without running any code.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` (one line, naming the
    file) for one that is truncated, tampered with, or not a state dict.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what}: expected a file path, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: {path!r} is not a file")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{what}: {path!r} is not a readable safetensors file ({_first_line(e)})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError (refused global: a tampered file), EOFError/RuntimeError (truncated)
        raise ValueError(
            f"{what}: {path!r} could not be read as plain tensors with torch.load(weights_only=True) "
            f"({type(e).__name__}: {_first_line(e)}); it is truncated, not a checkpoint, or holds objects "
            f"that would run code, which are never loaded"
        ) from None
    for k in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(k), dict):
            obj = obj[k]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{what}: {path!r} holds no state dict (expected a dict of tensors, optionally under 'model')")
    return {re.sub(r"^module\.", "", k): v for k, v in obj.items()}


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:200] if s else type(e).__name__


def _load_state(path: str) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"pretrained weights: {path!r} does not exist (weights load only from local paths)")
    return read_checkpoint_file(path, what="pretrained weights")


def fit_pos_embed(pe: torch.Tensor, vit, *, antialias: bool) -> torch.Tensor:
    """A checkpoint's ViT ``pos_embed [1, 1 + P, D]`` on ``vit``'s patch grid (bicubic, resampled only when the
    grid differs), with ``vit``'s register positions (kept at their init: checkpoints have none) after [CLS].
    ``antialias``: timm's default (True) for timm checkpoints, False as ALBEF's ``interpolate_pos_embed``."""
    from timm.layers import resample_abs_pos_embed

    R = getattr(vit, "num_reg_tokens", 0) if not getattr(vit, "no_embed_class", False) else 0
    target = vit.pos_embed
    if pe.shape[1] - 1 != target.shape[1] - 1 - R:
        pe = resample_abs_pos_embed(pe.float(), new_size=list(vit.patch_embed.grid_size), num_prefix_tokens=1,
                                    antialias=antialias).to(pe.dtype)
    if R:
        pe = torch.cat([pe[:, :1], target[:, 1 : 1 + R].detach().to(pe.dtype), pe[:, 1:]], dim=1)
    return pe


def bert_key_map(key: str, text_layers: int) -> Optional[str]:
    """Map a Hugging Face BERT key to this model's key (None: not used)."""
    key = re.sub(r"^bert\.", "", key)
    if key.startswith("embeddings."):
        return "text_encoder." + key
    m = re.match(r"encoder\.layer\.(\d+)\.(.*)", key)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        if i < text_layers:
            return f"text_encoder.layer.{i}.{rest}"
        return f"fusion_encoder.layer.{i - text_layers}.{rest}"
    m = re.match(r"cls\.predictions\.(transform\..*|decoder\..*)", key)
    if m:
        return "mlm_head." + m.group(1)
    if key == "cls.predictions.bias":
        return "mlm_head.decoder.bias"
    return None


def _bert_state(bert_dir: str) -> dict:
    if not os.path.isdir(bert_dir):
        raise FileNotFoundError(f"bert_dir: {bert_dir!r} is not a directory (a local Hugging Face BERT directory)")
    for name in ("model.safetensors", "pytorch_model.bin"):
        p = os.path.join(bert_dir, name)
        if os.path.exists(p):
            return _load_state(p)
    raise FileNotFoundError(f"bert_dir: {bert_dir!r} holds neither model.safetensors nor pytorch_model.bin")


@torch.no_grad()
def load_pretrained(model, *, vit_checkpoint: Optional[str] = None, bert_dir: Optional[str] = None) -> dict:
    """Load local ViT / BERT weights into ``model`` (a SoftMaskALBEF). Returns a report
    ``{"vit_loaded": n, "bert_loaded": n, "bert_skipped": [...]}``."""
    report = {}
    if vit_checkpoint:
        state = _load_state(vit_checkpoint)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        vit = model.visual_encoder
        if "pos_embed" in state and state["pos_embed"].shape != vit.pos_embed.shape:
            state["pos_embed"] = fit_pos_embed(state["pos_embed"], vit, antialias=True)
        missing, unexpected = vit.load_state_dict(state, strict=False)
        # register tokens (ModelConfig.vision_registers) are not in ordinary ViT checkpoints: they keep their init
        fresh = [k for k in missing if k == "reg_token"]
        missing = [k for k in missing if k != "reg_token"]
        if missing:
            raise ValueError(f"vit_checkpoint {vit_checkpoint}: missing keys {missing[:8]}")
        report["vit_loaded"] = len(state) - len(unexpected)
        report["vit_not_in_checkpoint"] = fresh
    if bert_dir:
        state = _bert_state(bert_dir)
        own = model.state_dict()
        loaded, skipped = 0, []
        for k, v in state.items():
            tgt = bert_key_map(k, model.cfg.text_layers)
            if tgt is None or tgt not in own:
                skipped.append(k)
                continue
            if own[tgt].shape != v.shape:
                raise ValueError(f"bert_dir {bert_dir}: {k} has shape {tuple(v.shape)}, model {tgt} has {tuple(own[tgt].shape)}")
            own[tgt].copy_(v)
            loaded += 1
        report["bert_loaded"], report["bert_skipped"] = loaded, skipped
    model.copy_to_momentum()
    return report
