"""The reference pretraining loop (single process, or DDP under torchrun).

:func:`train` runs :class:`TrainConfig`; ``softmask-pretrain`` (see
:mod:`softmask.train.__main__`) is its command line. Outputs under ``out``:
``config.json``, ``metrics.jsonl`` (one JSON object per logged step),
``checkpoints/`` (see :mod:`softmask.train.checkpoint`), ``tokenizer/``, and at
the end ``eval.json`` and ``plots/`` (unless ``run_eval`` is False).

Reproducibility: the global RNGs are reseeded at every step from
``(seed, step, rank)`` and the data order is a function of ``(seed, cursor)``
(:mod:`softmask.train.data`), so ``resume`` reproduces an uninterrupted run's
losses exactly; the RNG states are saved in the checkpoints as well.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from softmask.model import SoftMaskALBEF, model_preset
from softmask.model.pretrained import load_pretrained
from softmask.train.checkpoint import (
    NoCheckpointError,
    holds_run,
    latest_checkpoint,
    load_model_weights,
    load_train_state,
    remove_stale,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from softmask.train.data import batch_stream, mix_seed

__all__ = ["TrainConfig", "train", "NonFiniteLossError", "build_model", "LOSS_TERMS"]

LOSS_TERMS = ("loss_itc", "loss_itm", "loss_softmask", "loss_mlm")


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; the run stopped before the optimizer step."""


