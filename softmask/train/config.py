"""What a training run is: :class:`TrainConfig` (every setting, checked on construction), the shapes recipe it
resolves to, the defaults of each task, and the config files that set it.

One plain object, as the flags of ``softmask-pretrain`` / ``softmask-finetune`` and config files (``--config``)
map onto its fields; :func:`softmask.train.loop.train` runs it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import typing
from dataclasses import asdict, dataclass
from typing import Optional

from softmask.data.shapes import VARIANTS, is_shapes
from softmask.model import model_preset
from softmask.runs.errors import NO_VALUE, ConfigError
from softmask.train.vision_pretrain import BUILTIN_VIT, BUILTIN_VIT_RADIUS

__all__ = ["TrainConfig", "task_config", "load_config_file", "config_differences", "RUNTIME_FIELDS", "TASKS",
           "TASK_DEFAULTS", "PROGS", "AUTO", "RECIPE_STEPS", "DEFAULT_STEPS", "LEGACY_VALUES",
           "with_legacy_values"]

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
RECIPE_STEPS = 1200  # the shapes recipe's budget: ITM reaches 0.8 / 0.2 (H33-H35, H39)
DEFAULT_STEPS = 800  # elsewhere
# the shapes recipe at half the compute of the 1,200-step default of 2026-12-02 (docs/TRAINING_NOTES.md H45): the
# shipped ViT's first three blocks frozen and shared with the momentum ViT, batches of 33 (19.0 GFLOP a step
# against 39.1; ITM's hard negatives need optimizer steps more than pairs per step)
RECIPE_VISION_FROZEN_BLOCKS = 3
RECIPE_BATCH_SIZE = 33
DEFAULT_BATCH_SIZE = 48  # elsewhere
#: what a run saved before a field existed computed, where that differs from the field's default now: a resumed or
#: replayed older run keeps it
LEGACY_VALUES = {"vision_frozen_blocks": 0}


def with_legacy_values(train: dict) -> dict:
    """A run's saved ``"train"`` settings with the fields it predates set as that run computed them
    (:data:`LEGACY_VALUES`): what resuming, replaying and comparing an older run read."""
    return {**{k: v for k, v in LEGACY_VALUES.items() if k not in train}, **train}


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
    batch_size: Optional[int] = None  # pairs per step and process; None: 33 with the shapes recipe, else 48
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
    # the data's seed (None: ``seed``): the shapes training and held-out items, the order of the batches and the
    # image distortions; ``seed`` alone then sets the model's initialization and each step's randomness (the masked
    # tokens, the hard negatives, the soft-masked words), so that the two causes of a seed's result can be told apart
    data_seed: Optional[int] = None
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
    vision_frozen_blocks: Optional[int] = None
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
        if not is_shapes(self.data) and not self.data.lower().endswith(".json"):
            raise ConfigError("data", self.data, f"expected {', '.join(repr(v) for v in VARIANTS)} or a caption JSON "
                                                 f"file (a path ending in .json)")
        if self.test_data is not None and not self.test_data.lower().endswith(".json"):
            raise ConfigError("test_data", self.test_data, "expected a caption JSON file (a path ending in .json)")
        for name in ("pointing_every", "pointing_size", "num_workers", "warmup_steps", "seed", "holdout",
                     "data_seed"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(name, getattr(self, name), "expected a non-negative integer")
        for name in ("steps", "log_every", "save_every", "eval_k", "epochs", "train_size", "test_size", "threads",
                     "alpha_ramp_steps"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(name, v, "expected a positive integer")
        if self.batch_size is not None and self.batch_size < 2:
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
                       "vision_registers", "vision_attn_radius", "vision_frozen_blocks", "fusion_text_input",
                       "text_attn_radius", "mlm_prob")

    def recipe_applies(self) -> bool:
        """Whether ``vit_checkpoint="auto"`` means the shapes recipe: the ``tiny`` preset on the shapes data,
        started from no checkpoint, with the shipped ViT's architecture (patch stem, no registers, local
        attention of radius 1 or unset) and no BERT weights."""
        return (self.vit_checkpoint == AUTO and self.preset == "tiny" and is_shapes(self.data)
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
        alone reads the masked one), the ViT's first three blocks frozen (``vision_frozen_blocks``) and 1,200
        steps of 33 pairs; settings given explicitly are kept. Measured in the README ("Pretraining") and
        docs/TRAINING_NOTES.md (H18-H22, H31-H40, H45). Elsewhere (another
        preset or data set, a checkpoint to start from, another ViT architecture) ``"auto"`` is a random init,
        the earlier default; ``vit_checkpoint="none"`` asks for that on the shapes data too. ``vision_lr_scale``
        None is 0.1 with the recipe, else 1.0; ``steps`` None is 1,200 with the recipe, else 800; ``batch_size``
        None is 33 with the recipe, else 48."""
        if self.recipe_applies():
            return dataclasses.replace(
                self, vit_checkpoint=BUILTIN_VIT, vision_attn_radius=BUILTIN_VIT_RADIUS,
                vision_lr_scale=RECIPE_VISION_LR_SCALE if self.vision_lr_scale is None else self.vision_lr_scale,
                text_attn_radius=RECIPE_TEXT_ATTN_RADIUS if self.text_attn_radius is None else self.text_attn_radius,
                mask_floor=RECIPE_MASK_FLOOR if self.mask_floor is None else self.mask_floor,
                itm_text_aug=RECIPE_ITM_TEXT_AUG if self.itm_text_aug is None else self.itm_text_aug,
                steps=RECIPE_STEPS if self.steps is None else self.steps,
                vision_frozen_blocks=(RECIPE_VISION_FROZEN_BLOCKS if self.vision_frozen_blocks is None
                                      else self.vision_frozen_blocks),
                batch_size=RECIPE_BATCH_SIZE if self.batch_size is None else self.batch_size)
        if (self.vit_checkpoint == AUTO or self.vision_lr_scale is None or self.steps is None
                or self.batch_size is None):
            return dataclasses.replace(self, vit_checkpoint=None if self.vit_checkpoint == AUTO else self.vit_checkpoint,
                                       vision_lr_scale=1.0 if self.vision_lr_scale is None else self.vision_lr_scale,
                                       steps=DEFAULT_STEPS if self.steps is None else self.steps,
                                       batch_size=DEFAULT_BATCH_SIZE if self.batch_size is None else self.batch_size)
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

    @property
    def data_rng_seed(self) -> int:
        """The seed of the data (``data_seed``, else ``seed``)."""
        return self.seed if self.data_seed is None else self.data_seed

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
        data = with_legacy_values(data["train"])
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
    saved = with_legacy_values(saved)
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
