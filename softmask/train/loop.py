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
``checkpoints/`` (see :mod:`softmask.runs.checkpoint`), ``tokenizer/``, ``heldout.json``
when images of a JSON training set are held out for evaluation (see
:mod:`softmask.train.data`), and at the end ``eval.json`` and ``plots/`` (unless
``run_eval`` is False). ``config.json`` holds the run's settings (``"train"``, which
``softmask-pretrain --config`` replays), the model's and ``total_steps``.

The run's pieces live beside this file: :mod:`softmask.train.config` (:class:`TrainConfig`, the recipe, config
files), :mod:`softmask.train.setup` (device, threads, allocator, process group), :mod:`softmask.train.init_weights`
(the weights a run starts from) and :mod:`softmask.train.data` (the data and its order). Their public names are
importable from here as before.

Reproducibility: the global RNGs are reseeded at every step from
``(seed, step, rank)`` and the data order is a function of ``(seed, cursor)``
(:mod:`softmask.train.data`), so ``resume`` reproduces an uninterrupted run's
losses exactly; the RNG states are saved in the checkpoints as well.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from softmask.model import ModelConfig, SoftMaskALBEF
from softmask.runs.checkpoint import (
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
from softmask.runs.datasets import write_json_atomic
from softmask.runs.errors import NO_VALUE, ConfigError, print_notes
from softmask.train.config import (  # noqa: F401  (re-exported: the names users import from here)
    AUTO,
    DEFAULT_STEPS,
    PROGS,
    RECIPE_ITM_TEXT_AUG,
    RECIPE_MASK_FLOOR,
    RECIPE_STEPS,
    RECIPE_TEXT_ATTN_RADIUS,
    RECIPE_VISION_LR_SCALE,
    RUNTIME_FIELDS,
    TASK_DEFAULTS,
    TASKS,
    TrainConfig,
    config_differences,
    load_config_file,
    task_config,
)
from softmask.train.data import EpochBatches, annotate_eval, batch_stream, mix_seed, prepare_data
from softmask.train.init_weights import (  # noqa: F401  (re-exported)
    build_model,
    init_source,
    load_init,
    load_tokenizer,
    model_from_run,
    resolve_vit_checkpoint,
)
from softmask.train.setup import (  # noqa: F401  (re-exported)
    ThreadGuard,
    auto_num_workers,
    check_device,
    dist_info,
    keep_freed_memory,
    set_threads,
    setup_distributed,
)

__all__ = ["TrainConfig", "train", "NonFiniteLossError", "ConfigError", "build_model", "LOSS_TERMS",
           "load_config_file", "config_differences", "check_device", "RUNTIME_FIELDS", "TASKS", "TASK_DEFAULTS",
           "PROGS", "task_config", "auto_num_workers", "keep_freed_memory", "resolve_vit_checkpoint"]

# the names these had when they lived in this file
_ThreadGuard, _set_threads, _setup_distributed, _dist_info = ThreadGuard, set_threads, setup_distributed, dist_info
_tokenizer, _init_source, _model_from_run, _load_init = load_tokenizer, init_source, model_from_run, load_init

LOSS_TERMS = ("loss_itc", "loss_itm", "loss_softmask", "loss_mlm", "loss_bow")


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; the run stopped before the optimizer step."""


def train(cfg: TrainConfig) -> dict:
    """Run the training (pretraining or retrieval fine-tuning, ``cfg.task``) described by ``cfg``. Returns
    a summary dict (``out``, ``steps``, ``last_losses``, ``eval`` when evaluated, ``wall_s``, and
    ``init_report`` when it started from an ALBEF checkpoint).

    Raises :class:`ConfigError` (a ValueError naming the setting) for settings that cannot work here: an
    unavailable device, a data or test set that is missing, malformed or without readable images, a
    ``resume`` whose checkpoint has other settings or cannot be loaded, an ``init_checkpoint`` that is
    missing, refused, truncated or does not fit the model."""
    cfg = cfg.resolved()  # "auto" settings made concrete: config.json records (and replays) what ran
    t_start = time.time()
    proc = _start_process(cfg)
    ckpt, extended_from = _checkpoint_to_resume(cfg, proc) if cfg.resume else (None, None)
    init = init_source(cfg) if ckpt is None else None
    mcfg, tokenizer = _model_settings(cfg, ckpt, init)
    prepared = prepare_data(cfg, mcfg.image_size, cfg.out, write=proc.is_main)
    per_epoch, total_steps = _run_length(cfg, len(prepared.train), proc.world)
    model, vit_file, init_report = _build_model(cfg, tokenizer, mcfg, init, prepared.notes, proc.device)
    if proc.is_main:
        _write_run_files(cfg, model.cfg, tokenizer, total_steps, vit_file, proc.world)
    optimizer, scheduler = _optimizer(cfg, model, total_steps)
    state = _restore(ckpt, model, optimizer, scheduler) if ckpt is not None else TrainState()
    if proc.is_main:
        _announce(cfg, prepared.notes, ckpt, state.step, extended_from, total_steps, vit_file)
    log = MetricsLog(os.path.join(cfg.out, "metrics.jsonl"), proc.is_main, keep_to=state.step if ckpt else None)
    loop = _Loop(cfg, proc, model, tokenizer, optimizer, scheduler, state, total_steps, per_epoch, prepared.train, log)
    last = loop.run()

    summary = {"out": cfg.out, "steps": state.step, "last_losses": last, "num_dropped": state.num_dropped,
               "train_wall_s": time.time() - t_start}
    if init_report is not None:
        summary["init_report"] = init_report
    if proc.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if cfg.run_eval and proc.is_main:
        summary["eval"] = _evaluate(cfg, model, tokenizer, prepared, proc.device)
    summary["wall_s"] = time.time() - t_start
    return summary


# ----------------------------------------------------------------------------- the steps of train(), in order


@dataclass
class Process:
    """Where this process trains: its device, its rank among ``world`` processes."""

    device: torch.device
    rank: int
    world: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _start_process(cfg: TrainConfig) -> Process:
    """Device, threads, allocator and process group set up; the run directory made, with the leftovers of
    writes a kill interrupted removed."""
    device = setup_distributed(cfg.device)
    set_threads(cfg.threads, device)
    if device.type == "cpu":
        keep_freed_memory()
    rank, world = dist_info()
    os.makedirs(cfg.out, exist_ok=True)
    if rank == 0:
        stale = remove_stale(cfg.out) + remove_stale_files(cfg.out)
        if stale:
            print(f"{PROGS[cfg.task]}: removed {len(stale)} leftover(s) of writes interrupted by a kill in "
                  f"{cfg.out}: {', '.join(stale)}", file=sys.stderr)
    return Process(device, rank, world)


def remove_stale_files(out: str) -> list:
    """Remove the temporary files a kill can leave in a run directory (``metrics.jsonl.tmp-<pid>``,
    ``config.json.tmp-<pid>``, the evaluation's ``.eval.json.tmp-<pid>``, ...: every file is rewritten under such a
    name, then renamed). Returns their names."""
    names = []
    stale = glob.glob(os.path.join(glob.escape(out), "*.tmp-*")) + glob.glob(os.path.join(glob.escape(out), ".*.tmp-*"))
    for path in sorted(stale):
        if os.path.isfile(path):
            os.remove(path)
            names.append(os.path.basename(path))
    return names


def _checkpoint_to_resume(cfg: TrainConfig, proc: Process):
    """``(checkpoint, extended_from)``: the checkpoint ``--resume`` continues from (None: no run in ``out``),
    after checking that its settings equal ``cfg``'s (:func:`config_differences`); ``extended_from`` is the
    run's earlier end (its ``steps`` or ``epochs`` setting) when ``cfg`` asks for more, else None."""
    out, prog = cfg.out, PROGS[cfg.task]
    ckpt = latest_checkpoint(out, warn=proc.is_main)
    if ckpt is None:
        if holds_run(out):
            raise NoCheckpointError(
                f"--resume: {out} holds a run (metrics.jsonl or checkpoints/) but no loadable checkpoint (expected "
                f"{out}/checkpoints/step_* with model.safetensors, train_state.pt and config.json); not starting "
                f"over on top of it. Remove the directory, or use another --out, to start a new run")
        if proc.is_main:
            print(f"{prog}: --resume: no run in {out}, starting from step 0", file=sys.stderr)
        return None, None
    try:
        saved = load_checkpoint_config(ckpt)["train"]
    except CheckpointError as e:
        raise ConfigError("resume", NO_VALUE, str(e)) from None
    diffs = config_differences(cfg, saved)
    extended = [(k, old, new) for k, old, new in diffs if _extends(k, old, new, saved, cfg)]
    diffs = [d for d in diffs if d not in extended]
    if diffs:
        what = "; ".join(f"{k}: {_fmt(old)} in the checkpoint, {_fmt(new)} now" for k, old, new in diffs)
        raise ConfigError("resume", NO_VALUE,
                          f"the settings differ from those of the checkpoint {ckpt} ({what}); expected the run's own "
                          f"settings (leave these out, or pass --config {os.path.join(out, 'config.json')}; a larger "
                          f"--steps or --epochs alone extends the run), or another --out for a new run")
    return ckpt, (extended[0][0], extended[0][1]) if extended else None


def _extends(name: str, old, new, saved: dict, cfg: TrainConfig) -> bool:
    """Whether the difference ``name: old -> new`` asks a resumed run to go on further: a larger ``epochs``
    (both counted in epochs), or a larger ``steps`` (both counted in steps)."""
    if name == "epochs":
        return old is not None and new is not None and new > old
    if name == "steps":
        return saved.get("epochs") is None and cfg.epochs is None and old is not None and new is not None and new > old
    return False


def _fmt(v) -> str:
    return json.dumps(v) if isinstance(v, (str, bool)) or v is None else repr(v)


def _model_settings(cfg: TrainConfig, ckpt: Optional[str], init: Optional[tuple]):
    """``(ModelConfig, tokenizer)``: a softmask checkpoint's own when training starts from one (on resume: the
    run's checkpoint), else the preset's with the overrides."""
    if ckpt is not None and cfg.init_checkpoint is not None:
        return model_from_run(cfg, ckpt, "resume")
    if init is not None and init[0] == "run":
        return model_from_run(cfg, init[1], "init_checkpoint")
    tokenizer = load_tokenizer(cfg.tokenizer)
    return cfg.model_config(tokenizer), tokenizer


def _run_length(cfg: TrainConfig, n_pairs: int, world: int):
    """``(batches per epoch, total steps)``; a batch that does not fit in the training set is a
    :class:`ConfigError`."""
    per_epoch = EpochBatches.per_epoch(n_pairs, cfg.batch_size, world)
    if per_epoch == 0:
        raise ConfigError("batch_size", cfg.batch_size,
                          f"expected at most {n_pairs // world} (the training set has {n_pairs} pairs"
                          f"{f' for {world} processes' if world > 1 else ''}; one batch must fit in it)")
    return per_epoch, cfg.steps if cfg.epochs is None else cfg.epochs * per_epoch


def _build_model(cfg: TrainConfig, tokenizer, mcfg: ModelConfig, init, notes: list, device: torch.device):
    """``(model on device, ViT weights file or None, ALBEF load report or None)``."""
    model = build_model(cfg, tokenizer, mcfg)
    vit_file = resolve_vit_checkpoint(cfg)  # None with init_checkpoint (TrainConfig allows only one of them)
    init_report = load_init(model, cfg, init, notes) if init is not None else None
    return model.to(device), vit_file, init_report


def _write_run_files(cfg: TrainConfig, mcfg: ModelConfig, tokenizer, total_steps: int, vit_file, world: int):
    """The run's ``tokenizer/`` and ``config.json`` (its settings, which ``--config`` replays)."""
    tokenizer.save_pretrained(os.path.join(cfg.out, "tokenizer"))
    write_json_atomic(os.path.join(cfg.out, "config.json"),
                      {"train": cfg.to_dict(), "model": mcfg.to_dict(), "tokenizer_dir": "tokenizer",
                       "world_size": world, "total_steps": total_steps, "vit_weights": vit_file}, indent=2)


def _optimizer(cfg: TrainConfig, model: SoftMaskALBEF, total_steps: int):
    """AdamW over :func:`_param_groups` and the warmup-then-cosine schedule over ``total_steps``. A head
    without a loss (MLM in fine-tuning) is left out: weight decay would only shrink it."""
    frozen = ("mlm_head.",) if model.cfg.weight_mlm == 0 else ()
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay, cfg.lr, cfg.temp_lr_scale, frozen,
                                                cfg.vision_lr_scale),
                                  lr=cfg.lr, betas=(0.9, 0.999))
    schedule = _lr_lambda(cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


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


@dataclass
class TrainState:
    """Where the run stands: optimizer steps taken, batches consumed (the data order's cursor), pairs dropped."""

    step: int = 0
    cursor: int = 0
    num_dropped: int = 0


def _restore(ckpt: str, model, optimizer, scheduler) -> TrainState:
    """Load the checkpoint ``--resume`` continues from: weights, optimizer, schedule, position, RNG states.
    The schedule is the one built over this run's total, so an extended run's learning rate follows the new
    total from here on."""
    try:
        load_model_weights(model, ckpt)
        state = load_train_state(ckpt)
    except CheckpointError as e:
        raise ConfigError("resume", NO_VALUE, f"{e}. Not resumed") from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    for group, base, lam in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * lam(scheduler.last_epoch)  # the same value when the total is unchanged
    set_rng_state(state["rng"])
    return TrainState(state["step"], state["cursor"], state.get("num_dropped", 0))


def _announce(cfg: TrainConfig, notes: list, ckpt, step: int, extended_from, total_steps: int, vit_file):
    """The log's opening lines, after every check that can stop the run (an error is the only line of a run
    that fails)."""
    prog = PROGS[cfg.task]
    if ckpt is not None:
        print(f"{prog}: resumed from {ckpt} (step {step})", file=sys.stderr)
    if extended_from is not None:
        name, old = extended_from
        print(f"{prog}: --resume with {name} {getattr(cfg, name)} (the run had {name} {old}): training goes on to step "
              f"{total_steps}; the learning-rate schedule and the distillation ramp are recomputed over {total_steps} "
              f"steps", file=sys.stderr)
    print_notes(notes, prog)
    if vit_file and ckpt is None:
        print(f"{prog}: ViT initialized from {vit_file}", file=sys.stderr)


class MetricsLog:
    """``metrics.jsonl``, one JSON object per logged step (written by the main process only). A new run starts
    it empty; a resumed one (``keep_to``: its checkpoint's step) keeps the rows up to its checkpoint."""

    def __init__(self, path: str, write: bool, keep_to: Optional[int] = None):
        self.path, self.write = path, write
        if write:
            if keep_to is not None:
                _truncate_metrics(path, keep_to)
            elif os.path.exists(path):
                os.remove(path)

    def append(self, row: dict) -> None:
        if self.write:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


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


class _Loop:
    """The optimizer steps of one run, from ``state`` to ``total_steps``: batch, forward, check, update, log,
    save. Every step reseeds the RNGs from ``(seed, step, rank)``, so a resumed run repeats the steps of an
    uninterrupted one."""

    def __init__(self, cfg, proc, model, tokenizer, optimizer, scheduler, state, total_steps, per_epoch, dataset,
                 log):
        from softmask.data import Collator

        self.cfg, self.proc, self.model, self.tokenizer = cfg, proc, model, tokenizer
        self.optimizer, self.scheduler, self.state, self.log = optimizer, scheduler, state, log
        self.total_steps, self.per_epoch, self.prog = total_steps, per_epoch, PROGS[cfg.task]
        self.mcfg = model.cfg
        self.train_model = model
        if proc.world > 1:
            device = proc.device
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
        self.watch = _pointing_watch(cfg, proc, model, tokenizer)
        self.stream = batch_stream(dataset, Collator(tokenizer, cfg.max_len), batch_size=cfg.batch_size,
                                   seed=cfg.data_rng_seed, cursor=state.cursor, rank=proc.rank, world=proc.world,
                                   num_workers=auto_num_workers(proc.device.type) if cfg.num_workers is None
                                   else cfg.num_workers)
        self.ramp = cfg.alpha_ramp_steps if cfg.alpha_ramp_steps is not None else max(1, total_steps // 5)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if proc.device.type == "cuda"
                         else contextlib.nullcontext())
        self.config_dict = {"train": cfg.to_dict(), "model": self.mcfg.to_dict(), "tokenizer_dir": "../../tokenizer",
                            "total_steps": total_steps}
        self.bar = None
        if proc.is_main and cfg.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=state.step,
                            desc="pretrain" if cfg.task == "pretrain" else "finetune", dynamic_ncols=True)
        self.guard = ThreadGuard(enabled=cfg.threads is None and proc.device.type == "cpu" and proc.world == 1,
                                 prog=self.prog)
        self.last, self.window_t, self.window_n = {}, time.time(), 0

    def run(self) -> dict:
        """Train to the end; returns the last logged row."""
        cfg, state = self.cfg, self.state
        self.model.train()
        if self.watch is not None and state.step == 0 and self.total_steps >= cfg.pointing_every:
            self.log.append({"step": 0, **self.watch()})
        try:
            skipped = 0  # consecutive batches without two usable pairs
            while state.step < self.total_steps:
                t_step = time.perf_counter()
                batch = self._next_batch()
                if batch is None:
                    skipped += 1
                    if skipped >= self.per_epoch:
                        raise ConfigError("data", cfg.data, f"no batch of a whole epoch ({self.per_epoch} batches) "
                                                            f"had two readable images; expected image files that PIL "
                                                            f"can decode (see the warnings above for the files and "
                                                            f"the reasons)")
                    continue
                skipped = 0
                losses, terms, alpha, n = self._forward(batch)
                self._check_finite(terms)
                self._update(losses)
                state.step += 1
                self.window_n += n * self.proc.world
                self.guard.observe(time.perf_counter() - t_step)
                self._log(losses, terms, alpha)
                self._save()
        finally:
            self.stream.close()  # the data loader's workers end here, before the evaluation
            if self.bar is not None:
                self.bar.close()
        return self.last

    def _next_batch(self) -> Optional[dict]:
        """The next batch with at least two readable pairs (padding trimmed), or None (counted as dropped): every
        image of it unreadable, or one pair left, so no hard negative. Every rank skips the same steps (a lone
        skip would leave the others waiting)."""
        state = self.state
        c, batch = next(self.stream)
        state.cursor = c + 1
        usable = torch.tensor([float(batch is not None and batch["image"].shape[0] >= 2)])
        if self.proc.world > 1:
            dist.all_reduce(usable, op=dist.ReduceOp.MIN)
        if usable.item() < 1:
            state.num_dropped += self.cfg.batch_size if batch is None else batch["num_dropped"] + batch["image"].shape[0]
            return None
        state.num_dropped += batch["num_dropped"]
        return _trim_padding(batch)

    def _forward(self, batch: dict):
        """``(losses, loss terms stacked, alpha, pairs)`` of one step: the step's masked caption (MLM, and the
        text augmentation), the words a soft mask may take, the distillation weight on its ramp."""
        from softmask.data import candidate_word_mask, mask_tokens

        cfg, mcfg, step, rank, device = self.cfg, self.mcfg, self.state.step, self.proc.rank, self.proc.device
        torch.manual_seed(mix_seed(cfg.seed, step, rank, 3))
        gen = torch.Generator().manual_seed(mix_seed(cfg.seed, step, rank, 4))
        mlm_ids, mlm_labels = mask_tokens(batch["input_ids"], self.tokenizer, prob=mcfg.mlm_prob, generator=gen)
        if mcfg.weight_mlm == 0:  # no MLM (fine-tuning): no token is predicted; the masked view stays for text_aug
            mlm_labels = torch.full_like(mlm_labels, -100)
        view_ids = mlm_ids if mcfg.itm_reads_masked_caption else batch["input_ids"]  # the caption ITM reads
        cand = candidate_word_mask(view_ids, batch["attention_mask"], self.tokenizer, words=mcfg.softmask_words)
        alpha = mcfg.alpha * min(1.0, step / self.ramp)
        image = batch["image"].to(device, non_blocking=True)
        with self.autocast:
            losses = self.train_model(
                image,
                batch["input_ids"].to(device),
                batch["attention_mask"].to(device),
                mlm_input_ids=mlm_ids.to(device),
                mlm_labels=mlm_labels.to(device),
                word_candidates=cand.to(device),
                alpha=alpha,
                ids=batch["ids"].to(device) if cfg.use_ids else None,
                holds=batch["holds"].to(device) if "holds" in batch else None,
            )
        terms = torch.stack([losses[k].detach().float() for k in LOSS_TERMS])
        return losses, terms, alpha, image.shape[0]

    def _check_finite(self, terms: torch.Tensor) -> None:
        """Stop before the optimizer step when a loss term is NaN or infinite on any rank."""
        finite = torch.isfinite(terms).all().float().reshape(1)
        if self.proc.world > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() < 1:
            bad = [k for k, v in zip(LOSS_TERMS, terms.tolist()) if not math.isfinite(v)]
            what = ", ".join(f"{k} = {v}" for k, v in zip(LOSS_TERMS, terms.tolist()) if k in bad) or "on another rank"
            good = latest_checkpoint(self.cfg.out)
            if self.bar is not None:
                self.bar.close()
            raise NonFiniteLossError(
                f"non-finite loss at step {self.state.step + 1}: {what} (term {bad[0] if bad else '?'}); stopped "
                f"before the optimizer step. Last good checkpoint: {good or 'none (no checkpoint was saved yet)'}"
            )

    def _update(self, losses: dict) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()

    def _log(self, losses: dict, terms: torch.Tensor, alpha: float) -> None:
        """Every ``log_every`` steps, the last step and the pointing checks: a row of ``metrics.jsonl``."""
        cfg, step = self.cfg, self.state.step
        pointing_now = self.watch is not None and step % cfg.pointing_every == 0
        if step % cfg.log_every == 0 or step == self.total_steps or pointing_now:
            vals = terms.tolist()
            now = time.time()
            row = {"step": step, "loss": float(losses["loss"].detach()),
                   **{k: v for k, v in zip(LOSS_TERMS, vals)},
                   "lr": self.optimizer.param_groups[0]["lr"], "temperature": float(self.model.temp.detach()),
                   "alpha": alpha, "mask_mean": float(losses["mask_mean"]),
                   "samples_per_s": self.window_n / max(now - self.window_t, 1e-9),
                   "num_dropped": self.state.num_dropped}
            if pointing_now:
                row.update(self.watch())
            self.window_t, self.window_n = time.time(), 0
            self.last = row
            self.log.append(row)
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{row['loss']:.3f}", itc=f"{vals[0]:.3f}", itm=f"{vals[1]:.3f}",
                                     sm=f"{vals[2]:.3f}", mlm=f"{vals[3]:.3f}", sps=f"{row['samples_per_s']:.0f}")
        if self.bar is not None:
            self.bar.update(1)

    def _save(self) -> None:
        """Every ``save_every`` steps and at the end: a kill-safe checkpoint (main process), then a barrier."""
        step = self.state.step
        if step % self.cfg.save_every == 0 or step == self.total_steps:
            if self.proc.is_main:
                s = self.state
                save_checkpoint(self.cfg.out, step, self.model,
                                {"step": s.step, "cursor": s.cursor, "num_dropped": s.num_dropped,
                                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                                 "rng": rng_state(), "world_size": self.proc.world},
                                self.config_dict)
            if self.proc.world > 1:
                dist.barrier()