@dataclass
class TrainConfig:
    """Everything one pretraining run needs (the command line's flags map onto these fields).

    The defaults are the project's main job: ``tiny`` on 16,384 synthetic shapes pairs, 800
    steps of 48 pairs (about 5.5 minutes of training on an idle 2-core CPU), then evaluation on
    the 256 held-out pairs. Model fields left at None keep the preset's value.
    """

    preset: str = "tiny"
    data: str = "shapes"
    image_root: Optional[str] = None
    tokenizer: Optional[str] = None  # None/"shapes": the shapes WordPiece tokenizer; else a local HF directory
    steps: int = 800
    batch_size: int = 48
    lr: float = 5e-4
    min_lr_ratio: float = 0.02
    weight_decay: float = 0.02
    warmup_steps: int = 60
    grad_clip: float = 5.0
    temp_lr_scale: float = 0.1  # the temperature's learning rate relative to lr (see _param_groups)
    seed: int = 0
    out: str = "runs/softmask-tiny"
    impl: str = "fused"  # "fused": default op backends + SDPA; "reference": backend="reference" + eager attention
    device: Optional[str] = None
    log_every: int = 10
    save_every: int = 200
    resume: bool = False
    run_eval: bool = True
    num_workers: int = 0
    max_len: int = 24
    train_size: Optional[int] = 16384  # shapes only; None: the data set's default
    test_size: Optional[int] = None
    alpha_ramp_steps: Optional[int] = None  # None: 20 % of the steps
    vit_checkpoint: Optional[str] = None
    bert_dir: Optional[str] = None
    progress: bool = True
    threads: Optional[int] = None  # torch intra-op threads (None: torch's default, one per core)
    # model overrides (None keeps the preset's value)
    gamma: Optional[float] = None
    alpha: Optional[float] = None
    softmask: Optional[bool] = None
    mask_floor: Optional[float] = None
    softmask_negatives: Optional[bool] = None
    fusion_layers: Optional[int] = None
    momentum: Optional[float] = None
    vision_stem: Optional[str] = None
    vision_registers: Optional[int] = None
    gradcam_layer: Optional[int] = None
    weight_itc: Optional[float] = None
    weight_itm: Optional[float] = None
    weight_softmask: Optional[float] = None
    weight_mlm: Optional[float] = None
    queue_size: Optional[int] = None
    text_aug: Optional[bool] = None
    # image half of the multi-modal augmentation: caption-safe RandAugment on the training crops
    image_aug: bool = True
    eval_k: int = 16
    # grounding watched during training: the pointing game on the first ``pointing_size`` held-out shapes
    # items every ``pointing_every`` steps (and before the first step), logged to metrics.jsonl (0: off)
    pointing_every: int = 100
    pointing_size: int = 64

    def __post_init__(self):
        if self.impl not in ("fused", "reference"):
            raise ValueError(f"impl: expected 'fused' or 'reference', got {self.impl!r}")
        for name in ("pointing_every", "pointing_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}: expected a non-negative int, got {v!r}")
        for name in ("steps", "batch_size", "log_every", "save_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected > 0, got {self.lr}")

    MODEL_OVERRIDES = ("gamma", "alpha", "softmask", "mask_floor", "softmask_negatives", "gradcam_layer", "weight_itc", "weight_itm",
                       "weight_softmask", "weight_mlm", "queue_size", "text_aug", "fusion_layers", "momentum", "vision_stem",
                       "vision_registers")

    def model_config(self, tokenizer):
        over = {k: getattr(self, k) for k in self.MODEL_OVERRIDES if getattr(self, k) is not None}
        reference = self.impl == "reference"
        return model_preset(
            self.preset,
            vocab_size=len(tokenizer),
            pad_token_id=int(tokenizer.pad_token_id),
            attn_impl="eager" if reference else "auto",
            op_backend="reference" if reference else "auto",
            **over,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def build_model(cfg: TrainConfig, tokenizer) -> SoftMaskALBEF:
    torch.manual_seed(cfg.seed)
    model = SoftMaskALBEF(cfg.model_config(tokenizer))
    if cfg.vit_checkpoint or cfg.bert_dir:
        load_pretrained(model, vit_checkpoint=cfg.vit_checkpoint, bert_dir=cfg.bert_dir)
    return model


def _lr_lambda(warmup: int, total: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return f


def _param_groups(model: torch.nn.Module, weight_decay: float, lr: float, temp_lr_scale: float):
    """AdamW groups: weights with decay; biases, norms, embeddings without; the temperature alone
    at ``lr * temp_lr_scale``. At the tiny preset's lr 5e-4 (5x ALBEF's 1e-4), the temperature
    trained at the full lr fell from 0.07 to 0.004 in 800 steps, and text-to-image retrieval on the
    held-out shapes dropped (ITC IR@1 3.1 % against TR@1 12.9 %)."""
    decay, no_decay, temp = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name == "temp":
            temp.append(p)
            continue
        (no_decay if p.dim() < 2 or "embeddings" in name or "pos_embed" in name or "cls_token" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0},
            {"params": temp, "weight_decay": 0.0, "lr": lr * temp_lr_scale}]


def _dist_info():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _setup_distributed(device_arg: Optional[str]):
    """Initialize the process group under torchrun (WORLD_SIZE > 1). Returns the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg:
        device = torch.device(device_arg)
    else:
        device = torch.device("cpu")
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


def _set_threads(threads: Optional[int], device: torch.device) -> None:
    """``threads``: a fixed intra-op thread count, or None: torch's default to start with, then
    :class:`_ThreadGuard` picks between all cores and 1 while training."""
    if threads is not None:
        torch.set_num_threads(threads)


class _ThreadGuard:
    """Pick the faster intra-op thread count while training (automatic mode only: no ``threads``
    given, CPU, single process).

    Every ``period`` steps it times ``probe`` steps with the other count (all cores, or 1) and
    keeps whichever gave the shorter median step. Measured on the 2-core machine: idle, a tiny
    step takes 0.5 s with 2 threads and 0.7 s with 1; with another job running, 11 s with 2
    OpenMP threads (threads spinning on barriers while one of them is descheduled) and 0.9 s
    with 1. Thread counts change the floating-point reduction order, not the math.
    """

    def __init__(self, enabled: bool, period: int = 100, probe: int = 3, skip: int = 2):
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
            print(f"softmask-pretrain: {other} intra-op thread(s) are faster here ({med(self.trial):.2f} s against "
                  f"{med(self.recent[-self.probe:]):.2f} s per step): switching (--threads N fixes the count)", file=sys.stderr)
            self.current = other
            self.recent = list(self.trial)
        torch.set_num_threads(self.current)
        self.trial = []


def _trim_padding(batch: dict) -> dict:
    """Cut the text tensors to the longest caption of the batch (padding columns do no work)."""
    L = int(batch["attention_mask"].sum(1).max())
    return {**batch, "input_ids": batch["input_ids"][:, :L], "attention_mask": batch["attention_mask"][:, :L]}


def train(cfg: TrainConfig) -> dict:
    """Run the pretraining described by ``cfg``. Returns a summary dict
    (``out``, ``steps``, ``last_losses``, ``eval`` when evaluated, ``wall_s``)."""
    from softmask.data import build_dataset, candidate_word_mask, Collator, get_tokenizer, mask_tokens

    t_start = time.time()
    device = _setup_distributed(cfg.device)
    _set_threads(cfg.threads, device)
    rank, world = _dist_info()
    is_main = rank == 0
    out = cfg.out
    os.makedirs(out, exist_ok=True)

    if is_main:
        stale = remove_stale(out)  # leftovers of saves interrupted by a kill
        if stale:
            print(f"softmask-pretrain: removed {len(stale)} leftover(s) of interrupted checkpoint saves in "
                  f"{out}/checkpoints: {', '.join(stale)}", file=sys.stderr)
    ckpt = latest_checkpoint(out, warn=is_main) if cfg.resume else None
    if cfg.resume and ckpt is None:
        if holds_run(out):
            raise NoCheckpointError(
                f"--resume: {out} holds a run (metrics.jsonl or checkpoints/) but no loadable checkpoint (expected "
                f"{out}/checkpoints/step_* with model.safetensors, train_state.pt and config.json); not starting "
                f"over on top of it. Remove the directory, or use another --out, to start a new run")
        if is_main:
            print(f"softmask-pretrain: --resume: no run in {out}, starting from step 0", file=sys.stderr)

    tokenizer = get_tokenizer(cfg.tokenizer)
    tok_dir = os.path.join(out, "tokenizer")
    model = build_model(cfg, tokenizer).to(device)
    mcfg = model.cfg
    if is_main:
        tokenizer.save_pretrained(tok_dir)
        _write_json_atomic(os.path.join(out, "config.json"),
                           {"train": cfg.to_dict(), "model": mcfg.to_dict(), "tokenizer_dir": "tokenizer",
                            "world_size": world})

    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay, cfg.lr, cfg.temp_lr_scale), lr=cfg.lr,
                                  betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))

    step, cursor, num_dropped = 0, 0, 0
    if ckpt is not None:
        load_model_weights(model, ckpt)
        state = load_train_state(ckpt)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, cursor, num_dropped = state["step"], state["cursor"], state.get("num_dropped", 0)
        set_rng_state(state["rng"])
        if is_main:
            print(f"softmask-pretrain: resumed from {ckpt} (step {step})", file=sys.stderr)
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

    dataset = build_dataset(cfg.data, "train", mcfg.image_size, train=True, image_root=cfg.image_root,
                            seed=cfg.seed, size=cfg.train_size if cfg.data == "shapes" else None,
                            distort=cfg.image_aug)
    collate = Collator(tokenizer, cfg.max_len)
    watch = None  # fixed held-out subset for the pointing game during training (shapes data only)
    if is_main and cfg.pointing_every > 0 and cfg.pointing_size > 0 and cfg.data == "shapes":
        watch = build_dataset("shapes", "test", mcfg.image_size, train=False, seed=cfg.seed, size=cfg.pointing_size)

    def watch_grounding():
        from softmask.eval.evaluate import pointing_subset

        res = pointing_subset(model, tokenizer, watch, device=device)
        return {k: res[k] for k in ("pointing_game", "pointing_game_color") if k in res}

    stream = batch_stream(dataset, collate, batch_size=cfg.batch_size, seed=cfg.seed, cursor=cursor, rank=rank,
                          world=world, num_workers=cfg.num_workers)
    ramp = cfg.alpha_ramp_steps if cfg.alpha_ramp_steps is not None else max(1, cfg.steps // 5)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())

    def train_state():
        return {"step": step, "cursor": cursor, "num_dropped": num_dropped, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": rng_state(), "world_size": world}

    config_dict = {"train": cfg.to_dict(), "model": mcfg.to_dict(), "tokenizer_dir": "../../tokenizer"}
    bar = None
    if is_main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc="pretrain", dynamic_ncols=True)
    last, window_t, window_n = {}, time.time(), 0
    guard = _ThreadGuard(enabled=cfg.threads is None and device.type == "cpu" and world == 1)
    model.train()
    if watch is not None and step == 0 and cfg.steps >= cfg.pointing_every:
        with open(metrics_path, "a") as f:
            f.write(json.dumps({"step": 0, **watch_grounding()}) + "\n")
    while step < cfg.steps:
        t_step = time.perf_counter()
        c, batch = next(stream)
        cursor = c + 1
        if batch is None:
            num_dropped += cfg.batch_size
            continue
        num_dropped += batch["num_dropped"]
        batch = _trim_padding(batch)
        torch.manual_seed(mix_seed(cfg.seed, step, rank, 3))
        gen = torch.Generator().manual_seed(mix_seed(cfg.seed, step, rank, 4))
        mlm_ids, mlm_labels = mask_tokens(batch["input_ids"], tokenizer, prob=mcfg.mlm_prob, generator=gen)
        view_ids = mlm_ids if mcfg.text_aug else batch["input_ids"]
        cand = candidate_word_mask(view_ids, batch["attention_mask"], tokenizer)
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
        if step % cfg.log_every == 0 or step == cfg.steps or pointing_now:
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
        if step % cfg.save_every == 0 or step == cfg.steps:
            if is_main:
                save_checkpoint(out, step, model, train_state(), config_dict)
            if world > 1:
                dist.barrier()
    if bar is not None:
        bar.close()

    summary = {"out": out, "steps": step, "last_losses": last, "num_dropped": num_dropped,
               "train_wall_s": time.time() - t_start}
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if cfg.run_eval and is_main:
        from softmask.eval.evaluate import evaluate_run

        summary["eval"] = evaluate_run(out, device=device, model=model, tokenizer=tokenizer, k=cfg.eval_k,
                                       test_size=cfg.test_size, image_root=cfg.image_root)
    summary["wall_s"] = time.time() - t_start
    return summary
