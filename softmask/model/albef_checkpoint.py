"""Start from ALBEF's released checkpoints (``ALBEF_4M.pth``, ``ALBEF.pth``, ``mscoco.pth``,
``flickr30k.pth``, ...): read one safely and load it into a :class:`SoftMaskALBEF`.

ALBEF's layout (a dict whose ``"model"`` entry is the state dict):

* ``visual_encoder.*``: ALBEF's ViT, timm's key names (``cls_token``, ``pos_embed``,
  ``patch_embed.proj.*``, ``blocks.N.*``, ``norm.*``); the position embedding is resampled
  (bicubic on the patch grid, as ALBEF's ``interpolate_pos_embed``) when the image size
  differs.
* ``text_encoder.bert.*`` and ``text_encoder.cls.*`` (pretraining checkpoints: a
  ``BertForMaskedLM``), or ``text_encoder.*`` without ``bert.`` (retrieval checkpoints: a
  ``BertModel``). BERT layers ``0 .. text_layers-1`` are the text encoder, the following
  ``fusion_layers`` (with ``crossattention``) the fusion encoder.
* ``vision_proj``, ``text_proj``, ``itm_head``, ``temp``; the momentum copies
  ``visual_encoder_m``, ``text_encoder_m`` (a full BERT: its fusion layers and MLM head have
  no counterpart here, because this model's momentum text encoder stops at the text
  layers), ``vision_proj_m``, ``text_proj_m``.
* the queues ``image_queue`` / ``text_queue`` stored ``[dim, K]`` (here ``[K, dim]``),
  ``queue_ptr`` ``[1]``, and in retrieval checkpoints ``idx_queue`` ``[1, K]``.

Files are read with ``torch.load(weights_only=True)`` (or safetensors), so nothing in them
runs as code. Every model weight must receive a value unless ``partial=True`` or it is
listed in ``allow_missing``; ALBEF's retrieval checkpoints have no MLM head, so fine-tuning
passes ``allow_missing=("mlm_head.",)``.
"""

from __future__ import annotations

import os
import re
from typing import Iterable, Optional

import torch

from softmask.model.pretrained import fit_pos_embed, read_checkpoint_file  # one floor down: pretrained imports nothing from here

__all__ = ["read_checkpoint_file", "albef_key_map", "load_albef_checkpoint", "is_albef_state"]

# keys of ALBEF checkpoints that have no counterpart here, by design
_IGNORED = (
    re.compile(r"^text_encoder(_m)?\.(bert\.)?embeddings\.position_ids$"),
    re.compile(r"^text_encoder_m\.cls\."),
    re.compile(r"^text_encoder\.cls\.predictions\.decoder\.bias$"),  # tied to cls.predictions.bias
)


def is_albef_state(state: dict) -> bool:
    """Whether ``state`` uses ALBEF's key names (rather than this project's)."""
    return any(k.startswith(("text_encoder.bert.", "text_encoder.encoder.")) for k in state)


def albef_key_map(key: str, text_layers: int) -> Optional[str]:
    """This model's key for ALBEF's ``key`` (None: no counterpart here)."""
    m = re.match(r"^(text_encoder(?:_m)?)\.(?:bert\.)?(.*)$", key)
    if m:
        enc, rest = m.group(1), m.group(2)
        momentum = enc.endswith("_m")
        if rest.startswith("embeddings."):
            return f"{enc}.{rest}"
        lm = re.match(r"encoder\.layer\.(\d+)\.(.*)", rest)
        if lm:
            i, tail = int(lm.group(1)), lm.group(2)
            if i < text_layers:
                return f"{enc}.layer.{i}.{tail}"
            return None if momentum else f"fusion_encoder.layer.{i - text_layers}.{tail}"
        if not momentum:
            if rest == "cls.predictions.bias":
                return "mlm_head.decoder.bias"
            lc = re.match(r"cls\.predictions\.(transform\..*|decoder\.weight)$", rest)
            if lc:
                return "mlm_head." + lc.group(1)
        return None
    if key.startswith(("visual_encoder.", "visual_encoder_m.", "vision_proj", "text_proj", "itm_head.")) or key == "temp":
        return key
    if key in ("image_queue", "text_queue", "queue_ptr", "idx_queue"):
        return key
    return None


