"""``softmask-pretrain`` / ``python -m softmask.train``: the pretraining command line, and the code it
shares with ``softmask-finetune`` (:mod:`softmask.train.finetune`, the same flags plus ``--checkpoint``,
``--partial-load``, ``--no-ids`` and ``--text-aug``, with the retrieval task's defaults).

With no arguments: the ``tiny`` preset on the synthetic shapes data set, on CPU,
then evaluation (``eval.json``) and pictures (``plots/``) under
``runs/softmask-tiny``. Under ``torchrun --nproc_per_node K`` it runs
DistributedDataParallel (NCCL on GPUs, gloo on CPU).

Settings come, in increasing precedence, from the defaults of
:class:`~softmask.train.loop.TrainConfig`, a config file (``--config FILE``, JSON or
YAML: any TrainConfig field; a run's own ``config.json`` replays the run) and the
flags given on the command line. With ``--resume``, the settings not given come from
the checkpoint's own, and a given one that differs from the checkpoint's is an error.
A flag ``--steps`` cancels the ``epochs`` of a config file (``--epochs`` replaces
``--steps``). Bad settings end with one line naming the flag (or the file and key),
the value and what is expected, and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from softmask.runs.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint_config
from softmask.train.config import with_legacy_values
from softmask.train.loop import (
    PROGS,
    TASK_DEFAULTS,
    ConfigError,
    NonFiniteLossError,
    TrainConfig,
    load_config_file,
    task_config,
    train,
)

__all__ = ["main", "build_parser", "config_from_args", "config_from_argv"]

PROG = "softmask-pretrain"
# model settings a fine-tuning run takes from the softmask checkpoint it starts from, unless given
_FROM_CHECKPOINT = ("preset", "fusion_layers", "vision_stem", "vision_registers", "vision_attn_radius", "queue_size",
                    "fusion_text_input", "text_attn_radius", "max_len")

# flags whose meaning is the negation of a field: dest -> (field, value when the flag is given, when not)
_INVERTED = {
    "no_softmask": ("softmask", False, None),
    "softmask_positives_only": ("softmask_negatives", False, None),
    "no_text_aug": ("text_aug", False, None),
    "no_image_aug": ("image_aug", False, True),
    "no_eval": ("run_eval", False, True),
    "no_progress": ("progress", False, True),
    "no_ids": ("use_ids", False, True),
}
_NOT_FIELDS = ("config", "help")


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors on one line (exit status 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(task: str = "pretrain") -> argparse.ArgumentParser:
    finetune = task == "retrieval"
    d = task_config(task)
    if finetune:
        description = ("Fine-tune the model for image-text retrieval as ALBEF's Retrieval.py does: ITC (focal, "
                       "momentum distillation, positive ids: every pair with the same image id is a positive) and "
                       "ITM (hard negatives never share an id), no MLM, the soft-mask branch as in pretraining; "
                       "start from a softmask run (--checkpoint RUN_DIR) or an ALBEF checkpoint file "
                       "(--checkpoint ALBEF_4M.pth --preset base --tokenizer BERT_DIR); evaluate retrieval as "
                       "ALBEF's itm_eval at the end.")
        epilog = ("Settings: TrainConfig defaults < the fine-tuning defaults < a softmask --checkpoint's model "
                  "settings < --config FILE < flags given here (with --resume: the checkpoint's settings fill in "
                  "what is not given, and a given one that differs is an error).")
    else:
        description = ("Pretrain the ALBEF-style model with text-driven soft masks, focal ITC and multi-modal "
                       "augmentation; evaluate it (retrieval, pointing game) and draw pictures at the end.")
        epilog = ("Settings: TrainConfig defaults < --config FILE < flags given here (with --resume: the checkpoint's "
                  "settings fill in what is not given, and a given one that differs is an error).")
    p = _Parser(prog=PROGS[task], description=description, epilog=epilog,
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=None,
                   help="JSON or YAML file of TrainConfig fields (any field; flags given here override it); a run's "
                   "own config.json replays the run. YAML needs PyYAML")
    if finetune:
        p.add_argument("--checkpoint", dest="init_checkpoint", default=None,
                       help="the weights to fine-tune: a softmask run or checkpoint directory (its model settings "
                       "and tokenizer are used), or an ALBEF checkpoint file (ALBEF_4M.pth, ALBEF.pth, mscoco.pth, "
                       "...; the preset is then 'base' unless --preset says otherwise). Without it: random init")
        p.add_argument("--partial-load", action="store_true",
                       help="accept an ALBEF checkpoint that leaves model weights at their init (they are listed)")
        p.add_argument("--no-ids", action="store_true",
                       help="fine-tune without positive ids (each pair its own only positive, as in pretraining)")
    p.add_argument("--preset", choices=("tiny", "base"), default=d.preset, help="model size")
    p.add_argument("--data", default=d.data, help="'shapes' (embedded synthetic data), one of its variants "
                   "('shapes-partial': captions that name part of the image; 'shapes-longtail': long-tailed colour-shape "
                   "combinations in training), or a caption JSON file")
    p.add_argument("--image-root", default=None,
                   help="directory the JSON's image paths are relative to (default: the JSON file's folder)")
    p.add_argument("--test-data", default=None,
                   help="caption JSON file of a held-out set: retrieval is evaluated on it. Without it, a JSON "
                   "training set holds out --holdout of its images (or, if it cannot, evaluation is on the "
                   "training data and eval.json says so)")
    p.add_argument("--test-image-root", default=None,
                   help="directory the --test-data image paths are relative to (default: that JSON's folder)")
    p.add_argument("--holdout", type=int, default=d.holdout,
                   help="with a JSON training set and no --test-data: at most this many images (and at most a "
                   "tenth) are held out for evaluation, listed in OUT/heldout.json; 0: train on all")
    p.add_argument("--tokenizer", default=None,
                   help="local Hugging Face tokenizer directory (default: the shapes WordPiece tokenizer)")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps" + (
        "" if finetune else " (default: 1200 with the shapes recipe of --vit-checkpoint auto, else 800)"))
    p.add_argument("--epochs", type=int, default=None,
                   help="passes over the training set (replaces --steps; a --steps flag cancels a config file's "
                   "epochs)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="pairs per step and process (>= 2; "
                   "default: " + ("48)" if finetune else "33 with the shapes recipe of --vit-checkpoint auto, else 48)"))
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW, cosine with warm-up)")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--vision-lr-scale", type=float, default=d.vision_lr_scale,
                   help="the ViT's learning rate relative to --lr (0: the ViT stays frozen; default: "
                   + ("1)" if finetune else "0.1 with the shapes recipe of --vit-checkpoint auto, else 1)"))
    p.add_argument("--vision-attn-radius", type=int, default=None,
                   help="local self-attention for the ViT's patch tokens: each sees the patches within this many "
                   "patches (default: " + ("the checkpoint's" if finetune else "1 with the shapes recipe of "
                                           "--vit-checkpoint auto, else global attention, timm's ViT") + ")")
    p.add_argument("--vision-frozen-blocks", type=int, default=None,
                   help="freeze the ViT's first K blocks with its embeddings: computed once a step for the online "
                   "and the momentum ViT, no backward through them (default: 0, every block trains)")
    p.add_argument("--fusion-text-input", choices=("encoder", "embeddings", "shared"), default=None,
                   help="what the fusion encoder reads on the text side: the text encoder's output (ALBEF, the "
                   "default), the BERT embeddings (the text encoder then feeds ITC only), or the embeddings "
                   "through the text layers' own weights with cross-attention inserted (BLIP)")
    p.add_argument("--text-attn-radius", type=int, default=None,
                   help="local self-attention on the text side: each word sees the words within this many positions "
                   "([CLS] sees all; default: " + ("the checkpoint's" if finetune else "1 with the shapes recipe "
                                                   "of --vit-checkpoint auto, else global attention, BERT's") + ")")
    p.add_argument("--temp-lr-scale", type=float, default=d.temp_lr_scale,
                   help="learning rate of the ITC temperature relative to --lr")
    p.add_argument("--seed", type=int, default=d.seed, help="the model's initialization and each step's randomness, "
                   "and the data's too unless --data-seed is given")
    p.add_argument("--data-seed", type=int, default=None,
                   help="the data's seed (default: --seed): the shapes training and held-out items, the batch order "
                   "and the image distortions")
    p.add_argument("--out", default=d.out, help="output directory")
    p.add_argument("--impl", choices=("fused", "reference"), default=d.impl,
                   help="fused ops and SDPA attention, or the plain-PyTorch references and eager attention")
    p.add_argument("--device", default=None, help="torch device (default: cpu; cuda for GPUs)")
    p.add_argument("--gamma", type=float, default=None, help="focal ITC exponent (0: plain ITC)")
    p.add_argument("--alpha", type=float, default=None, help="momentum-distillation weight (ramped up)")
    p.add_argument("--no-softmask", action="store_true", help="ablation: no soft-masked ITM pairs")
    p.add_argument("--softmask-positives-only", action="store_true",
                   help="soft-masked images only in positive ITM pairs (always labelled a match), instead of in "
                   "positive and negative pairs in the clean pairs' 1 : 2 ratio")
    p.add_argument("--softmask-pairs", choices=("all", "one"), default=None,
                   help="soft-masked ITM pairs per row: 'all' = its positive and both hard negatives (3B fusion "
                   "passes), 'one' = one of the three, a third of the rows each (B passes, the same 1 : 2 ratio)")
    p.add_argument("--softmask-words", choices=("all", "content"), default=None,
                   help="which caption tokens may be the soft-mask word: 'all' non-special tokens, or 'content' "
                   "ones (no function word such as 'a', 'there' or 'of', no punctuation) (default: " + (
                       "the checkpoint's" if finetune else "all") + ")")
    p.add_argument("--mask-floor", type=float, default=None,
                   help="soft-mask value on the most word-related patch, in [0, 1] (default: " + (
                       "the checkpoint's" if finetune else "0.75 with the shapes recipe of --vit-checkpoint auto, "
                       "else 0: the patch removed") + ")")
    p.add_argument("--gradcam-layer", type=int, default=None, help="fusion layer (0-based) of the Grad-CAM")
    for term in ("itc", "itm", "softmask", "mlm"):
        p.add_argument(f"--weight-{term}", type=float, default=None, help=f"weight of loss_{term}")
    p.add_argument("--queue-size", type=int, default=None)
    p.add_argument("--mlm-prob", type=float, default=None,
                   help="share of the caption tokens masked (BERT's 80/10/10): the MLM targets, and with the text "
                   "augmentation also the caption view that ITC / ITM read (default 0.15)")
    if finetune:
        p.add_argument("--text-aug", dest="text_aug", action="store_const", const=True, default=None,
                       help="ITC/ITM on the masked-caption view (the text half of the multi-modal augmentation) "
                       "instead of the clean caption (ALBEF)")
    else:
        p.add_argument("--no-text-aug", action="store_true",
                       help="ITC/ITM on the clean caption (ALBEF) instead of the masked-caption view")
    p.add_argument("--itm-text-aug", action=argparse.BooleanOptionalAction, default=None,
                   help="with the text augmentation, whether ITM and the soft-masked pairs read the masked-caption "
                   "view too (MLM then shares the positive ITM pass); --no-itm-text-aug: ITC alone reads it, ITM "
                   "the clean caption, MLM gets its own fusion pass (default: " + (
                       "the checkpoint's" if finetune else "off with the shapes recipe of --vit-checkpoint auto, "
                       "else on") + ")")
    p.add_argument("--no-image-aug", action="store_true",
                   help="training crops without the caption-safe RandAugment (the image half of the multi-modal "
                   "augmentation; --no-text-aug is the text half)")
    p.add_argument("--train-size", type=int, default=d.train_size, help="shapes training items")
    p.add_argument("--test-size", type=int, default=None, help="shapes held-out items (default: 256)")
    p.add_argument("--num-workers", type=int, default=d.num_workers,
                   help="data loader worker processes (default: on a GPU one per core beyond the first, at most 4; "
                   "on the CPU 0, which builds each batch between steps while the training threads use every core)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU intra-op threads (default: one per core; on a CPU shared with other jobs, 1 avoids "
                   "OpenMP stalls)")
    if not finetune:
        p.add_argument("--vit-checkpoint", default=d.vit_checkpoint,
                       help="the ViT's initial weights: a local timm ViT file, 'shapes-objects' (the shipped tiny "
                       "ViT, pretrained on labelled single-object images by softmask-vision-pretrain), 'none' (random "
                       "init) or 'auto' (the default): on the shapes data with the tiny preset, the shapes recipe "
                       "(the shipped ViT at a tenth of the lr, local attention of radius 1 on both sides, soft masks with "
                       "--mask-floor 0.75, --no-itm-text-aug, 1200 steps; settings given keep their value), elsewhere "
                       "random init")
        p.add_argument("--bert-dir", default=None, help="local Hugging Face BERT directory (layers 6-11 -> fusion)")
    p.add_argument("--pointing-every", type=int, default=d.pointing_every,
                   help="held-out pointing game every N steps during training, logged to metrics.jsonl (0: off; "
                   "shapes data only)")
    p.add_argument("--eval-k", type=int, default=d.eval_k,
                   help="evaluation: the top k of every ITC ranking rescored by the ITM head (ALBEF's k_test)")
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--resume", action="store_true",
                   help="continue exactly from the last checkpoint in --out (settings not given come from it)")
    p.add_argument("--no-eval", action="store_true", help="skip evaluation and pictures at the end")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p


def _fields_from(values: dict) -> dict:
    """TrainConfig fields from parsed flags ``{dest: value}`` (the ``--no-*`` flags negated)."""
    out = {}
    for dest, value in values.items():
        if dest in _NOT_FIELDS:
            continue
        if dest in _INVERTED:
            name, given, absent = _INVERTED[dest]
            out[name] = given if value else absent
        else:
            out[dest] = value
    return out


def config_from_args(a: argparse.Namespace, task: str = "pretrain") -> TrainConfig:
    """The TrainConfig of parsed flags alone (every flag at its value or default; no config file)."""
    fields = _fields_from(vars(a))
    return task_config(task, **{k: v for k, v in fields.items() if not (v is None and k in TASK_DEFAULTS[task])})


def _flag_of(field: str, parser: argparse.ArgumentParser, value=None):
    """The command-line flag that sets ``field`` (to ``value``: ``--no-X`` for False of an ``--X / --no-X`` pair;
    None: only a config file can)."""
    for action in parser._actions:
        name = _INVERTED[action.dest][0] if action.dest in _INVERTED else action.dest
        if name == field and action.option_strings:
            if isinstance(action, argparse.BooleanOptionalAction) and value is False:
                return next(o for o in action.option_strings if o.startswith("--no-"))
            return action.option_strings[0]
    return None


def _saved_train_config(run: str):
    """``(checkpoint dir, its train settings)`` of the run's latest checkpoint; ``(None, {})`` without one,
    ``(ckpt, {})`` when its config cannot be read (train() reports that)."""
    ckpt = latest_checkpoint(run, warn=False)
    if ckpt is None:
        return None, {}
    try:
        return ckpt, with_legacy_values(load_checkpoint_config(ckpt)["train"])
    except CheckpointError:
        return ckpt, {}


def config_from_argv(argv=None, sources=None, task: str = "pretrain"):
    """``(TrainConfig, sources)`` from command-line arguments: defaults (the task's, :data:`TASK_DEFAULTS`),
    then ``--config``, then the flags given; with ``--resume``, the checkpoint's settings fill in what
    neither gives; fine-tuning from a softmask checkpoint takes its model settings (preset, architecture,
    ``max_len``) where neither gives them, and from an ALBEF file the preset ``base``. ``sources`` (filled in
    place when given, so that it is complete when this raises) maps each field that was set to where:
    ``("flag", "--lr")``, ``("file", path)`` or ``("checkpoint", path)``. Raises :class:`ConfigError` (see
    :func:`describe_error`)."""
    parser = build_parser(task)
    args = parser.parse_args(argv)
    quiet = build_parser(task)
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    given = vars(quiet.parse_args(argv))  # only the flags on the command line

    values = {}
    sources = {} if sources is None else sources
    if args.config is not None:
        for k, v in load_config_file(args.config).items():
            values[k], sources[k] = v, ("file", args.config)
    if values.get("task", task) != task:
        raise ConfigError("task", values["task"], f"{PROGS[task]} runs the {task!r} task; expected {task!r} or no "
                                                  f"task key (the {values['task']!r} task is "
                                                  f"{PROGS.get(values['task'], 'no command')})")
    values["task"] = task
    cli = _fields_from(given)
    for k, v in cli.items():
        values[k], sources[k] = v, ("flag", _flag_of(k, parser, v))
    if values.get("resume"):
        out = values.get("out", TASK_DEFAULTS[task].get("out", TrainConfig.out))
        ckpt, saved = _saved_train_config(out)
        if ckpt is not None:
            names = {f.name for f in dataclasses.fields(TrainConfig)}
            for k, v in saved.items():
                if k in names and k not in values and k not in ("out", "resume"):
                    values[k], sources[k] = v, ("checkpoint", f"{ckpt}/config.json")
    init = values.get("init_checkpoint")
    if init is not None and os.path.isdir(init):  # a softmask run: its model settings
        ckpt, saved = _saved_train_config(init)
        if ckpt is not None:
            for k in _FROM_CHECKPOINT:
                if k in saved and k not in values:
                    values[k], sources[k] = saved[k], ("checkpoint", f"--checkpoint {ckpt}/config.json")
    elif init is not None and os.path.isfile(init) and "preset" not in values:  # an ALBEF file: ALBEF's size
        values["preset"], sources["preset"] = "base", ("checkpoint", f"--checkpoint {init} (an ALBEF checkpoint)")
    for k, v in TASK_DEFAULTS[task].items():
        values.setdefault(k, v)
    if "steps" in cli and "epochs" in cli and cli["epochs"] is not None:
        raise ConfigError("epochs", cli["epochs"], "expected either --epochs or --steps, not both")
    if "steps" in cli and "epochs" not in cli and values.get("epochs") is not None:
        values["epochs"], sources["epochs"] = None, ("flag", "--steps")  # the flag's steps win over the epochs
    return TrainConfig(**values), sources


def describe_error(e: ConfigError, sources: dict, task: str = "pretrain") -> str:
    """The one-line message of ``e`` naming where the bad value came from: the flag, or the config file
    (or checkpoint config) and its key."""
    if e.field == "config":
        return e.render("--config", flag=True)
    kind, where = sources.get(e.field, ("flag", None))
    if kind == "flag":
        flag = where or _flag_of(e.field, build_parser(task))
        return e.render(flag, flag=True) if flag else e.render(e.field)
    return f"{where}: {e.render(e.field)}"


def main(argv=None, task: str = "pretrain") -> int:
    """The command line of ``task`` (``softmask-pretrain``: "pretrain", ``softmask-finetune``: "retrieval").
    Returns the exit status: 0, 2 for a bad setting (one line on stderr), 1 for a non-finite loss."""
    prog = PROGS[task]
    sources = {}
    try:
        cfg, _ = config_from_argv(argv, sources, task)
        summary = train(cfg)
    except ConfigError as e:
        print(f"{prog}: error: {describe_error(e, sources, task)}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    if "eval" in summary:
        ev = summary["eval"]
        keys = [k for k in ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "r_mean", "pointing_game")
                if k in ev]
        print("eval: " + json.dumps({k: round(ev[k], 2) for k in keys}))
        if ev.get("eval_on_training_data"):
            print(f"{prog}: note: these retrieval numbers are on the training data ({ev.get('eval_data')}), "
                  f"not on a held-out set")
    print(f"{prog}: done in {summary['wall_s']:.0f} s; outputs in {summary['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
