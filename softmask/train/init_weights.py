"""The weights a run starts from: the preset's random init, the ViT / BERT files (``vit_checkpoint``,
``bert_dir``), a softmask run or checkpoint (its model settings and tokenizer), or an ALBEF checkpoint file
(``init_checkpoint``).
"""

from __future__ import annotations

import os
import re
from typing import Optional

import torch

from softmask.model import ModelConfig, SoftMaskALBEF
from softmask.model.pretrained import load_pretrained
from softmask.runs.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint_config, load_model_weights
from softmask.runs.errors import NO_VALUE, ConfigError
from softmask.train.config import TrainConfig
from softmask.train.vision_pretrain import BUILTIN_VIT, builtin_vit_path

__all__ = ["build_model", "resolve_vit_checkpoint", "load_tokenizer", "init_source", "model_from_run", "load_init"]


def build_model(cfg: TrainConfig, tokenizer, mcfg: Optional[ModelConfig] = None) -> SoftMaskALBEF:
    """The model of ``cfg`` (``mcfg``: its settings, default ``cfg.model_config(tokenizer)``), initialized
    from ``cfg.seed`` and, when given, the ViT / BERT weights (``vit_checkpoint``, ``bert_dir``)."""
    cfg = cfg.resolved()
    torch.manual_seed(cfg.seed)
    model = SoftMaskALBEF(mcfg if mcfg is not None else cfg.model_config(tokenizer))
    vit = resolve_vit_checkpoint(cfg)
    if vit or cfg.bert_dir:
        load_pretrained(model, vit_checkpoint=vit, bert_dir=cfg.bert_dir)
    return model


def resolve_vit_checkpoint(cfg: TrainConfig) -> Optional[str]:
    """The ViT weights file ``cfg`` starts from, or None (random init): ``vit_checkpoint`` itself, the
    shipped file for ``"shapes-objects"`` (:data:`softmask.train.vision_pretrain.BUILTIN_VIT`), None for
    None or ``"none"``; ``"auto"`` as :meth:`TrainConfig.resolved` makes it."""
    v = cfg.resolved().vit_checkpoint
    if v is None or v == "none":
        return None
    return builtin_vit_path() if v == BUILTIN_VIT else v


def load_tokenizer(spec: Optional[str], field: str = "tokenizer"):
    """:func:`softmask.data.get_tokenizer`, its errors as :class:`ConfigError` on ``field``."""
    from softmask.data import get_tokenizer

    try:
        return get_tokenizer(spec)
    except (FileNotFoundError, ValueError) as e:
        msg = str(e)
        raise ConfigError(field, NO_VALUE, msg[len("tokenizer: "):] if msg.startswith("tokenizer: ") else msg) from None


def init_source(cfg: TrainConfig) -> Optional[tuple]:
    """What ``cfg.init_checkpoint`` names: ``("run", checkpoint_dir)`` for a softmask run or checkpoint directory
    (or its ``model.safetensors``), ``("albef", path)`` for any other file (an ALBEF checkpoint), None when
    unset. Raises :class:`ConfigError` when it names nothing loadable."""
    path = cfg.init_checkpoint
    if path is None:
        return None
    if os.path.isdir(path):
        ckpt = latest_checkpoint(path, warn=False)
        if ckpt is None:
            raise ConfigError("init_checkpoint", path, "no softmask checkpoint in this directory (expected a run "
                                                       "directory with checkpoints/, a checkpoint directory holding "
                                                       "model.safetensors and config.json, or an ALBEF checkpoint "
                                                       "file)")
        source = ("run", ckpt)
    elif os.path.isfile(path):
        folder = os.path.dirname(path) or "."
        if os.path.basename(path) == "model.safetensors" and os.path.isfile(os.path.join(folder, "config.json")):
            source = ("run", folder)
        else:
            return "albef", path
    else:
        raise ConfigError("init_checkpoint", path, "no such file or directory (expected a softmask run or "
                                                   "checkpoint directory, or an ALBEF checkpoint file such as "
                                                   "ALBEF_4M.pth)")
    if cfg.partial_load:
        raise ConfigError("partial_load", NO_VALUE, f"only applies to an ALBEF checkpoint file; the softmask "
                                                    f"checkpoint {source[1]} must fit the model exactly")
    return source


# ModelConfig fields that shape the weights: a model started from a softmask checkpoint keeps its checkpoint's
_ARCHITECTURE = ("fusion_layers", "vision_stem", "vision_registers", "vision_attn_radius", "queue_size",
                 "fusion_text_input", "text_attn_radius")


