"""Can a vision encoder learn the shapes data's shapes within the pretraining budget, given a
direct label? Supervised multi-label training ("which shapes / colours are present").

    python -m research.shape_learnability --steps 800 [--encoder vit|cnn] [--no-aug]
        [--lr 5e-4] [--pool cls|max|mean] [--set vision_stem=conv --set patch_size=4 ...]

The encoder is the ``tiny`` preset's ViT (with ``--set`` overrides of the model config) with a
linear head on [CLS] (``--pool max`` / ``mean``: on the max / mean over the patch tokens), or a small CNN (4 convolutions 32-64-128-128, global max pool).
AdamW (weight decay 0.02), 60 warm-up steps, batch 48, the training augmentation unless
``--no-aug``, seed 0. Every 100 steps: the share of the 256 held-out images whose predicted
shape set (resp. colour set) is exactly right. Used for docs/TRAINING_NOTES.md (H8).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from softmask.data import build_dataset
from softmask.data.shapes import COLORS, SHAPES
from softmask.model.albef import build_vision_encoder
from softmask.model.config import model_preset

COLOR_NAMES = list(COLORS)


class SmallCNN(nn.Module):
    def __init__(self, width: int = 128):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, 2, 1), nn.GELU(), nn.Conv2d(32, 64, 3, 2, 1), nn.GELU(),
            nn.Conv2d(64, width, 3, 2, 1), nn.GELU(), nn.Conv2d(width, width, 3, 1, 1),
        )

    def forward_features(self, x):  # [B, 1, width]: the global max pool as the one "token"
        return self.features(x).flatten(2).amax(2)[:, None]


def labels(item) -> torch.Tensor:
    y = torch.zeros(len(SHAPES) + len(COLOR_NAMES))
    for o in item["objects"]:
        y[SHAPES.index(o["word"])] = 1
        y[len(SHAPES) + COLOR_NAMES.index(o["color"])] = 1
    return y


def _value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--encoder", choices=("vit", "cnn"), default="vit")
    p.add_argument("--no-aug", action="store_true")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--pool", choices=("cls", "max", "mean"), default="cls", help="ViT: what the head reads")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="ModelConfig override (ViT)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    over = {k: _value(v) for k, v in (s.split("=", 1) for s in a.set)}
    cfg = model_preset("tiny", **over)
    enc = SmallCNN(cfg.vision_width) if a.encoder == "cnn" else build_vision_encoder(cfg)
    head = nn.Linear(cfg.vision_width, len(SHAPES) + len(COLOR_NAMES))
    train = build_dataset("shapes", "train", cfg.image_size, train=not a.no_aug, seed=0)
    test = build_dataset("shapes", "test", cfg.image_size, train=False, seed=0)
    opt = torch.optim.AdamW(list(enc.parameters()) + list(head.parameters()), lr=a.lr, weight_decay=0.02)
    gen = torch.Generator().manual_seed(0)
    skip = 1 + (0 if a.encoder == "cnn" else cfg.vision_registers)  # [CLS] and the registers

    def pooled(x):
        tokens = enc.forward_features(x)
        if a.pool == "cls" or a.encoder == "cnn":
            return tokens[:, 0]
        patches = tokens[:, skip:]
        return patches.amax(1) if a.pool == "max" else patches.mean(1)

    @torch.no_grad()
    def evaluate():
        enc.eval()
        ok_shape = ok_colour = 0
        for s in range(0, len(test), 64):
            items = [test[i] for i in range(s, min(len(test), s + 64))]
            pred = head(pooled(torch.stack([i["image"] for i in items]))) > 0
            y = torch.stack([labels(i) for i in items]).bool()
            ok_shape += int((pred[:, :len(SHAPES)] == y[:, :len(SHAPES)]).all(1).sum())
            ok_colour += int((pred[:, len(SHAPES):] == y[:, len(SHAPES):]).all(1).sum())
        enc.train()
        return ok_shape / len(test), ok_colour / len(test)

    t0 = time.time()
    for step in range(1, a.steps + 1):
        items = [train[i] for i in torch.randint(0, len(train), (48,), generator=gen).tolist()]
        x, y = torch.stack([i["image"] for i in items]), torch.stack([labels(i) for i in items])
        for g in opt.param_groups:
            g["lr"] = a.lr * min(1.0, step / 60)
        loss = F.binary_cross_entropy_with_logits(head(pooled(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            shape_acc, colour_acc = evaluate()
            print(json.dumps({"step": step, "loss": round(loss.item(), 4), "exact_shape_set": shape_acc,
                              "exact_colour_set": colour_acc, "seconds": round(time.time() - t0)}), flush=True)


if __name__ == "__main__":
    main()
