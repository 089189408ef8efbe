"""Pretrain the vision encoder on labelled single-object images: the shapes world's ImageNet stage.

    softmask-vision-pretrain --out vit.safetensors [--steps 1500] [--seed 0] [--threads N]
        [--pool max|dense|cls] [--vision-attn-radius 1 | --global-attention]

ALBEF does not train its ViT from scratch: it starts from DeiT weights trained on ImageNet, a
data set of labelled, object-centred photographs. This command is the same stage for the
embedded shapes world: the preset's ViT (timm, with its register tokens) and a linear head are
trained to name the shape and the colour of the single object in an image of
:class:`softmask.data.shapes.ObjectsDataset` (two softmax cross-entropies), with the training
augmentation of image-text pretraining. The head reads the elementwise max over the patch tokens,
which makes every patch that shows part of an object carry what it is (docs/TRAINING_NOTES.md,
H8 and H18); [CLS] is trained by image-text pretraining afterwards, as ALBEF's ITC head is. The
patch tokens use local self-attention (``vision_attn_radius=1``): with timm's global attention
every token, background included, learns to carry the image's object, and cross-attention
Grad-CAM then has nothing to point at (H18, H22). ``pool="dense"`` (a target per patch from the
object's mask) did not keep the tokens local either (H19).

The output is a ``.safetensors`` file of the ViT's state (timm keys, no head) that
``softmask-pretrain --vit-checkpoint FILE`` loads, with a ``.json`` report beside it (settings,
held-out accuracies, seconds). The package ships the result of the default command for the
``tiny`` preset (:data:`BUILTIN_VIT`): ``softmask-pretrain --vit-checkpoint shapes-objects
--vision-attn-radius 1`` starts from it, and so does the default job (``vit_checkpoint="auto"``, the
shapes recipe: :meth:`softmask.train.loop.TrainConfig.resolved`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["VisionPretrainConfig", "pretrain_vision", "BUILTIN_VIT", "BUILTIN_VIT_RADIUS", "builtin_vit_path", "main"]

#: Name of the shipped ``tiny`` ViT checkpoint (``vit_checkpoint="shapes-objects"``), made by
#: ``softmask-vision-pretrain --out softmask/weights/vit_tiny_shapes_objects.safetensors --threads 1``
#: (the defaults: max readout, local attention of radius :data:`BUILTIN_VIT_RADIUS`).
BUILTIN_VIT = "shapes-objects"
#: The ``vision_attn_radius`` the shipped weights were trained with (a run loading them must use it).
BUILTIN_VIT_RADIUS = 1
_BUILTIN_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights",
                             "vit_tiny_shapes_objects.safetensors")


def builtin_vit_path() -> str:
    """Path of the shipped ``tiny`` ViT checkpoint (:data:`BUILTIN_VIT`)."""
    return _BUILTIN_FILE


POOLS = ("dense", "max", "cls")


@dataclass
class VisionPretrainConfig:
    """Settings of :func:`pretrain_vision` (the defaults made the shipped checkpoint)."""

    preset: str = "tiny"
    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 5.0
    # what the head reads: "dense" (every patch token names what covers it: the object's shape and colour, or
    # background), "max" (the elementwise max over the patch tokens names the image's object) or "cls"
    pool: str = "max"
    seed: int = 0
    test_size: int = 512
    eval_every: int = 250
    image_aug: bool = True
    threads: Optional[int] = None
    # ModelConfig.vision_attn_radius: 1 (the shipped weights; docs/TRAINING_NOTES.md H22) or None (global attention)
    vision_attn_radius: Optional[int] = 1

    def __post_init__(self):
        for name in ("steps", "batch_size", "test_size", "eval_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        for name in ("warmup_steps", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}: expected a non-negative int, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr: expected a finite number > 0, got {self.lr!r}")
        if self.pool not in POOLS:
            raise ValueError(f"pool: expected one of {POOLS}, got {self.pool!r}")
        if self.preset not in ("tiny", "base"):
            raise ValueError(f"preset: expected 'tiny' or 'base', got {self.preset!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ValueError(f"threads: expected a positive int or None, got {self.threads!r}")


def _logits(vit, head, x: torch.Tensor, pool: str) -> torch.Tensor:
    """``[B, 11]`` image logits (5 shapes, 6 colours) for "max" / "cls"; ``[B, P, 13]`` patch logits (5 shapes
    and background, 6 colours and background) for "dense"."""
    tokens = vit.forward_features(x)
    if pool == "cls":
        return head(tokens[:, 0])
    patches = tokens[:, vit.num_prefix_tokens:]
    return head(patches.amax(1)) if pool == "max" else head(patches)


def patch_labels(mask: torch.Tensor, label: torch.Tensor, patch: int, background: int) -> torch.Tensor:
    """Per-patch targets of ``pool="dense"``: ``label`` where the object covers at least a quarter of the
    patch, ``background`` where it covers none of it, -100 (ignored) in between. ``mask [B, S, S]``,
    ``label [B]`` → ``[B, (S / patch) ** 2]``."""
    cover = F.avg_pool2d(mask[:, None].float(), patch).flatten(1)
    out = torch.full_like(cover, -100, dtype=torch.long)
    out[cover >= 0.25] = label[:, None].expand_as(cover)[cover >= 0.25]
    out[cover == 0] = background
    return out


def _image_predictions(logits: torch.Tensor, pool: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted shape and colour of each image. Dense: the class whose probability peaks highest over the
    patches (the background class left out)."""
    from softmask.data.shapes import SHAPES

    ns = len(SHAPES)
    if pool != "dense":
        return logits[:, :ns].argmax(1), logits[:, ns:].argmax(1)
    # the last class of each softmax is "background"
    ps, pc = logits[..., :ns + 1].softmax(-1)[..., :-1], logits[..., ns + 1:].softmax(-1)[..., :-1]
    return ps.amax(1).argmax(1), pc.amax(1).argmax(1)