def _pointing_watch(cfg: TrainConfig, proc: Process, model, tokenizer):
    """The pointing game on a fixed held-out subset during training (shapes data, main process), as a function
    of no arguments giving ``{"pointing_game": ..., "pointing_game_color": ...}``; None when off."""
    from softmask.data import build_dataset, is_shapes

    if not (proc.is_main and cfg.pointing_every > 0 and cfg.pointing_size > 0 and is_shapes(cfg.data)):
        return None
    from softmask.eval.evaluate import pointing_subset

    watch = build_dataset(cfg.data, "test", model.cfg.image_size, train=False, seed=cfg.data_rng_seed,
                          size=cfg.pointing_size)

    def pointing() -> dict:
        res = pointing_subset(model, tokenizer, watch, device=proc.device)
        return {k: res[k] for k in ("pointing_game", "pointing_game_color") if k in res}

    return pointing


def _trim_padding(batch: dict) -> dict:
    """Cut the text tensors to the longest caption of the batch (padding columns do no work)."""
    L = int(batch["attention_mask"].sum(1).max())
    return {**batch, "input_ids": batch["input_ids"][:, :L], "attention_mask": batch["attention_mask"][:, :L]}


def _evaluate(cfg: TrainConfig, model, tokenizer, prepared, device) -> dict:
    """Retrieval, grounding and the probes on the run's held-out data (``eval.json`` and ``plots/``)."""
    from softmask.eval.evaluate import evaluate_run

    if prepared.eval_split == "train":
        print_notes(prog=PROGS[cfg.task], notes=[
            f"evaluating on the training data ({cfg.data}), not on held-out data: the retrieval numbers measure fit "
            f"(eval.json: \"eval_on_training_data\": true)"])
    evaluate_run(cfg.out, device=device, model=model, tokenizer=tokenizer, k=cfg.eval_k, test_size=cfg.test_size,
                 data=prepared.eval_data, image_root=prepared.eval_image_root)
    return annotate_eval(os.path.join(cfg.out, "eval.json"), prepared.eval_data or cfg.data, prepared.eval_split)
