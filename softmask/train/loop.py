"""The reference training loop of pretraining and retrieval fine-tuning (single process, or DDP under
torchrun).

:func:`train` runs :class:`TrainConfig`; ``softmask-pretrain`` (see :mod:`softmask.train.__main__`) and
``softmask-finetune`` (:mod:`softmask.train.finetune`) are its command lines. One loop serves both
tasks (``TrainConfig.task``): they differ in the objective and the defaults, not in the data order,
the checkpoints, the logging or the evaluation.

* ``"pretrain"``: ITC, ITM, the soft-masked ITM pairs and MLM (ALBEF's pretraining plus the paper's parts).
* ``"retrieval"``: ALBEF's retrieval fine-tuning (``Retrieval.py``): ITC with positive ids (every key with
  the pair's id is a positive: :func:`softmask.focal_itc_loss` ``ids=``), ITM with hard negatives that never
  share an id, the soft-mask branch and the focal weight as configured, no MLM (``weight_mlm`` 0). The
  defaults are :data:`TASK_DEFAULTS` ``["retrieval"]``. ``init_checkpoint`` starts it from a softmask run
  (its model settings and tokenizer are used) or from an ALBEF checkpoint file
  (:func:`softmask.model.albef_checkpoint.load_albef_checkpoint`).

Outputs under ``out``:
``config.json``, ``metrics.jsonl`` (one JSON object per logged step),
``checkpoints/`` (see :mod:`softmask.train.checkpoint`), ``tokenizer/``, ``heldout.json``
when images of a JSON training set are held out for evaluation (see
:mod:`softmask.train.data`), and at the end ``eval.json`` and ``plots/`` (unless
``run_eval`` is False). ``config.json`` holds the run's settings (``"train"``, which
``softmask-pretrain --config`` replays), the model's and ``total_steps``.

Reproducibility: the global RNGs are reseeded at every step from
``(seed, step, rank)`` and the data order is a function of ``(seed, cursor)``
(:mod:`softmask.train.data`), so ``resume`` reproduces an uninterrupted run's
losses exactly; the RNG states are saved in the checkpoints as well.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import os
import re
import sys
import time
import typing
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from softmask.model import ModelConfig, SoftMaskALBEF, model_preset
from softmask.model.pretrained import load_pretrained
from softmask.train.vision_pretrain import BUILTIN_VIT, BUILTIN_VIT_RADIUS, builtin_vit_path
from softmask.train.checkpoint import (
    CheckpointError,
    NoCheckpointError,
    holds_run,
    latest_checkpoint,
    load_checkpoint_config,
    load_model_weights,
    load_train_state,
    remove_stale,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from softmask.train.data import (
    NO_VALUE,
    ConfigError,
    EpochBatches,
    annotate_eval,
    batch_stream,
    mix_seed,
    prepare_data,
    print_notes,
)

__all__ = ["TrainConfig", "train", "NonFiniteLossError", "ConfigError", "build_model", "LOSS_TERMS",
           "load_config_file", "config_differences", "check_device", "RUNTIME_FIELDS", "TASKS", "TASK_DEFAULTS",
           "PROGS", "task_config"]

#: ``TrainConfig.vit_checkpoint`` default: the shapes recipe where it applies (:meth:`TrainConfig.resolved`)
AUTO = "auto"
RECIPE_VISION_LR_SCALE = 0.1  # the shapes recipe's ViT lr relative to lr (docs/TRAINING_NOTES.md H20)
RECIPE_TEXT_ATTN_RADIUS = 1  # the shapes recipe's local text self-attention (docs/TRAINING_NOTES.md H31)
# the shapes recipe's soft mask at the word's most tied patch: three quarters of its contrast kept (docs/TRAINING_NOTES.md
# H32: 0.5 against 0 raised pointing and ITM; H40: 0.75 against 0.5 raised colour pointing 6-8 points)
RECIPE_MASK_FLOOR = 0.75
# the shapes recipe's ITM (and soft-masked pairs) read the clean caption, ITC alone the masked one: a masked caption
# can lose the word that tells it from its hard negative (docs/TRAINING_NOTES.md H38-H40)
RECIPE_ITM_TEXT_AUG = False
RECIPE_STEPS = 1200  # the shapes recipe's budget: ITM reaches 0.8 / 0.2 (H33-H35, H39); 587 s on 2 cores
DEFAULT_STEPS = 800  # elsewhere

LOSS_TERMS = ("loss_itc", "loss_itm", "loss_softmask", "loss_mlm", "loss_bow")
TASKS = ("pretrain", "retrieval")
PROGS = {"pretrain": "softmask-pretrain", "retrieval": "softmask-finetune"}  # the command of each task

# Settings of a task that differ from TrainConfig's defaults (which are pretraining's). Fine-tuning the tiny
# pretrained shapes model: see the README's "Fine-tune for retrieval" for what these gave (measured there).
TASK_DEFAULTS = {
    "pretrain": {},
    "retrieval": {
        "steps": 300,  # not swept: 14,400 pairs, about one pass over the 16,384 training pairs
        # checked on the seed-3 split, one run each (bench_results/finetune/lr_sweep.json): mean R 59.2 at 5e-5,
        # 61.6 at 1e-4, 61.3 at 2e-4 (pretrained: 57.4); ALBEF fine-tunes at a tenth of its pretraining lr
        "lr": 1e-4,
        "warmup_steps": 20,
        "weight_mlm": 0.0,  # no MLM in fine-tuning (ALBEF's Retrieval.py); the masked-token labels are skipped
        "text_aug": False,  # ITC / ITM on the clean caption, as ALBEF fine-tunes
        "use_ids": True,
        # the weights come from --checkpoint (a model, not a ViT); without one, everything starts from random init
        "vit_checkpoint": None,
        "pointing_every": 0,
        "save_every": 100,
        "out": "runs/finetune-tiny",
    },
}


def task_config(task: str = "pretrain", **fields) -> "TrainConfig":
    """``TrainConfig(task=task, **{**TASK_DEFAULTS[task], **fields})``: the settings of ``task`` with its
    own defaults (those of :data:`TASK_DEFAULTS`) under the given ``fields``."""
    if task not in TASK_DEFAULTS:
        raise ConfigError("task", task, f"expected one of {', '.join(repr(t) for t in TASKS)}")
    return TrainConfig(task=task, **{**TASK_DEFAULTS[task], **fields})


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; the run stopped before the optimizer step."""