@torch.no_grad()
def _accuracy(vit, head, batches, pool: str) -> tuple[float, float]:
    was = vit.training
    vit.eval()
    ok_s = ok_c = n = 0
    for x, s, c, _ in batches:
        pred_s, pred_c = _image_predictions(_logits(vit, head, x, pool), pool)
        ok_s += int((pred_s == s).sum())
        ok_c += int((pred_c == c).sum())
        n += len(s)
    vit.train(was)
    return ok_s / n, ok_c / n


def _batch(ds, indices):
    items = [ds[i] for i in indices]
    return (torch.stack([it["image"] for it in items]), torch.tensor([it["shape"] for it in items]),
            torch.tensor([it["color"] for it in items]), torch.stack([it["mask"] for it in items]))


def pretrain_vision(cfg: VisionPretrainConfig, out: Optional[str] = None, log=print) -> tuple[nn.Module, dict]:
    """Train the preset's ViT on :class:`~softmask.data.shapes.ObjectsDataset`; returns ``(vit, report)``
    and, when ``out`` is given, writes the ViT's state to ``out`` (safetensors) and the report to
    ``out`` with ``.json`` for its suffix."""
    from safetensors.torch import save_file

    from softmask.data.augment import image_transform
    from softmask.data.shapes import COLORS, SHAPES, ObjectsDataset
    from softmask.model.albef import build_vision_encoder
    from softmask.model.config import model_preset

    if out is not None and not out.endswith(".safetensors"):
        raise ValueError(f"out: expected a path ending in .safetensors, got {out!r}")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    mcfg = model_preset(cfg.preset, vision_attn_radius=cfg.vision_attn_radius)
    vit = build_vision_encoder(mcfg)
    dense = cfg.pool == "dense"
    head = nn.Linear(mcfg.vision_width, len(SHAPES) + len(COLORS) + (2 if dense else 0))
    # dense targets follow the untransformed pixels: no crop or geometric distortion (the stream of fresh
    # images is endless, so nothing is seen twice anyway)
    train = ObjectsDataset("train", image_size=mcfg.image_size, seed=cfg.seed,
                           transform=image_transform(mcfg.image_size, not dense, distort=cfg.image_aug))
    test = ObjectsDataset("test", size=cfg.test_size, image_size=mcfg.image_size, seed=cfg.seed,
                          transform=image_transform(mcfg.image_size, False))
    test_batches = [_batch(test, range(s, min(len(test), s + 128))) for s in range(0, len(test), 128)]
    decay, no_decay = [], []
    for n, p in vit.named_parameters():
        (decay if p.ndim >= 2 and "pos_embed" not in n and "token" not in n else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay + [head.weight], "weight_decay": cfg.weight_decay},
                             {"params": no_decay + [head.bias], "weight_decay": 0.0}], lr=cfg.lr)
    params = list(vit.parameters()) + list(head.parameters())
    history, t0 = [], time.time()
    vit.train()
    for step in range(1, cfg.steps + 1):
        x, s, c, m = _batch(train, range((step - 1) * cfg.batch_size, step * cfg.batch_size))
        warm = min(1.0, step / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        lr = cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        logits = _logits(vit, head, x, cfg.pool)
        if dense:
            ns = len(SHAPES) + 1
            loss = (F.cross_entropy(logits[..., :ns].flatten(0, 1), patch_labels(m, s, mcfg.patch_size, ns - 1).flatten())
                    + F.cross_entropy(logits[..., ns:].flatten(0, 1),
                                      patch_labels(m, c, mcfg.patch_size, len(COLORS)).flatten()))
        else:
            loss = F.cross_entropy(logits[:, :len(SHAPES)], s) + F.cross_entropy(logits[:, len(SHAPES):], c)
        if not torch.isfinite(loss):
            raise RuntimeError(f"vision pretraining: non-finite loss {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            acc_s, acc_c = _accuracy(vit, head, test_batches, cfg.pool)
            row = {"step": step, "loss": round(loss.item(), 4), "test_shape_acc": acc_s, "test_color_acc": acc_c,
                   "seconds": round(time.time() - t0, 1)}
            history.append(row)
            if log:
                log(json.dumps(row))
    vit.eval()
    report = {"config": asdict(cfg), "model_preset": cfg.preset, "history": history,
              "test_shape_acc": history[-1]["test_shape_acc"], "test_color_acc": history[-1]["test_color_acc"],
              "seconds": round(time.time() - t0, 1), "torch": torch.__version__,
              "threads": torch.get_num_threads()}
    if out is not None:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        state = {k: v.detach().contiguous().clone() for k, v in vit.state_dict().items()}
        save_file(state, out, metadata={"format": "pt", "source": "softmask-vision-pretrain",
                                        "preset": cfg.preset, "vision_attn_radius": str(cfg.vision_attn_radius)})
        with open(out[: -len(".safetensors")] + ".json", "w") as f:
            json.dump(report, f, indent=1)
    return vit, report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="softmask-vision-pretrain", description=__doc__.split("\n")[0])
    d = VisionPretrainConfig()
    p.add_argument("--out", required=True, help="output .safetensors file (a .json report is written beside it)")
    p.add_argument("--preset", default=d.preset, choices=("tiny", "base"))
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--pool", default=d.pool, choices=POOLS, help="what the classifier head reads")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--vision-attn-radius", type=int, default=d.vision_attn_radius,
                   help="local self-attention of the patch tokens (ModelConfig.vision_attn_radius)")
    p.add_argument("--global-attention", action="store_true", help="timm's global self-attention instead")
    p.add_argument("--no-image-aug", action="store_true", help="crops without the caption-safe RandAugment")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: one per core)")
    a = p.parse_args(argv)
    try:
        cfg = VisionPretrainConfig(preset=a.preset, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                                   warmup_steps=a.warmup_steps, pool=a.pool, seed=a.seed,
                                   image_aug=not a.no_image_aug, threads=a.threads,
                                   vision_attn_radius=None if a.global_attention else a.vision_attn_radius)
    except ValueError as e:
        p.error(str(e))
    _, report = pretrain_vision(cfg, a.out)
    print(json.dumps({k: report[k] for k in ("test_shape_acc", "test_color_acc", "seconds")}))


if __name__ == "__main__":
    main()