def model_from_run(cfg: TrainConfig, ckpt: str, field: str):
    """``(ModelConfig, tokenizer)`` of a model that starts from the softmask checkpoint ``ckpt``: the
    checkpoint's model settings, with the objective's settings that ``cfg`` gives (gamma, alpha, softmask,
    loss weights, text_aug, ...) replacing its own, and the checkpoint's tokenizer (``cfg.tokenizer`` when
    given: its vocabulary must be the checkpoint's). ``field`` names the setting in errors."""
    try:
        saved = load_checkpoint_config(ckpt)
        base = ModelConfig.from_dict(saved.get("model") or {})
    except (CheckpointError, ValueError, TypeError) as e:
        raise ConfigError(field, NO_VALUE, f"checkpoint {ckpt}: {e}") from None
    saved_preset = saved["train"].get("preset", "tiny")
    if cfg.preset != saved_preset:
        raise ConfigError("preset", cfg.preset, f"the checkpoint {ckpt} holds a {saved_preset!r} model; expected "
                                                f"{saved_preset!r} (or leave the preset out)")
    for name in _ARCHITECTURE:
        value = getattr(cfg, name)
        if value is not None and value != getattr(base, name):
            raise ConfigError(name, value, f"the checkpoint {ckpt} has {name} = {getattr(base, name)!r}; a model "
                                           f"started from it keeps its architecture (leave {name} out)")
    if cfg.tokenizer is not None:
        tokenizer = load_tokenizer(cfg.tokenizer)
    else:
        tok_dir = os.path.normpath(os.path.join(ckpt, saved.get("tokenizer_dir", "../../tokenizer")))
        tokenizer = load_tokenizer(tok_dir if os.path.isdir(tok_dir) else saved["train"].get("tokenizer"), field)
    if len(tokenizer) != base.vocab_size or int(tokenizer.pad_token_id) != base.pad_token_id:
        raise ConfigError("tokenizer", cfg.tokenizer or NO_VALUE,
                          f"{len(tokenizer)} tokens (padding id {tokenizer.pad_token_id}), but the checkpoint {ckpt} "
                          f"was trained with {base.vocab_size} (padding id {base.pad_token_id}); expected its "
                          f"tokenizer (leave --tokenizer out to use the one saved with it)")
    reference = cfg.impl == "reference"
    over = {k: getattr(cfg, k) for k in cfg.MODEL_OVERRIDES if k not in _ARCHITECTURE and getattr(cfg, k) is not None}
    try:
        mcfg = base.replace(**over, attn_impl="eager" if reference else "auto",
                            op_backend="reference" if reference else "auto")
    except ValueError as e:
        m = re.match(r"(\w+)[: ]\s*(.*)", str(e))
        name = m.group(1) if m and m.group(1) in over else field
        raise ConfigError(name, over.get(name, NO_VALUE), m.group(2) if m and name in over else str(e)) from None
    return mcfg, tokenizer


def load_init(model: SoftMaskALBEF, cfg: TrainConfig, init: tuple, notes: list) -> Optional[dict]:
    """Load the weights training starts from (``init`` from :func:`init_source`) into ``model``; lines for
    the log go to ``notes``. Returns the ALBEF load report (None for a softmask checkpoint)."""
    kind, path = init
    if kind == "run":
        try:
            load_model_weights(model, path)
        except (CheckpointError, ValueError) as e:
            raise ConfigError("init_checkpoint", NO_VALUE, str(e)) from None
        notes.append(f"started from the softmask checkpoint {path} (every weight, the queues and the temperature)")
        return None
    from softmask.model.albef_checkpoint import load_albef_checkpoint

    allow = ("mlm_head.",) if model.cfg.weight_mlm == 0 else ()  # ALBEF's retrieval checkpoints have no MLM head
    try:
        report = load_albef_checkpoint(model, path, allow_missing=allow, partial=cfg.partial_load)
    except (FileNotFoundError, ValueError) as e:
        msg = str(e)
        if "word_embeddings" in msg:
            msg += (f"; the vocabulary is the tokenizer's ({model.cfg.vocab_size} tokens): ALBEF's checkpoints need "
                    f"bert-base-uncased's tokenizer directory (--tokenizer)")
        raise ConfigError("init_checkpoint", NO_VALUE, msg) from None
    missing = report["missing"]
    notes.append(f"started from the ALBEF checkpoint {path}: {report['loaded']} tensors loaded, "
                 f"{len(missing)} missing (left at their init{': ' + ', '.join(missing[:4]) if missing else ''}"
                 f"{', ...' if len(missing) > 4 else ''}), {len(report['unexpected'])} unexpected, "
                 f"{len(report['ignored'])} ignored (no counterpart here by design); pos_embed {report['pos_embed']}, "
                 f"queues {report['queues']}, momentum copies "
                 f"{'from the online weights' if report['momentum_from_online'] else 'loaded'}")
    return report
