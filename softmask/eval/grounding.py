"""Referring-expression grounding scored as ALBEF's ``Grounding.py`` scores it (its ``--gradcam_mode itm``).

For an image and an expression: the Grad-CAM of the ITM match logit at one cross-attention layer of the fusion
encoder (ALBEF: BERT layer 8, the third of its six fusion layers), ALBEF's map ``attention * max(gradient, 0)``
averaged over the heads and over the expression's tokens ([CLS] and [SEP] included, as ALBEF's attention mask
includes them), each token's row recomputed by the fused op (:func:`softmask.word_gradcam`); the patch-grid map
resized to the image (bicubic); every candidate box ``[x, y, w, h]`` scored by the heat inside it over the square
root of its area; the best box a hit when its IoU with the referred box is at least 0.5 (ALBEF's ``computeIoU``,
whose boxes span ``x .. x + w - 1``).

:func:`shapes_grounding` applies it to the shapes held-out split (the expression: one object's noun phrase, "a red
circle"; the candidates: every object's box), beside the pointing game; ``softmask-ground`` applies it to a
RefCOCO+-style JSON file (:mod:`softmask.eval.ground`).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

import softmask
from softmask.eval.scoring import trim

__all__ = ["albef_layer", "expression_heat", "box_scores", "iou_xywh", "pick_box", "shapes_grounding"]

#: The fusion layer of ALBEF's grounding (0-based), counted in fusion layers: BERT layer 8 of base's 12 is the third
#: of the six fusion layers (6-11).
ALBEF_FUSION_LAYER = 2


def albef_layer(fusion_layers: int) -> int:
    """The fusion layer the grounding reads: ALBEF's third (index 2) when the model has at least four fusion layers,
    else the last but one (the last layer's cross-attention reaches the ITM [CLS] logit only through [CLS]'s own row;
    the tiny preset's two layers: layer 0)."""
    return max(0, min(ALBEF_FUSION_LAYER, fusion_layers - 2))


def expression_heat(model, img_embeds: torch.Tensor, txt_ids: torch.Tensor, txt_masks: torch.Tensor, *,
                    layer: Optional[int] = None, batch_size: int = 64, device="cpu",
                    backend: Optional[str] = None) -> torch.Tensor:
    """ALBEF's grounding map ``[n, g, g]`` of expression ``i`` (``txt_ids[i]``, ``txt_masks[i]``) on image ``i``
    (``img_embeds[i] [N, Dv]``): the Grad-CAM of the pair's ITM match logit at fusion layer ``layer`` (default
    :func:`albef_layer`), averaged over the heads and over the expression's tokens, image [CLS] key dropped."""
    layer = albef_layer(model.cfg.fusion_layers) if layer is None else layer
    backend = backend or model.cfg.op_backend
    g = model.cfg.grid
    out = []
    for s in range(0, img_embeds.shape[0], batch_size):
        ids, mask = trim(txt_ids[s: s + batch_size].to(device), txt_masks[s: s + batch_size].to(device))
        ie = img_embeds[s: s + batch_size].to(device)
        with torch.no_grad():
            te, _ = model.encode_text(ids, mask)
        _, _, q, k, v, gc = model.word_gradcam_inputs(te, mask, ie, retain_graph=False, layer=layer)
        n, L = ids.shape
        heat = torch.zeros(n, k.shape[2], dtype=torch.float32, device=ie.device)
        for t in range(L):  # one row per token: the fused op never builds the [n, H, L, N] maps
            cam = softmask.word_gradcam(q, k, v, gc, torch.full((n,), t, dtype=torch.long, device=ie.device),
                                        backend=backend)
            heat += cam.float() * mask[:, t, None].float()
        heat /= mask.sum(1, keepdim=True).float()
        out.append(heat[:, 1:].reshape(n, g, g).cpu())
    return torch.cat(out) if out else torch.zeros(0, g, g)


def box_scores(heat: torch.Tensor, boxes: Sequence[Sequence[float]], height: int, width: int) -> torch.Tensor:
    """ALBEF's candidate scores: ``heat [g, g]`` resized to ``height x width`` (bicubic), then for every box
    ``[x, y, w, h]`` the sum of the resized heat over rows ``int(y) .. int(y + h)`` and columns ``int(x) ..
    int(x + w)`` (ALBEF's slice) over ``(w * h) ** 0.5``."""
    m = F.interpolate(heat[None, None].double(), size=(height, width), mode="bicubic", align_corners=False)[0, 0]
    scores = []
    for x, y, w, h in boxes:
        area = w * h
        scores.append(float(m[int(y): int(y + h), int(x): int(x + w)].sum()) / area ** 0.5 if area > 0 else -math.inf)
    return torch.tensor(scores, dtype=torch.float64)


def iou_xywh(a: Sequence[float], b: Sequence[float]) -> float:
    """ALBEF's ``computeIoU`` of two ``[x, y, w, h]`` boxes (a box covers ``x .. x + w - 1``)."""
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[0] + a[2] - 1, b[0] + b[2] - 1), min(a[1] + a[3] - 1, b[1] + b[3] - 1)
    inter = (x2 - x1 + 1) * (y2 - y1 + 1) if x1 < x2 and y1 < y2 else 0
    return float(inter) / (a[2] * a[3] + b[2] * b[3] - inter)


def pick_box(heat: torch.Tensor, dets: Sequence[Sequence[float]], height: int, width: int) -> int:
    """The index of the candidate box ALBEF's protocol picks (the first of equal scores)."""
    return int(torch.argmax(box_scores(heat, dets, height, width)))


def shapes_grounding(model, tokenizer, enc, dataset, *, device="cpu", max_len: int = 32) -> Optional[dict]:
    """ALBEF-protocol grounding on a shapes evaluation set (``enc``: :class:`~softmask.eval.evaluate.EncodedSet` of
    ``dataset``, a :class:`~softmask.data.ShapesDataset`): every named object of every image is one expression, its
    noun phrase ("a red circle"), and the candidates are the boxes of every object in the image. Returns
    ``{"grounding_acc": % hits, "grounding_n": expressions, "grounding_layer": fusion layer, "grounding_chance": % of
    hits by a uniformly random candidate}``, or None when the data set has no scenes."""
    from softmask.data import Collator
    from softmask.data.shapes import phrase, xywh

    if not hasattr(dataset, "scene") or not enc.item_index:
        return None
    S = model.cfg.image_size
    pi, texts, refs, dets = [], [], [], []
    for i, item in enumerate(enc.item_index):
        scene = dataset.scene(item)
        every = [list(o["box"]) for o in scene.get("scene_objects", scene["objects"])]
        for o in scene["objects"]:
            pi.append(i)
            texts.append(phrase(o["color"], o["word"]))
            refs.append(list(o["box"]))
            dets.append(every)
    if not pi:
        return None
    tok = Collator(tokenizer, max_len).tokenize(texts)
    heat = expression_heat(model, enc.img_embeds[torch.tensor(pi)], tok["input_ids"], tok["attention_mask"],
                           device=device)
    hits, chance = 0, 0.0
    for h, ref, cands in zip(heat, refs, dets):
        boxes = [xywh(b) for b in cands]
        hits += iou_xywh(xywh(ref), boxes[pick_box(h, boxes, S, S)]) >= 0.5
        chance += sum(iou_xywh(xywh(ref), b) >= 0.5 for b in boxes) / len(boxes)
    n = len(pi)
    return {"grounding_acc": 100.0 * hits / n, "grounding_n": n, "grounding_chance": 100.0 * chance / n,
            "grounding_layer": albef_layer(model.cfg.fusion_layers)}
