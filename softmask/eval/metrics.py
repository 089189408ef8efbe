"""Retrieval recall@k (ALBEF's ``itm_eval``) and the pointing game."""

from __future__ import annotations

from typing import Sequence

import torch

# Rows of the score matrix ranked at a time: bounds the temporary [chunk, N] masks
# (1024 x 25,000 COCO captions = 25 M booleans).
_CHUNK = 1024


def _check_scores(scores: torch.Tensor) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores_i2t: expected a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"scores_i2t: expected a non-empty [Ni, Nt] matrix, got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        scores = scores.double()
    if torch.isnan(scores).any():
        raise ValueError("scores_i2t: contains NaN")
    return scores.detach()


def text_retrieval_ranks(scores_i2t: torch.Tensor, img2txt: Sequence[Sequence[int]]) -> torch.Tensor:
    """LongTensor[Ni]: 0-based rank of the best-scored ground-truth text of each image.

    rank = #(texts scoring strictly higher than the best ground truth) + #(non-ground-truth
    texts tying with it): ties count against the ground truth, so a constant score
    matrix gives chance level, never 100%.
    """
    scores = _check_scores(scores_i2t)
    ni, nt = scores.shape
    if len(img2txt) != ni:
        raise ValueError(f"img2txt: expected {ni} lists (one per image), got {len(img2txt)}")
    gt = torch.zeros(ni, nt, dtype=torch.bool)
    for i, texts in enumerate(img2txt):
        texts = list(texts)
        if not texts or not all(isinstance(t, int) and 0 <= t < nt for t in texts):
            raise ValueError(f"img2txt[{i}]: expected a non-empty list of text indices in [0, {nt}), got {texts}")
        gt[i, texts] = True
    ranks = torch.empty(ni, dtype=torch.long)
    for s in range(0, ni, _CHUNK):
        sc, g = scores[s : s + _CHUNK].cpu(), gt[s : s + _CHUNK]
        best = torch.where(g, sc, torch.full_like(sc, float("-inf"))).amax(dim=1, keepdim=True)
        ranks[s : s + _CHUNK] = (sc > best).sum(1) + ((sc == best) & ~g).sum(1)
    return ranks


def image_retrieval_ranks(scores_i2t: torch.Tensor, txt2img: Sequence[int]) -> torch.Tensor:
    """LongTensor[Nt]: 0-based rank of the ground-truth image of each text (ties count against it)."""
    scores = _check_scores(scores_i2t)
    ni, nt = scores.shape
    if len(txt2img) != nt:
        raise ValueError(f"txt2img: expected {nt} image indices (one per text), got {len(txt2img)}")
    bad = [(t, i) for t, i in enumerate(txt2img) if not isinstance(i, int) or not 0 <= i < ni]
    if bad:
        raise ValueError(f"txt2img[{bad[0][0]}]: expected an image index in [0, {ni}), got {bad[0][1]!r}")
    gt_img = torch.tensor(list(txt2img), dtype=torch.long)
    ranks = torch.empty(nt, dtype=torch.long)
    scores_t2i = scores.t()  # (Nt, Ni)
    for s in range(0, nt, _CHUNK):
        sc = scores_t2i[s : s + _CHUNK].cpu()
        g = gt_img[s : s + _CHUNK]
        gscore = sc.gather(1, g[:, None])
        ranks[s : s + _CHUNK] = (sc > gscore).sum(1) + (sc == gscore).sum(1) - 1
    return ranks


def retrieval_metrics(
    scores_i2t: torch.Tensor, img2txt: Sequence[Sequence[int]], txt2img: Sequence[int]
) -> dict[str, float]:
    """Recall@{1,5,10} for text and image retrieval, in percent (ALBEF's ``itm_eval``).

    Args:
        scores_i2t: Tensor[Ni, Nt], higher = more similar (image retrieval uses its transpose).
        img2txt: Ni lists, the ground-truth text indices of each image.
        txt2img: Nt ints, the ground-truth image index of each text.

    Returns:
        ``{"tr_r1", "tr_r5", "tr_r10", "tr_mean", "ir_r1", "ir_r5", "ir_r10", "ir_mean",
        "r_mean"}`` as Python floats in [0, 100]. Text retrieval: share of images whose
        best-ranked ground-truth text is within the top k; image retrieval: share of
        texts whose image is within the top k. Ties count against the ground truth.
    """
    tr = text_retrieval_ranks(scores_i2t, img2txt)
    ir = image_retrieval_ranks(scores_i2t, txt2img)
    out: dict[str, float] = {}
    for name, ranks in (("tr", tr), ("ir", ir)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * float((ranks < k).sum()) / ranks.numel()
        out[f"{name}_mean"] = (out[f"{name}_r1"] + out[f"{name}_r5"] + out[f"{name}_r10"]) / 3
    out["r_mean"] = (out["tr_mean"] + out["ir_mean"]) / 2
    return out


def pointing_game_hits(heatmaps: torch.Tensor, boxes: torch.Tensor, image_size: int) -> torch.Tensor:
    """BoolTensor[n]: whether each heatmap's peak patch centre lies inside its box.

    Args:
        heatmaps: Tensor[n, g, g] on the patch grid (not pixels): patch (r, c) covers
            pixels ``[c*S/g, (c+1)*S/g) x [r*S/g, (r+1)*S/g)``.
        boxes: Tensor[n, 4] pixel ``[x0, y0, x1, y1]`` in the S x S image.
        image_size: S.

    The peak is ``argmax`` over the flattened grid (ties: the first patch in row-major
    order, so a flat map points at patch (0, 0)); its centre is
    ``((c + 0.5) * S / g, (r + 0.5) * S / g)`` and it hits when
    ``x0 <= x <= x1 and y0 <= y <= y1``.
    """
    if not isinstance(heatmaps, torch.Tensor) or not isinstance(boxes, torch.Tensor):
        raise TypeError(
            f"heatmaps, boxes: expected torch.Tensors, got {type(heatmaps).__name__}, {type(boxes).__name__}"
        )
    if heatmaps.dim() != 3 or heatmaps.shape[1] != heatmaps.shape[2] or heatmaps.shape[1] == 0:
        raise ValueError(f"heatmaps: expected shape [n, g, g] (patch grid), got {tuple(heatmaps.shape)}")
    n, g = heatmaps.shape[0], heatmaps.shape[1]
    if boxes.shape != (n, 4):
        raise ValueError(f"boxes: expected shape [{n}, 4], got {tuple(boxes.shape)}")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, float)) or image_size <= 0:
        raise ValueError(f"image_size: expected a positive number, got {image_size!r}")
    if torch.isnan(heatmaps).any():
        raise ValueError("heatmaps: contains NaN")
    flat = heatmaps.detach().reshape(n, g * g).float().cpu().argmax(dim=1)  # (n,)
    r, c = flat // g, flat % g
    step = float(image_size) / g
    x, y = (c.double() + 0.5) * step, (r.double() + 0.5) * step
    b = boxes.detach().double().cpu()
    return (x >= b[:, 0]) & (x <= b[:, 2]) & (y >= b[:, 1]) & (y <= b[:, 3])


def pointing_game(heatmaps: torch.Tensor, boxes: torch.Tensor, image_size: int) -> float:
    """Percentage of heatmaps whose peak patch centre falls inside the box (see :func:`pointing_game_hits`).

    Raises ValueError for n = 0.
    """
    hits = pointing_game_hits(heatmaps, boxes, image_size)
    if hits.numel() == 0:
        raise ValueError("heatmaps: expected at least one heatmap, got n = 0")
    return 100.0 * float(hits.sum()) / hits.numel()