@torch.no_grad()
def load_albef_checkpoint(model, source, *, partial: bool = False, allow_missing: Iterable[str] = ()) -> dict:
    """Load an ALBEF checkpoint (a path, or a state dict with ALBEF's key names) into ``model``.

    Returns a report: ``loaded`` (how many of the model's tensors received a value),
    ``missing`` (model keys left at their init), ``unexpected`` (checkpoint keys with no
    counterpart, ignored ones excluded), ``ignored`` (ALBEF keys with no counterpart by
    design: the momentum text encoder's fusion layers and MLM head, ``position_ids``),
    ``pos_embed`` (``"kept"`` or ``"resampled P -> P'"``), ``queues`` (``"loaded"`` or why not),
    ``momentum_from_online`` (True when the checkpoint had no momentum copies).

    Raises ``ValueError`` (one line) when a tensor's shape does not fit, or when model
    weights stay unloaded while ``partial`` is False (``allow_missing`` lists key prefixes
    that may stay unloaded, e.g. ``"mlm_head."``).
    """
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        state = read_checkpoint_file(name, what="checkpoint")
    elif isinstance(source, dict):
        name, state = "state dict", {re.sub(r"^module\.", "", k): v for k, v in source.items()}
    else:
        raise TypeError(f"source: expected a checkpoint path or a state dict, got {type(source).__name__}")
    if not is_albef_state(state):
        raise ValueError(
            f"checkpoint {name}: no ALBEF text encoder keys (expected 'text_encoder.bert.*' or 'text_encoder.encoder.*')"
        )
    allow_missing = tuple(allow_missing)
    cfg = model.cfg
    own = model.state_dict()
    report = {"loaded": 0, "missing": [], "unexpected": [], "ignored": [], "pos_embed": "kept", "queues": "not in checkpoint"}
    filled = set()
    mapped = {}
    for k, v in state.items():
        tgt = albef_key_map(k, cfg.text_layers)
        if any(p.match(k) for p in _IGNORED) or (tgt is None and k.startswith("text_encoder_m.")):
            report["ignored"].append(k)
            continue
        if tgt is None:
            report["unexpected"].append(k)
            continue
        if tgt not in own:
            report["unexpected"].append(k)
            continue
        mapped[tgt] = (k, v)

    # queues: ALBEF stores [dim, K]; they are state, not weights, so a size mismatch keeps this model's own
    qkeys = [q for q in ("image_queue", "text_queue") if q in mapped]
    if qkeys:
        shapes = {q: tuple(mapped[q][1].shape) for q in qkeys}
        want = tuple(own["image_queue"].shape[::-1])
        if len(qkeys) == 2 and all(s == want for s in shapes.values()):
            for q in qkeys:
                own[q].copy_(mapped.pop(q)[1].t())
                filled.add(q)
            if "queue_ptr" in mapped:
                own["queue_ptr"].fill_(int(mapped.pop("queue_ptr")[1].reshape(-1)[0]))
                filled.add("queue_ptr")
            if "idx_queue" in mapped:
                own["idx_queue"].copy_(mapped.pop("idx_queue")[1].reshape(-1))
                filled.add("idx_queue")
            report["queues"] = "loaded"
        else:
            for q in ("image_queue", "text_queue", "queue_ptr", "idx_queue"):
                mapped.pop(q, None)
            report["queues"] = f"kept this model's (checkpoint {shapes}, model expects {want})"

    for tgt, (k, v) in mapped.items():
        if tgt.endswith("pos_embed"):
            vit = model.visual_encoder if tgt.startswith("visual_encoder.") else model.visual_encoder_m
            before = v.shape[1]
            v = fit_pos_embed(v, vit, antialias=False)  # as ALBEF's interpolate_pos_embed
            if v.shape[1] != before:
                report["pos_embed"] = f"resampled {before - 1} -> {v.shape[1] - 1 - cfg.vision_registers} patches"
        if tgt == "temp":
            v = v.reshape(())
        if own[tgt].shape != v.shape:
            raise ValueError(
                f"checkpoint {name}: {k} has shape {tuple(v.shape)}, the model's {tgt} expects {tuple(own[tgt].shape)} "
                f"(does the model preset match the checkpoint? ALBEF is the 'base' preset)"
            )
        own[tgt].copy_(v.to(own[tgt].dtype))
        filled.add(tgt)

    # momentum copies: taken from the online weights when the checkpoint has none
    mom_prefixes = ("visual_encoder_m.", "text_encoder_m.", "vision_proj_m.", "text_proj_m.")
    report["momentum_from_online"] = not any(t.startswith(mom_prefixes) for t in filled)
    if report["momentum_from_online"]:
        model.copy_to_momentum()
        filled |= {k for k in own if k.startswith(mom_prefixes)}

    buffers = {n for n, _ in model.named_buffers()}
    registers = {k for k in own if k.endswith("reg_token")}
    missing = [k for k in own if k not in filled and k not in buffers and k not in registers]
    report["missing"] = missing
    report["registers_kept_init"] = sorted(registers)
    report["loaded"] = len(filled)
    blocking = [k for k in missing if not k.startswith(allow_missing)]
    if blocking and not partial:
        raise ValueError(
            f"checkpoint {name}: {len(blocking)} model weights would stay unloaded, e.g. {blocking[:4]} "
            f"(pass partial=True / --partial-load to accept)"
        )
    return report