# Fields that change how a run is executed, logged or evaluated, not what it computes: a resumed run may
# change them (``vit_checkpoint`` / ``bert_dir`` only initialize the weights, which a resume overwrites).
RUNTIME_FIELDS = ("out", "resume", "run_eval", "progress", "device", "num_workers", "threads", "log_every",
                  "save_every", "pointing_every", "pointing_size", "test_data", "test_image_root", "eval_k",
                  "test_size", "vit_checkpoint", "bert_dir")


@dataclass
class TrainConfig:
    """Everything one pretraining run needs (the command line's flags map onto these fields; a
    config file, ``softmask-pretrain --config FILE``, can set any of them: :func:`load_config_file`).

    The defaults are the project's main job: ``tiny`` on 16,384 synthetic shapes pairs, 1,200
    steps of 48 pairs, then evaluation on the 256 held-out pairs, started from the shipped tiny ViT
    with local attention on both sides (the "shapes recipe", see :meth:`resolved`; 587 s in all, evaluation
    included, on the project's quiet 2-core CPU). Model fields left at None keep the preset's value. ``epochs``, when
    set, replaces ``steps``: the run takes ``epochs`` passes over the training set. Every field is
    checked on construction (type and range); a bad one raises :class:`ConfigError` naming it.
    """

    # "pretrain" or "retrieval" (fine-tuning): the objective (see the module docstring and TASK_DEFAULTS)
    task: str = "pretrain"
    preset: str = "tiny"
    data: str = "shapes"
    image_root: Optional[str] = None
    # held-out evaluation set (caption JSON); without it, a JSON training set gives ``holdout`` images to
    # evaluation (see softmask.train.data)
    test_data: Optional[str] = None
    test_image_root: Optional[str] = None
    holdout: int = 1000
    tokenizer: Optional[str] = None  # None/"shapes": the shapes WordPiece tokenizer; else a local HF directory
    steps: Optional[int] = None  # None: 1,200 with the shapes recipe, else 800 (see resolved)
    epochs: Optional[int] = None  # passes over the training set; replaces ``steps`` when set
    batch_size: int = 48
    lr: float = 5e-4
    min_lr_ratio: float = 0.02
    weight_decay: float = 0.02
    warmup_steps: int = 60
    grad_clip: float = 5.0
    temp_lr_scale: float = 0.1  # the temperature's learning rate relative to lr (see _param_groups)
    # the online ViT's learning rate relative to lr (0: frozen); None: 0.1 with the shapes recipe (a pretrained
    # ViT fine-tuned at a tenth of the lr, docs/TRAINING_NOTES.md H20), else 1.0
    vision_lr_scale: Optional[float] = None
    seed: int = 0
    out: str = "runs/softmask-tiny"
    impl: str = "fused"  # "fused": default op backends + SDPA; "reference": backend="reference" + eager attention
    device: Optional[str] = None
    log_every: int = 10
    save_every: int = 200
    resume: bool = False
    run_eval: bool = True
    num_workers: Optional[int] = None  # data loader worker processes (None: auto_num_workers(device))
    max_len: int = 24
    train_size: Optional[int] = 16384  # shapes only; None: the data set's default
    test_size: Optional[int] = None
    alpha_ramp_steps: Optional[int] = None  # None: 20 % of the steps
    # the ViT's initial weights: a local timm ViT file, "shapes-objects" (the shipped tiny ViT pretrained on
    # labelled single-object images, softmask.train.vision_pretrain), None / "none" (random init), or "auto":
    # the shapes recipe where it applies, else random init (see resolved())
    vit_checkpoint: Optional[str] = AUTO
    bert_dir: Optional[str] = None
    # the weights training starts from: a softmask run or checkpoint directory (its model settings and tokenizer
    # are used; the objective's settings given here replace its own), or an ALBEF checkpoint file
    init_checkpoint: Optional[str] = None
    partial_load: bool = False  # an ALBEF checkpoint may leave model weights at their init (listed in the log)
    # pass every pair's positive id (the batch's "ids") to the model: ITC positives and ITM negatives by id
    use_ids: bool = False
    progress: bool = True
    threads: Optional[int] = None  # torch intra-op threads (None: torch's default, one per core)
    # model overrides (None keeps the preset's value)
    gamma: Optional[float] = None
    alpha: Optional[float] = None
    softmask: Optional[bool] = None
    mask_floor: Optional[float] = None
    softmask_negatives: Optional[bool] = None
    softmask_pairs: Optional[str] = None
    softmask_words: Optional[str] = None
    fusion_layers: Optional[int] = None
    momentum: Optional[float] = None
    vision_stem: Optional[str] = None
    vision_registers: Optional[int] = None
    vision_attn_radius: Optional[int] = None
    fusion_text_input: Optional[str] = None
    text_attn_radius: Optional[int] = None
    mlm_prob: Optional[float] = None
    gradcam_layer: Optional[int] = None
    weight_itc: Optional[float] = None
    weight_itm: Optional[float] = None
    weight_softmask: Optional[float] = None
    weight_mlm: Optional[float] = None
    queue_size: Optional[int] = None
    text_aug: Optional[bool] = None
    itm_text_aug: Optional[bool] = None
    # image half of the multi-modal augmentation: caption-safe RandAugment on the training crops
    image_aug: bool = True
    eval_k: int = 16
    # grounding watched during training: the pointing game on the first ``pointing_size`` held-out shapes
    # items every ``pointing_every`` steps (and before the first step), logged to metrics.jsonl (0: off)
    pointing_every: int = 100
    pointing_size: int = 64

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), hints[f.name])
        if self.task not in TASKS:
            raise ConfigError("task", self.task, f"expected one of {', '.join(repr(t) for t in TASKS)}")
        if self.init_checkpoint is not None and (self.vit_checkpoint not in (None, "none", AUTO) or self.bert_dir):
            raise ConfigError("init_checkpoint", self.init_checkpoint, "expected either a checkpoint to start from "
                                                                       "or ViT / BERT weights (vit_checkpoint, "
                                                                       "bert_dir), not both")
        if self.vit_checkpoint == BUILTIN_VIT and (self.preset != "tiny" or self.vision_attn_radius != BUILTIN_VIT_RADIUS):
            raise ConfigError("vit_checkpoint", self.vit_checkpoint,
                              f"the shipped ViT is the tiny preset's with local attention of radius "
                              f"{BUILTIN_VIT_RADIUS}; expected preset 'tiny' and vision_attn_radius {BUILTIN_VIT_RADIUS} "
                              f"(--vision-attn-radius {BUILTIN_VIT_RADIUS}; configs/tiny_pretrained_vit.json sets both), "
                              f"got preset {self.preset!r} and vision_attn_radius {self.vision_attn_radius!r}")
        if (self.init_checkpoint is not None and os.path.isfile(self.init_checkpoint)
                and self.fusion_text_input not in (None, "encoder")):
            raise ConfigError("fusion_text_input", self.fusion_text_input,
                              f"an ALBEF checkpoint ({self.init_checkpoint}) holds fusion layers trained on the text "
                              f"encoder's output; expected 'encoder' (or leave it out)")
        if self.partial_load and self.init_checkpoint is None:
            raise ConfigError("partial_load", NO_VALUE, "only applies to a checkpoint to start from "
                                                        "(init_checkpoint, --checkpoint)")
        if self.preset not in ("tiny", "base"):
            raise ConfigError("preset", self.preset, "expected 'tiny' or 'base'")
        if self.impl not in ("fused", "reference"):
            raise ConfigError("impl", self.impl, "expected 'fused' or 'reference'")
        if self.data != "shapes" and not self.data.lower().endswith(".json"):
            raise ConfigError("data", self.data, "expected 'shapes' or a caption JSON file (a path ending in .json)")
        if self.test_data is not None and not self.test_data.lower().endswith(".json"):
            raise ConfigError("test_data", self.test_data, "expected a caption JSON file (a path ending in .json)")
        for name in ("pointing_every", "pointing_size", "num_workers", "warmup_steps", "seed", "holdout"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(name, getattr(self, name), "expected a non-negative integer")
        for name in ("steps", "log_every", "save_every", "eval_k", "epochs", "train_size", "test_size", "threads",
                     "alpha_ramp_steps"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(name, v, "expected a positive integer")
        if self.batch_size < 2:
            raise ConfigError("batch_size", self.batch_size, "expected an integer >= 2 (every pair's hard ITM "
                                                             "negative is another pair of its batch)")
        if self.max_len < 3:
            raise ConfigError("max_len", self.max_len, "expected an integer >= 3 ([CLS], a word and [SEP])")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError("lr", self.lr, "expected a finite number > 0")
        for name in ("weight_decay", "grad_clip", "temp_lr_scale", "vision_lr_scale"):
            v = getattr(self, name)
            if v is not None and not (v >= 0 and math.isfinite(v)):
                raise ConfigError(name, v, "expected a finite number >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("min_lr_ratio", self.min_lr_ratio, "expected a number in [0, 1]")
        over = {k: getattr(self, k) for k in self.MODEL_OVERRIDES if getattr(self, k) is not None}
        try:
            model_preset(self.preset, **over)
        except ValueError as e:  # ModelConfig's messages start with the field's name
            m = re.match(r"(\w+)[: ]\s*(.*)", str(e))
            name = m.group(1) if m and m.group(1) in over else "preset"
            raise ConfigError(name, over.get(name, self.preset), m.group(2) if m and name in over else str(e)) from None

    MODEL_OVERRIDES = ("gamma", "alpha", "softmask", "mask_floor", "softmask_negatives", "softmask_pairs",
                       "softmask_words", "gradcam_layer", "weight_itc", "weight_itm",
                       "weight_softmask", "weight_mlm", "queue_size", "text_aug", "itm_text_aug",
                       "fusion_layers", "momentum", "vision_stem",
                       "vision_registers", "vision_attn_radius", "fusion_text_input", "text_attn_radius", "mlm_prob")

    def recipe_applies(self) -> bool:
        """Whether ``vit_checkpoint="auto"`` means the shapes recipe: the ``tiny`` preset on the shapes data,
        started from no checkpoint, with the shipped ViT's architecture (patch stem, no registers, local
        attention of radius 1 or unset) and no BERT weights."""
        return (self.vit_checkpoint == AUTO and self.preset == "tiny" and self.data == "shapes"
                and self.init_checkpoint is None and self.bert_dir is None
                and self.vision_stem in (None, "patch") and self.vision_registers in (None, 0)
                and self.vision_attn_radius in (None, BUILTIN_VIT_RADIUS))

    def resolved(self) -> "TrainConfig":
        """This config with its automatic settings made concrete (a run saves and replays this one).

        ``vit_checkpoint="auto"`` (the default) is the *shapes recipe* where :meth:`recipe_applies`: the shipped
        tiny ViT (``"shapes-objects"``) with its local attention of radius 1 (``vision_attn_radius``), trained
        at a tenth of the lr (``vision_lr_scale`` 0.1), local text self-attention of radius 1
        (``text_attn_radius``), soft masks that keep three quarters of the contrast of the word's most tied patch
        (``mask_floor`` 0.75), ITM and the soft-masked pairs on the clean caption (``itm_text_aug`` False: ITC
        alone reads the masked one) and 1,200 steps; settings given explicitly are kept. Measured in the README
        ("Pretraining") and docs/TRAINING_NOTES.md (H18-H22, H31-H40). Elsewhere (another
        preset or data set, a checkpoint to start from, another ViT architecture) ``"auto"`` is a random init,
        the earlier default; ``vit_checkpoint="none"`` asks for that on the shapes data too. ``vision_lr_scale``
        None is 0.1 with the recipe, else 1.0; ``steps`` None is 1,200 with the recipe, else 800."""
        if self.recipe_applies():
            return dataclasses.replace(
                self, vit_checkpoint=BUILTIN_VIT, vision_attn_radius=BUILTIN_VIT_RADIUS,
                vision_lr_scale=RECIPE_VISION_LR_SCALE if self.vision_lr_scale is None else self.vision_lr_scale,
                text_attn_radius=RECIPE_TEXT_ATTN_RADIUS if self.text_attn_radius is None else self.text_attn_radius,
                mask_floor=RECIPE_MASK_FLOOR if self.mask_floor is None else self.mask_floor,
                itm_text_aug=RECIPE_ITM_TEXT_AUG if self.itm_text_aug is None else self.itm_text_aug,
                steps=RECIPE_STEPS if self.steps is None else self.steps)
        if self.vit_checkpoint == AUTO or self.vision_lr_scale is None or self.steps is None:
            return dataclasses.replace(self, vit_checkpoint=None if self.vit_checkpoint == AUTO else self.vit_checkpoint,
                                       vision_lr_scale=1.0 if self.vision_lr_scale is None else self.vision_lr_scale,
                                       steps=DEFAULT_STEPS if self.steps is None else self.steps)
        return self

    def model_config(self, tokenizer):
        cfg = self.resolved()
        over = {k: getattr(cfg, k) for k in cfg.MODEL_OVERRIDES if getattr(cfg, k) is not None}
        reference = cfg.impl == "reference"
        return model_preset(
            cfg.preset,
            vocab_size=len(tokenizer),
            pad_token_id=int(tokenizer.pad_token_id),
            attn_impl="eager" if reference else "auto",
            op_backend="reference" if reference else "auto",
            **over,
        )

    def to_dict(self) -> dict:
        return asdict(self)


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _check_type(name: str, value, hint) -> None:
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) is typing.Union and type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else hint
    if value is None and optional:
        return
    if base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, base)
    if not ok:
        raise ConfigError(name, value, f"expected {_TYPE_WORDS.get(base, base.__name__)}"
                                       f"{' or null' if optional else ''}, got {type(value).__name__}")


# Top-level keys of a run's own ``config.json`` besides ``"train"`` (derived from it; ignored when replayed).
_RUN_CONFIG_KEYS = ("model", "tokenizer_dir", "world_size", "total_steps", "vit_weights")


def load_config_file(path: str) -> dict:
    """The TrainConfig fields a config file sets (``{field: value}``, not yet validated: construct a
    :class:`TrainConfig` with them).

    ``path`` is JSON (``.json``) or YAML (``.yaml`` / ``.yml``, needs PyYAML). The file is a mapping of
    TrainConfig fields, or a run's own ``config.json`` (its ``"train"`` mapping is used, so the file
    replays the run). Keys that start with ``_`` are comments. In YAML, a number written as a string
    (PyYAML reads ``1e-4`` as one) is accepted for a number field.

    Raises:
        ConfigError (field ``config``): the file is missing, unreadable, not a mapping, has an unknown
            key (named, with the closest field), or is YAML without PyYAML.
    """
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".json", ".yaml", ".yml"):
        raise ConfigError("config", path, "expected a .json, .yaml or .yml file")
    if not os.path.isfile(path):
        raise ConfigError("config", path, "no such file (expected a JSON or YAML file of TrainConfig fields)")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if ext == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError("config", path, f"not valid JSON ({e})") from None
    else:
        try:
            import yaml
        except ImportError:
            raise ConfigError("config", path, "YAML config files need PyYAML, which is not installed here "
                                              "(pip install pyyaml), or write the file as JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError("config", path, f"not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError("config", path, f"expected a mapping of TrainConfig fields, got {type(data).__name__}")
    if isinstance(data.get("train"), dict):  # a run's own config.json
        extra = [k for k in data if k != "train" and k not in _RUN_CONFIG_KEYS and not str(k).startswith("_")]
        if extra:
            raise ConfigError("config", path, f"unknown top-level key {extra[0]!r} in a run config (expected "
                                              f"'train' and {', '.join(repr(k) for k in _RUN_CONFIG_KEYS)})")
        data = data["train"]
    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for key, value in data.items():
        if str(key).startswith("_"):
            continue
        if key not in hints or key == "MODEL_OVERRIDES":
            close = difflib.get_close_matches(str(key), [f.name for f in dataclasses.fields(TrainConfig)], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError("config", path, f"unknown key {key!r} (expected TrainConfig fields{hint})")
        base = [a for a in typing.get_args(hints[key]) if a is not type(None)] or [hints[key]]
        if base[0] is float and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        out[key] = value
    return out


def config_differences(cfg: "TrainConfig", saved: dict) -> list:
    """``[(field, saved_value, value), ...]`` for the fields that change what a run computes
    (all but :data:`RUNTIME_FIELDS`) on which ``cfg`` differs from ``saved`` (a checkpoint's
    ``"train"`` settings; fields it lacks, from older versions, count as their defaults). ``steps``
    is ignored when both use ``epochs``."""
    defaults = TrainConfig().to_dict()
    now = cfg.to_dict()
    diffs = []
    for name, value in now.items():
        if name in RUNTIME_FIELDS:
            continue
        if name == "steps" and now.get("epochs") is not None and saved.get("epochs") is not None:
            continue
        old = saved.get(name, defaults[name])
        if old != value:
            diffs.append((name, old, value))
    return diffs


def check_device(spec: Optional[str], field: str = "device") -> torch.device:
    """``torch.device(spec)`` (None: cpu) after checking that it exists on this machine.

    Raises:
        ConfigError: not a device string, or its backend (CUDA, MPS, XPU, ...) is not available here,
            or the index is beyond the devices present.
    """
    if spec is None:
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(field, spec, "not a device; expected cpu, cuda, cuda:N or another torch device "
                                       "available here") from None
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)
    if device.type == "mps":
        backend = getattr(torch.backends, "mps", None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        what = "CUDA is not available on this machine (torch.cuda.is_available() is False)" if device.type == "cuda" \
            else f"no {device.type} device is available on this machine"
        raise ConfigError(field, spec, f"{what}; expected cpu or an available device")
    count = getattr(backend, "device_count", None)
    if device.index is not None and count is not None and device.index >= count():
        raise ConfigError(field, spec, f"this machine has {count()} {device.type} device(s); expected an index below "
                                       f"{count()}")
    return device


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


def _lr_lambda(warmup: int, total: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return f


def _param_groups(model: torch.nn.Module, weight_decay: float, lr: float, temp_lr_scale: float,
                  frozen: tuple = (), vision_lr_scale: float = 1.0):
    """AdamW groups: weights with decay; biases, norms, embeddings without; the temperature alone
    at ``lr * temp_lr_scale``. At the tiny preset's lr 5e-4 (5x ALBEF's 1e-4), the temperature
    trained at the full lr fell from 0.07 to 0.004 in 800 steps, and text-to-image retrieval on the
    held-out shapes dropped (ITC IR@1 3.1 % against TR@1 12.9 %). Parameters whose names start with
    one of ``frozen`` are left out. The online ViT (``visual_encoder.``) trains at ``lr * vision_lr_scale``
    (0: frozen, left out)."""
    decay, no_decay, temp, vdecay, vno_decay = [], [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or name.startswith(frozen):
            continue
        if name == "temp":
            temp.append(p)
            continue
        nd = p.dim() < 2 or "embeddings" in name or "pos_embed" in name or "cls_token" in name
        if name.startswith("visual_encoder.") and vision_lr_scale != 1.0:
            if vision_lr_scale > 0:
                (vno_decay if nd else vdecay).append(p)
            continue
        (no_decay if nd else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0},
              {"params": temp, "weight_decay": 0.0, "lr": lr * temp_lr_scale}]
    if vision_lr_scale != 1.0:
        groups += [{"params": vdecay, "weight_decay": weight_decay, "lr": lr * vision_lr_scale},
                   {"params": vno_decay, "weight_decay": 0.0, "lr": lr * vision_lr_scale}]
    return groups


def _dist_info():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _setup_distributed(device_arg: Optional[str]):
    """Initialize the process group under torchrun (WORLD_SIZE > 1). Returns the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = check_device(device_arg)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    if device.type == "cuda":
        if world > 1:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def _write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _truncate_metrics(path: str, last_step: int) -> None:
    """Keep the metrics of steps <= ``last_step`` (a resumed run rewrites the later ones)."""
    if not os.path.exists(path):
        return
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line torn by a kill
                continue
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:  # rewritten under another name: a kill here loses nothing
        for r in rows:
            if r.get("step", 0) <= last_step:
                f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def auto_num_workers(device: str = "cpu", cores: Optional[int] = None) -> int:
    """The data loader's worker processes when ``num_workers`` is None.

    On a GPU, one per core beyond the first, at most 4: a worker builds the next batches (drawing or
    decoding the images, the augmentation, tokenizing) while the GPU trains on this one. On the CPU, none:
    the intra-op threads already use every core, and a worker only competes with them. Measured on the
    2-core machine (150-step runs, run in the order A B C C B A): 1 worker took 79.9 and 86.9 s where
    building each batch between steps took 81.0 and 74.2 s, with 4-25 % more user time
    (benchmarks/NOTES.md). Every item is seeded by its own key, so the batches are the same with any number
    of workers (tested)."""
    if device != "cuda":
        return 0
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cores - 1))


def _set_threads(threads: Optional[int], device: torch.device) -> None:
    """``threads``: a fixed intra-op thread count, or None: torch's default to start with, then
    :class:`_ThreadGuard` picks between all cores and 1 while training."""
    if threads is not None:
        torch.set_num_threads(threads)


#: glibc ``mallopt`` parameters (``malloc.h``)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed blocks for reuse instead of handing them back to the kernel
    (Linux with glibc; elsewhere a no-op). Returns whether the setting took.

    By default glibc serves every block above its mmap threshold with a fresh ``mmap`` and returns it
    with ``munmap`` when freed, and trims the heap's free top; the next tensor of that size then
    touches new pages, and the kernel faults in and zeroes each 4 KiB page again. A CPU training step
    allocates and frees its activations (a ``[48, 69, 512]`` float32 tensor is 6.8 MB) on every step, so
    on the 2-core machine the default job took 6.0 million minor page faults and 59 s of system time.
    Raising the mmap threshold to 1 GiB and switching off trimming keeps the freed memory in the heap,
    where the next step reuses it: 0.3 million faults, 42 s, and the job took 587 s instead of 653 s
    (benchmarks/NOTES.md). The process's resident size stays at its peak instead of shrinking between
    steps. Tensor alignment is PyTorch's own (64 bytes) either way, so the results are bit-identical
    (tested).

    Process-wide: :func:`train` calls it for a CPU run (the training CLIs' process)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # no C library to load, or one without mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # some glibc versions cap the mmap threshold at HEAP_MAX_SIZE / 2 (32 MiB on 64-bit): fall back to the cap
    took = mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1 or mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1
    return took and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1


class _ThreadGuard:
    """Pick the faster intra-op thread count while training (automatic mode only: no ``threads``
    given, CPU, single process).

    Every ``period`` steps it times ``probe`` steps with the other count (all cores, or 1) and
    keeps whichever gave the shorter median step. Measured on the 2-core machine: idle, a tiny
    step takes 0.5 s with 2 threads and 0.7 s with 1; with another job running, 11 s with 2
    OpenMP threads (threads spinning on barriers while one of them is descheduled) and 0.9 s
    with 1. Thread counts change the floating-point reduction order, not the math.
    """

    def __init__(self, enabled: bool, period: int = 100, probe: int = 3, skip: int = 2,
                 prog: str = "softmask-pretrain"):
        self.prog = prog
        self.full = torch.get_num_threads()
        self.enabled = enabled and self.full > 1
        self.period, self.probe, self.skip = period, probe, skip
        self.current = self.full
        self.n = 0
        self.recent: list[float] = []
        self.trial: list[float] = []
        self.trying, self.first, self.since = False, True, 0

    def _other(self) -> int:
        return 1 if self.current == self.full else self.full

    def observe(self, dt: float) -> None:
        if not self.enabled:
            return
        self.n += 1
        if self.n <= self.skip:  # first steps: allocator and caches warming up
            return
        if self.trying:  # this step ran with the other count
            self.trial.append(dt)
            if len(self.trial) == self.probe:
                self._decide()
                self.trying, self.since = False, 0
            return
        self.recent = (self.recent + [dt])[-10:]
        self.since += 1
        base = sorted(self.recent[:-2])[len(self.recent[:-2]) // 2] if len(self.recent) >= 5 else None
        sudden = base is not None and min(self.recent[-2:]) > 3 * base  # another job just took a core
        if sudden:
            self.recent = self.recent[-2:]
        if len(self.recent) >= min(self.probe, 2) and (self.first or sudden or self.since >= self.period):
            self.first, self.trying = False, True
            torch.set_num_threads(self._other())

    def _decide(self) -> None:
        med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        other = self._other()
        if med(self.trial) < 0.9 * med(self.recent[-self.probe:]):
            print(f"{self.prog}: {other} intra-op thread(s) are faster here ({med(self.trial):.2f} s against "
                  f"{med(self.recent[-self.probe:]):.2f} s per step): switching (--threads N fixes the count)", file=sys.stderr)
            self.current = other
            self.recent = list(self.trial)
        torch.set_num_threads(self.current)
        self.trial = []


def _trim_padding(batch: dict) -> dict:
    """Cut the text tensors to the longest caption of the batch (padding columns do no work)."""
    L = int(batch["attention_mask"].sum(1).max())
    return {**batch, "input_ids": batch["input_ids"][:, :L], "attention_mask": batch["attention_mask"][:, :L]}


def _resume_checkpoint(cfg: TrainConfig, out: str, is_main: bool) -> Optional[str]:
    """The checkpoint ``--resume`` continues from (None: no run in ``out``), after checking that its
    settings equal ``cfg``'s (:func:`config_differences`)."""
    ckpt = latest_checkpoint(out, warn=is_main)
    if ckpt is None:
        if holds_run(out):
            raise NoCheckpointError(
                f"--resume: {out} holds a run (metrics.jsonl or checkpoints/) but no loadable checkpoint (expected "
                f"{out}/checkpoints/step_* with model.safetensors, train_state.pt and config.json); not starting "
                f"over on top of it. Remove the directory, or use another --out, to start a new run")
        if is_main:
            print(f"{PROGS[cfg.task]}: --resume: no run in {out}, starting from step 0", file=sys.stderr)
        return None
    try:
        saved = load_checkpoint_config(ckpt)["train"]
    except CheckpointError as e:
        raise ConfigError("resume", NO_VALUE, str(e)) from None
    diffs = config_differences(cfg, saved)
    if diffs:
        what = "; ".join(f"{k}: {_fmt(old)} in the checkpoint, {_fmt(new)} now" for k, old, new in diffs)
        raise ConfigError("resume", NO_VALUE,
                          f"the settings differ from those of the checkpoint {ckpt} ({what}); expected the run's own "
                          f"settings (leave these out, or pass --config {os.path.join(out, 'config.json')}), or "
                          f"another --out for a new run")
    return ckpt


def _fmt(v) -> str:
    return json.dumps(v) if isinstance(v, (str, bool)) or v is None else repr(v)


def _tokenizer(spec: Optional[str], field: str = "tokenizer"):
    """:func:`softmask.data.get_tokenizer`, its errors as :class:`ConfigError` on ``field``."""
    from softmask.data import get_tokenizer

    try:
        return get_tokenizer(spec)
    except (FileNotFoundError, ValueError) as e:
        msg = str(e)
        raise ConfigError(field, NO_VALUE, msg[len("tokenizer: "):] if msg.startswith("tokenizer: ") else msg) from None


def _init_source(cfg: TrainConfig) -> Optional[tuple]:
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


def _model_from_run(cfg: TrainConfig, ckpt: str, field: str):
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
        tokenizer = _tokenizer(cfg.tokenizer)
    else:
        tok_dir = os.path.normpath(os.path.join(ckpt, saved.get("tokenizer_dir", "../../tokenizer")))
        tokenizer = _tokenizer(tok_dir if os.path.isdir(tok_dir) else saved["train"].get("tokenizer"), field)
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


def _load_init(model: SoftMaskALBEF, cfg: TrainConfig, init: tuple, notes: list) -> Optional[dict]:
    """Load the weights training starts from (``init`` from :func:`_init_source`) into ``model``; lines for
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


def train(cfg: TrainConfig) -> dict:
    """Run the training (pretraining or retrieval fine-tuning, ``cfg.task``) described by ``cfg``. Returns
    a summary dict (``out``, ``steps``, ``last_losses``, ``eval`` when evaluated, ``wall_s``, and
    ``init_report`` when it started from an ALBEF checkpoint).

    Raises :class:`ConfigError` (a ValueError naming the setting) for settings that cannot work here: an
    unavailable device, a data or test set that is missing, malformed or without readable images, a
    ``resume`` whose checkpoint has other settings or cannot be loaded, an ``init_checkpoint`` that is
    missing, refused, truncated or does not fit the model."""
    from softmask.data import candidate_word_mask, Collator, mask_tokens

    cfg = cfg.resolved()  # "auto" settings made concrete: config.json records (and replays) what ran
    prog = PROGS[cfg.task]
    t_start = time.time()
    device = _setup_distributed(cfg.device)
    _set_threads(cfg.threads, device)
    if device.type == "cpu":
        keep_freed_memory()
    rank, world = _dist_info()
    is_main = rank == 0
    out = cfg.out
    os.makedirs(out, exist_ok=True)

    if is_main:
        stale = remove_stale(out)  # leftovers of saves interrupted by a kill
        if stale:
            print(f"{prog}: removed {len(stale)} leftover(s) of interrupted checkpoint saves in "
                  f"{out}/checkpoints: {', '.join(stale)}", file=sys.stderr)
    ckpt = _resume_checkpoint(cfg, out, is_main) if cfg.resume else None

    # the model's settings and tokenizer: a softmask checkpoint's own when training starts from one (on resume:
    # the run's checkpoint), else the preset's with the overrides
    init = _init_source(cfg) if ckpt is None else None
    if ckpt is not None and cfg.init_checkpoint is not None:
        mcfg, tokenizer = _model_from_run(cfg, ckpt, "resume")
    elif init is not None and init[0] == "run":
        mcfg, tokenizer = _model_from_run(cfg, init[1], "init_checkpoint")
    else:
        tokenizer = _tokenizer(cfg.tokenizer)
        mcfg = cfg.model_config(tokenizer)
    prepared = prepare_data(cfg, mcfg.image_size, out, write=is_main)
    dataset = prepared.train
    per_epoch = EpochBatches.per_epoch(len(dataset), cfg.batch_size, world)
    if per_epoch == 0:
        raise ConfigError("batch_size", cfg.batch_size,
                          f"expected at most {len(dataset) // world} (the training set has {len(dataset)} pairs"
                          f"{f' for {world} processes' if world > 1 else ''}; one batch must fit in it)")
    total_steps = cfg.steps if cfg.epochs is None else cfg.epochs * per_epoch

    tok_dir = os.path.join(out, "tokenizer")
    model = build_model(cfg, tokenizer, mcfg)
    vit_file = resolve_vit_checkpoint(cfg)  # None with init_checkpoint (TrainConfig allows only one of them)
    init_report = _load_init(model, cfg, init, prepared.notes) if init is not None else None
    model = model.to(device)
    mcfg = model.cfg
    if is_main:
        tokenizer.save_pretrained(tok_dir)
        _write_json_atomic(os.path.join(out, "config.json"),
                           {"train": cfg.to_dict(), "model": mcfg.to_dict(), "tokenizer_dir": "tokenizer",
                            "world_size": world, "total_steps": total_steps,
                            "vit_weights": vit_file})

    # a head without a loss (MLM in fine-tuning) is left out of the optimizer: weight decay would only shrink it
    frozen = ("mlm_head.",) if mcfg.weight_mlm == 0 else ()
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay, cfg.lr, cfg.temp_lr_scale, frozen,
                                                cfg.vision_lr_scale),
                                  lr=cfg.lr, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.warmup_steps, total_steps, cfg.min_lr_ratio))

    step, cursor, num_dropped = 0, 0, 0
    if ckpt is not None:
        try:
            load_model_weights(model, ckpt)
            state = load_train_state(ckpt)
        except CheckpointError as e:
            raise ConfigError("resume", NO_VALUE, f"{e}. Not resumed") from None
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, cursor, num_dropped = state["step"], state["cursor"], state.get("num_dropped", 0)
        set_rng_state(state["rng"])
        if is_main:
            print(f"{prog}: resumed from {ckpt} (step {step})", file=sys.stderr)
    if is_main:  # after every check that can stop the run: an error is the only line of a run that fails
        print_notes(prepared.notes, prog)
        if vit_file and ckpt is None:
            print(f"{prog}: ViT initialized from {vit_file}", file=sys.stderr)
    metrics_path = os.path.join(out, "metrics.jsonl")
    if is_main:
        if ckpt is not None:
            _truncate_metrics(metrics_path, step)
        elif os.path.exists(metrics_path):
            os.remove(metrics_path)

    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )

    collate = Collator(tokenizer, cfg.max_len)
    watch = None  # fixed held-out subset for the pointing game during training (shapes data only)
    if is_main and cfg.pointing_every > 0 and cfg.pointing_size > 0 and cfg.data == "shapes":
        from softmask.data import build_dataset

        watch = build_dataset("shapes", "test", mcfg.image_size, train=False, seed=cfg.seed, size=cfg.pointing_size)

    def watch_grounding():
        from softmask.eval.evaluate import pointing_subset

        res = pointing_subset(model, tokenizer, watch, device=device)
        return {k: res[k] for k in ("pointing_game", "pointing_game_color") if k in res}

    stream = batch_stream(dataset, collate, batch_size=cfg.batch_size, seed=cfg.seed, cursor=cursor, rank=rank,
                          world=world,
                          num_workers=auto_num_workers(device.type) if cfg.num_workers is None
                          else cfg.num_workers)
    ramp = cfg.alpha_ramp_steps if cfg.alpha_ramp_steps is not None else max(1, total_steps // 5)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())

    def train_state():
        return {"step": step, "cursor": cursor, "num_dropped": num_dropped, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": rng_state(), "world_size": world}

    config_dict = {"train": cfg.to_dict(), "model": mcfg.to_dict(), "tokenizer_dir": "../../tokenizer",
                   "total_steps": total_steps}
    bar = None
    if is_main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="pretrain" if cfg.task == "pretrain" else "finetune",
                   dynamic_ncols=True)
    last, window_t, window_n = {}, time.time(), 0
    guard = _ThreadGuard(enabled=cfg.threads is None and device.type == "cpu" and world == 1, prog=prog)
    model.train()
    if watch is not None and step == 0 and total_steps >= cfg.pointing_every:
        with open(metrics_path, "a") as f:
            f.write(json.dumps({"step": 0, **watch_grounding()}) + "\n")
    skipped = 0  # consecutive batches without two usable pairs
    while step < total_steps:
        t_step = time.perf_counter()
        c, batch = next(stream)
        cursor = c + 1
        usable = torch.tensor([float(batch is not None and batch["image"].shape[0] >= 2)])
        if world > 1:  # every rank skips the same steps (a lone skip would leave the others waiting)
            dist.all_reduce(usable, op=dist.ReduceOp.MIN)
        if usable.item() < 1:  # every image of the batch unreadable, or one pair left: no hard negative
            num_dropped += cfg.batch_size if batch is None else batch["num_dropped"] + batch["image"].shape[0]
            skipped += 1
            if skipped >= per_epoch:
                if bar is not None:
                    bar.close()
                raise ConfigError("data", cfg.data, f"no batch of a whole epoch ({per_epoch} batches) had two "
                                                    f"readable images; expected image files that PIL can decode "
                                                    f"(see the warnings above for the files and the reasons)")
            continue
        skipped = 0
        num_dropped += batch["num_dropped"]
        batch = _trim_padding(batch)
        torch.manual_seed(mix_seed(cfg.seed, step, rank, 3))
        gen = torch.Generator().manual_seed(mix_seed(cfg.seed, step, rank, 4))
        mlm_ids, mlm_labels = mask_tokens(batch["input_ids"], tokenizer, prob=mcfg.mlm_prob, generator=gen)
        if mcfg.weight_mlm == 0:  # no MLM (fine-tuning): no token is predicted; the masked view stays for text_aug
            mlm_labels = torch.full_like(mlm_labels, -100)
        view_ids = mlm_ids if mcfg.itm_reads_masked_caption else batch["input_ids"]  # the caption ITM reads
        cand = candidate_word_mask(view_ids, batch["attention_mask"], tokenizer, words=mcfg.softmask_words)
        alpha = mcfg.alpha * min(1.0, step / ramp)
        image = batch["image"].to(device, non_blocking=True)
        with autocast:
            losses = train_model(
                image,
                batch["input_ids"].to(device),
                batch["attention_mask"].to(device),
                mlm_input_ids=mlm_ids.to(device),
                mlm_labels=mlm_labels.to(device),
                word_candidates=cand.to(device),
                alpha=alpha,
                ids=batch["ids"].to(device) if cfg.use_ids else None,
            )
        terms = torch.stack([losses[k].detach().float() for k in LOSS_TERMS])
        finite = torch.isfinite(terms).all().float().reshape(1)
        if world > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() < 1:
            bad = [k for k, v in zip(LOSS_TERMS, terms.tolist()) if not math.isfinite(v)]
            what = ", ".join(f"{k} = {v}" for k, v in zip(LOSS_TERMS, terms.tolist()) if k in bad) or "on another rank"
            good = latest_checkpoint(out)
            if bar is not None:
                bar.close()
            raise NonFiniteLossError(
                f"non-finite loss at step {step + 1}: {what} (term {bad[0] if bad else '?'}); stopped before the "
                f"optimizer step. Last good checkpoint: {good or 'none (no checkpoint was saved yet)'}"
            )
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        step += 1
        window_n += image.shape[0] * world
        guard.observe(time.perf_counter() - t_step)

        pointing_now = watch is not None and step % cfg.pointing_every == 0
        if step % cfg.log_every == 0 or step == total_steps or pointing_now:
            vals = terms.tolist()
            now = time.time()
            row = {"step": step, "loss": float(losses["loss"].detach()),
                   **{k: v for k, v in zip(LOSS_TERMS, vals)},
                   "lr": optimizer.param_groups[0]["lr"], "temperature": float(model.temp.detach()),
                   "alpha": alpha, "mask_mean": float(losses["mask_mean"]),
                   "samples_per_s": window_n / max(now - window_t, 1e-9), "num_dropped": num_dropped}
            if pointing_now:
                row.update(watch_grounding())
            window_t, window_n = time.time(), 0
            last = row
            if is_main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.3f}", itc=f"{vals[0]:.3f}", itm=f"{vals[1]:.3f}",
                                    sm=f"{vals[2]:.3f}", mlm=f"{vals[3]:.3f}", sps=f"{row['samples_per_s']:.0f}")
        if bar is not None:
            bar.update(1)
        if step % cfg.save_every == 0 or step == total_steps:
            if is_main:
                save_checkpoint(out, step, model, train_state(), config_dict)
            if world > 1:
                dist.barrier()
    stream.close()  # the data loader's workers end here, before the evaluation
    if bar is not None:
        bar.close()

    summary = {"out": out, "steps": step, "last_losses": last, "num_dropped": num_dropped,
               "train_wall_s": time.time() - t_start}
    if init_report is not None:
        summary["init_report"] = init_report
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if cfg.run_eval and is_main:
        from softmask.eval.evaluate import evaluate_run

        if prepared.eval_split == "train":
            print_notes(prog=prog, notes=[f"evaluating on the training data ({cfg.data}), not on held-out data: the retrieval numbers "
                         f"measure fit (eval.json: \"eval_on_training_data\": true)"])
        evaluate_run(out, device=device, model=model, tokenizer=tokenizer, k=cfg.eval_k, test_size=cfg.test_size,
                     data=prepared.eval_data, image_root=prepared.eval_image_root)
        summary["eval"] = annotate_eval(os.path.join(out, "eval.json"), prepared.eval_data or cfg.data,
                                        prepared.eval_split)
    summary["wall_s"] = time.time() - t_start
    return summary
