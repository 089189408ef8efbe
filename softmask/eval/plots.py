"""Pictures: training curves, per-word Grad-CAM overlays and soft masks (matplotlib, Agg, files only)."""

from __future__ import annotations

import json
import math
import os
import textwrap
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

LOSS_KEYS = ("loss", "loss_itc", "loss_itm", "loss_softmask", "loss_mlm")
EXTRA_KEYS = ("temperature", "lr")
#: grounding watched during training (rows of the held-out pointing game), drawn together in one panel
POINTING_KEYS = ("pointing_game", "pointing_game_color")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _read_jsonl(path: str) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by an interrupted run
            if isinstance(rec, dict):
                records.append(rec)
    return records


def plot_loss_curves(metrics_jsonl_path: str, out_png: str) -> str:
    """One panel per key of ``loss, loss_itc, loss_itm, loss_softmask, loss_mlm,
    temperature, lr`` present in the metrics file, and one panel with the held-out
    pointing game (``pointing_game``, ``pointing_game_color``, in %) when the file has
    it, against ``step`` (the record's position when a record has no step). Missing keys, non-numeric values and
    unparsable lines are skipped; with no data at all the figure says so.

    Returns ``out_png``.
    """
    if not os.path.isfile(metrics_jsonl_path):
        raise FileNotFoundError(f"metrics_jsonl_path: no such file {metrics_jsonl_path!r}")
    records = _read_jsonl(metrics_jsonl_path)
    series: dict[str, tuple[list[float], list[float]]] = {}
    for pos, rec in enumerate(records):
        step = rec.get("step", pos)
        for key in LOSS_KEYS + EXTRA_KEYS + POINTING_KEYS:
            v = rec.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and isinstance(step, (int, float)):
                xs, ys = series.setdefault(key, ([], []))
                xs.append(float(step))
                ys.append(float(v))
    keys = [k for k in LOSS_KEYS + EXTRA_KEYS if k in series]
    if any(k in series for k in POINTING_KEYS):
        keys.append("pointing")
    plt = _pyplot()
    ncols = min(4, max(1, len(keys)))
    nrows = max(1, math.ceil(len(keys) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.8 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    if not keys:
        ax = axes[0, 0]
        ax.set_visible(True)
        ax.axis("off")
        ax.text(0.5, 0.5, f"no metrics in\n{os.path.basename(metrics_jsonl_path)}", ha="center", va="center")
    for ax, key in zip(axes.flat, keys):
        ax.set_visible(True)
        if key == "pointing":
            for k in POINTING_KEYS:
                if k in series:
                    ax.plot(*series[k], lw=1.2, marker=".", label="shape words" if k == "pointing_game" else "colour words")
            ax.set_title("pointing game, held-out (%)")
            ax.set_xlabel("step")
            ax.set_ylim(0, 100)
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
            continue
        xs, ys = series[key]
        ax.plot(xs, ys, lw=1.2, marker="." if len(xs) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    fig.tight_layout()
    _save(fig, out_png, plt)
    return out_png


def _check_images(images) -> tuple[int, int]:
    """``(n, S)`` of a non-empty ``Tensor[n, 3, S, S]``, or a ValueError naming ``images``."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: expected a Tensor[n, 3, S, S] in [0, 1], got {got}")
    if images.shape[0] == 0:
        raise ValueError("images: expected at least one image, got n = 0")
    return images.shape[0], images.shape[-1]


def _save(fig, out_png: str, plt) -> None:
    d = os.path.dirname(os.path.abspath(out_png))
    os.makedirs(d, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def plot_gradcam_overlays(
    images: torch.Tensor,
    captions: Sequence[str],
    words: Sequence[Sequence[str]],
    cams: Sequence[torch.Tensor],
    out_png: str,
    boxes: Optional[Sequence[Sequence[Optional[Sequence[float]]]]] = None,
) -> str:
    """Grid of Grad-CAM overlays: one row per image, the image (caption as title) then
    one panel per word (cam upsampled bilinearly to S x S, min-max scaled, jet colour
    map blended with alpha 0.5, the word as title, the object's box drawn in white
    when given).

    Args:
        images: Tensor[n, 3, S, S] with values in [0, 1] (see ``softmask.data.denormalize``).
        captions: n strings.
        words: n lists of words (``words[i]`` may be empty).
        cams: n tensors [len(words[i]), g, g] (patch-grid heat maps).
        out_png: output file (folders are created).
        boxes: optional n lists, ``boxes[i][j]`` = pixel ``[x0, y0, x1, y1]`` of
            ``words[i][j]``'s object or None.

    Returns ``out_png``.
    """
    n, s = _check_images(images)
    if len(captions) != n or len(words) != n or len(cams) != n:
        raise ValueError(
            f"captions, words, cams: expected {n} entries each, got {len(captions)}, {len(words)}, {len(cams)}"
        )
    if boxes is not None and len(boxes) != n:
        raise ValueError(f"boxes: expected {n} lists, got {len(boxes)}")
    for i in range(n):
        cam = cams[i]
        if not isinstance(cam, torch.Tensor) or cam.dim() != 3 or cam.shape[0] != len(words[i]):
            got = tuple(cam.shape) if isinstance(cam, torch.Tensor) else type(cam).__name__
            raise ValueError(f"cams[{i}]: expected a Tensor[{len(words[i])}, g, g], got {got}")

    plt = _pyplot()
    from matplotlib.patches import Rectangle

    ncols = 1 + max((len(w) for w in words), default=0)
    fig, axes = plt.subplots(n, ncols, figsize=(2.2 * ncols, 2.5 * n), squeeze=False)
    imgs = images.detach().float().cpu().clamp(0, 1)
    for i in range(n):
        img = imgs[i].permute(1, 2, 0).numpy()  # (S, S, 3)
        ax = axes[i, 0]
        ax.imshow(img)
        ax.set_title("\n".join(textwrap.wrap(captions[i], 28)), fontsize=7)
        cam = cams[i].detach().float().cpu()
        up = F.interpolate(cam[:, None], size=(s, s), mode="bilinear", align_corners=False)[:, 0]  # (W, S, S)
        for j, word in enumerate(words[i]):
            ax = axes[i, 1 + j]
            h = up[j]
            h = (h - h.min()) / (h.max() - h.min()) if float(h.max() - h.min()) > 0 else torch.zeros_like(h)
            ax.imshow(img)
            ax.imshow(h.numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            ax.set_title(word, fontsize=9)
            box = boxes[i][j] if boxes is not None and j < len(boxes[i]) else None
            if box is not None:
                x0, y0, x1, y1 = [float(v) for v in box]
                # imshow puts pixel k's centre at k: pixel edges are at k - 0.5.
                ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec="white", lw=1.5))
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
        for j in range(1 + len(words[i]), ncols):
            axes[i, j].axis("off")
    fig.tight_layout()
    _save(fig, out_png, plt)
    return out_png


def plot_soft_masks(
    images: torch.Tensor,
    captions: Sequence[str],
    words: Sequence[str],
    masks: torch.Tensor,
    out_png: str,
) -> str:
    """One row per image: the image (caption as title), the chosen word's soft mask on the patch grid
    (1 = kept, the floor = most dimmed), and the image multiplied by the mask upsampled to pixels (the
    model multiplies the ViT's patch embeddings, not the pixels: this shows which regions it dims).

    Args:
        images: Tensor[n, 3, S, S] in [0, 1]; captions: n strings; words: n chosen words;
        masks: Tensor[n, g, g] with values in [0, 1]; out_png: output file (folders are created).

    Returns ``out_png``.
    """
    n, s = _check_images(images)
    if not isinstance(masks, torch.Tensor) or masks.dim() != 3 or masks.shape[0] != n:
        got = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise ValueError(f"masks: expected a Tensor[{n}, g, g], got {got}")
    if len(captions) != n or len(words) != n:
        raise ValueError(f"captions, words: expected {n} entries each, got {len(captions)}, {len(words)}")
    plt = _pyplot()
    imgs = images.detach().float().cpu().clamp(0, 1)
    m = masks.detach().float().cpu()
    up = F.interpolate(m[:, None], size=(s, s), mode="nearest")[:, 0]  # (n, S, S)
    fig, axes = plt.subplots(n, 3, figsize=(6.6, 2.4 * n), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(imgs[i].permute(1, 2, 0).numpy())
        axes[i, 0].set_title("\n".join(textwrap.wrap(captions[i], 28)), fontsize=7)
        im = axes[i, 1].imshow(m[i].numpy(), cmap="gray", vmin=0, vmax=1)
        axes[i, 1].set_title(f"mask of '{words[i]}'", fontsize=8)
        axes[i, 2].imshow((imgs[i] * up[i][None]).permute(1, 2, 0).numpy())
        axes[i, 2].set_title("image x mask", fontsize=8)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(im, ax=axes[:, 1].tolist(), shrink=0.6)
    _save(fig, out_png, plt)
    return out_png
