"""Do a run's ViT tokens encode each object's shape and colour? A linear probe.

    python -m research.shape_probe RUN_DIR [--train-items 1500] [--per-token]

For every object of ``--train-items`` training images (no augmentation) the final ViT patch
tokens whose centres fall inside the object's box are averaged (``--per-token``: each such token is
a sample of its own, labelled with its object: what one cross-attention key can tell); a multinomial logistic
regression (L-BFGS, standardized features) is fitted for the object's shape and for its
colour, and scored on the objects of the 256 held-out images. The same is done for a
randomly initialized network of the same configuration, the baseline that tells what
training added. Used for docs/TRAINING_NOTES.md (H7).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from softmask.data import build_dataset
from softmask.data.shapes import COLORS, SHAPES
from softmask.eval.evaluate import load_model
from softmask.model import SoftMaskALBEF

COLOR_NAMES = list(COLORS)


@torch.no_grad()
def object_features(model, dataset, n: int, per_token: bool = False):
    """``(X [objects, width], shape labels, colour labels)`` from the ViT's patch tokens (``per_token``: one
    row per token inside an object's box)."""
    cfg = model.cfg
    P, ps = cfg.image_size // cfg.patch_size, cfg.patch_size
    centres = torch.arange(P) * ps + ps / 2
    X, shapes, colours = [], [], []
    for s in range(0, n, 64):
        items = [dataset[i] for i in range(s, min(n, s + 64))]
        tokens = model._image_tokens(model.visual_encoder, torch.stack([it["image"] for it in items]))[:, 1:]
        for b, it in enumerate(items):
            for o in it["objects"]:
                x0, y0, x1, y1 = o["box"]
                inside = (((centres >= y0) & (centres <= y1))[:, None] & ((centres >= x0) & (centres <= x1))[None, :]).flatten()
                if not inside.any():  # an object smaller than a patch: the patch holding its centre
                    inside[int((y0 + y1) / 2 // ps) * P + int((x0 + x1) / 2 // ps)] = True
                rows = tokens[b][inside] if per_token else tokens[b][inside].mean(0, keepdim=True)
                X.append(rows)
                shapes += [SHAPES.index(o["word"])] * len(rows)
                colours += [COLOR_NAMES.index(o["color"])] * len(rows)
    return torch.cat(X), torch.tensor(shapes), torch.tensor(colours)


def linear_probe(Xtr, ytr, Xte, yte, classes: int) -> float:
    mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-6
    Xtr, Xte = (Xtr - mu) / sd, (Xte - mu) / sd
    W = torch.zeros(Xtr.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=300)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(Xtr @ W + b, ytr) + 1e-3 * W.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return float(((Xte @ W + b).argmax(1) == yte).float().mean())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="a run directory (or checkpoint directory)")
    p.add_argument("--train-items", type=int, default=1500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--per-token", action="store_true", help="one sample per token inside a box, not the box mean")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model, _, _, _ = load_model(a.run)
    train = build_dataset("shapes", "train", model.cfg.image_size, train=False, seed=0)
    test = build_dataset("shapes", "test", model.cfg.image_size, train=False, seed=0)
    out = {}
    for name, m in (("trained", model), ("random_init", SoftMaskALBEF(model.cfg).eval())):
        Xtr, s_tr, c_tr = object_features(m, train, a.train_items, a.per_token)
        Xte, s_te, c_te = object_features(m, test, len(test), a.per_token)
        out[name] = {"shape": linear_probe(Xtr, s_tr, Xte, s_te, len(SHAPES)),
                     "colour": linear_probe(Xtr, c_tr, Xte, c_te, len(COLOR_NAMES))}
    print(json.dumps({"run": a.run, "per_token": a.per_token, "train_samples": len(Xtr), **out}))


if __name__ == "__main__":
    main()
