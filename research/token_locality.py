"""How local are a ViT's patch tokens? A linear probe of the object's shape from tokens inside and away from it.

    python -m research.token_locality WEIGHTS.safetensors [--radius 1]
    python -m research.token_locality random [--radius 1]      # a randomly initialized ViT

On 512 held-out single-object images (:class:`softmask.data.shapes.ObjectsDataset`, seed 5, no
augmentation), the tiny preset's ViT (``--radius``: ``vision_attn_radius``; default global
attention) encodes each image; three features per image: the mean of the final patch tokens whose
centres lie inside the object's box, of those outside it, and of those at least 12 px from it
(Chebyshev distance from the patch centre to the box). A multinomial logistic regression (the
probe of ``research.shape_probe``) fitted on the first half names the object's shape on the
second half. A token that carries only its own neighbourhood cannot name an object 12 px away;
docs/TRAINING_NOTES.md H18, H19, H22.
"""

from __future__ import annotations

import argparse
import json

import torch

from research.shape_probe import linear_probe


def locality(vit, n: int = 512, far_px: float = 12.0) -> dict:
    from softmask.data.augment import image_transform
    from softmask.data.shapes import SHAPES, ObjectsDataset

    size = vit.patch_embed.img_size[0]
    grid, ps = vit.patch_embed.grid_size[0], vit.patch_embed.patch_size[0]
    ds = ObjectsDataset("test", size=n, seed=5, image_size=size, transform=image_transform(size, False))
    centres = torch.arange(grid) * ps + ps / 2
    cy = centres[:, None].expand(grid, grid).flatten()
    cx = centres[None, :].expand(grid, grid).flatten()
    feats = {"inside": [], "outside": [], "far": []}
    y = []
    vit.eval()
    with torch.no_grad():
        for s in range(0, n, 128):
            items = [ds[i] for i in range(s, min(n, s + 128))]
            tokens = vit.forward_features(torch.stack([it["image"] for it in items]))[:, vit.num_prefix_tokens:]
            for b, it in enumerate(items):
                x0, y0, x1, y1 = it["box"]
                inside = ((cy >= y0) & (cy <= y1) & (cx >= x0) & (cx <= x1))
                dist = torch.maximum(torch.clamp(torch.maximum(x0 - cx, cx - x1), min=0),
                                     torch.clamp(torch.maximum(y0 - cy, cy - y1), min=0))
                far = dist >= far_px
                if not inside.any() or not far.any():
                    continue
                feats["inside"].append(tokens[b][inside].mean(0))
                feats["outside"].append(tokens[b][~inside].mean(0))
                feats["far"].append(tokens[b][far].mean(0))
                y.append(it["shape"])
    y = torch.tensor(y)
    h = len(y) // 2
    out = {"images": len(y)}
    for name, xs in feats.items():
        X = torch.stack(xs)
        out[f"shape_probe_{name}"] = linear_probe(X[:h], y[:h], X[h:], y[h:], len(SHAPES))
    return out


def main(argv=None) -> int:
    from safetensors.torch import load_file

    from softmask.model.albef import build_vision_encoder
    from softmask.model.config import model_preset

    p = argparse.ArgumentParser(prog="python -m research.token_locality", description=__doc__.split("\n")[0])
    p.add_argument("weights", help="a ViT .safetensors file of the tiny preset, or 'random'")
    p.add_argument("--radius", type=int, default=None, help="vision_attn_radius (default: global attention)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    vit = build_vision_encoder(model_preset("tiny", vision_attn_radius=a.radius))
    if a.weights != "random":
        vit.load_state_dict(load_file(a.weights))
    print(json.dumps({"weights": a.weights, "radius": a.radius, **locality(vit)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
