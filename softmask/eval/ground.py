"""``softmask-ground``: referring-expression grounding of a trained run, scored as ALBEF's ``Grounding.py`` scores
RefCOCO+ (:mod:`softmask.eval.grounding`: the Grad-CAM of the ITM logit at ALBEF's fusion layer through the fused
op, averaged over heads and tokens, resized to the image; candidate boxes ranked by heat over the square root of
their area; a hit at IoU >= 0.5).

    softmask-ground --checkpoint RUN --data FILE.json [--image-root DIR] [--out RESULT.json]

``FILE.json`` is ALBEF's RefCOCO+ layout with the boxes inline: a list of ``{"image": path, "text": expression,
"ref_id": id, "bbox": [x, y, w, h] (the referred box), "dets": [[x, y, w, h], ...] (the candidates)}``, boxes in
the image's pixels (COCO's convention), and optionally ``"split"`` (e.g. ``val`` / ``testA`` / ``testB``: the
accuracy is also reported per split). Image paths are relative to ``--image-root``, else to the JSON file's folder.
``python -m softmask.data.export --out DIR`` writes such a file for the shapes test split (``grounding_test.json``).

An entry that cannot be scored (a missing or unreadable image, a box outside its image, an empty candidate list,
an expression longer than the run's text length) is named on one line, with its field, and left out; the others
are scored, the summary says how many were left out, and the exit status is 2 (0 when every entry was scored).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

PROG = "softmask-ground"


def _entries(path: str) -> list:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data {path}: no such file (expected a JSON list of {{\"image\", \"text\", "
                                f"\"bbox\", \"dets\"}} entries)")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--data {path}: not valid JSON ({e})") from None
    if not isinstance(data, list) or not data:
        raise ValueError(f"--data {path}: expected a non-empty JSON list of entries, got "
                         f"{'an empty list' if data == [] else type(data).__name__}")
    return data


def _box_ok(box) -> bool:
    return (isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float))
                                                                    and not isinstance(v, bool) for v in box))


def _check(entry, root: str, tokenizer, max_len: int):
    """``(image path, (width, height))`` of a usable entry, or ``(None, "field: why")``."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(entry, dict):
        return None, f"expected an object with image, text, bbox and dets, got {type(entry).__name__}"
    for name in ("image", "text", "bbox", "dets"):
        if name not in entry:
            return None, f"{name}: missing"
    if not isinstance(entry["text"], str) or not entry["text"].strip():
        return None, f"text: expected a non-empty string, got {entry['text']!r}"
    n_tok = len(tokenizer(entry["text"])["input_ids"])
    if n_tok > max_len:
        return None, f"text: {n_tok} tokens with [CLS] and [SEP], longer than the run's text length ({max_len})"
    path = os.path.join(root, entry["image"]) if isinstance(entry["image"], str) else None
    if path is None or not os.path.isfile(path):
        return None, f"image: no such file ({path if path else entry['image']!r})"
    try:
        with Image.open(path) as im:
            size = im.size
    except (UnidentifiedImageError, OSError) as e:
        return None, f"image: {path} is not a readable image ({e})"
    dets = entry["dets"]
    if not isinstance(dets, list) or not dets:
        return None, "dets: expected a non-empty list of [x, y, w, h] candidate boxes"
    w, h = size
    for name, box in [("bbox", entry["bbox"])] + [(f"dets[{j}]", d) for j, d in enumerate(dets)]:
        if not _box_ok(box):
            return None, f"{name}: expected [x, y, w, h] numbers, got {box!r}"
        x, y, bw, bh = box
        if bw <= 0 or bh <= 0 or x < 0 or y < 0 or x + bw > w or y + bh > h:
            return None, f"{name}: {list(box)} is not inside the {w}x{h} image (expected 0 <= x, x + w <= {w}, " \
                         f"0 <= y, y + h <= {h}, w and h > 0)"
    return path, size


def _load_rgb(path: str, transform):
    from PIL import Image

    with Image.open(path) as im:
        return transform(im.convert("RGB"))


def ground(checkpoint: str, data: str, *, image_root=None, device="cpu", batch_size: int = 32, log=sys.stderr) -> dict:
    """Score every usable entry of ``data`` with the run ``checkpoint``. Returns the summary (module docstring);
    the entries left out are named on ``log``."""
    import torch

    from softmask.data import Collator, image_transform
    from softmask.eval.evaluate import load_model
    from softmask.eval.grounding import albef_layer, expression_heat, iou_xywh, pick_box

    entries = _entries(data)
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(data))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--image-root {root}: no such directory")
    model, tokenizer, run_cfg, ckpt = load_model(checkpoint, device)
    model.eval()
    max_len = int(run_cfg["train"].get("max_len", 24))
    usable, left_out = [], 0
    for k, entry in enumerate(entries):
        path, info = _check(entry, root, tokenizer, max_len)
        if path is None:
            ref = entry.get("ref_id") if isinstance(entry, dict) else None
            print(f"{PROG}: entry {k}{f' (ref_id {ref})' if ref is not None else ''}: {info}; left out", file=log)
            left_out += 1
        else:
            usable.append((k, path, info))
    transform = image_transform(model.cfg.image_size, False)
    collate = Collator(tokenizer, max_len)
    hits, per_split = [], {}
    for s in range(0, len(usable), batch_size):
        chunk = usable[s: s + batch_size]
        images = torch.stack([_load_rgb(p, transform) for _, p, _ in chunk])
        tok = collate.tokenize([entries[k]["text"] for k, _, _ in chunk])
        with torch.no_grad():
            embeds, _ = model.encode_image(images.to(device))
        heat = expression_heat(model, embeds.float().cpu(), tok["input_ids"], tok["attention_mask"], device=device)
        for (k, _, (w, h)), m in zip(chunk, heat):
            e = entries[k]
            best = pick_box(m, e["dets"], h, w)
            hit = iou_xywh(e["bbox"], e["dets"][best]) >= 0.5
            hits.append(hit)
            per_split.setdefault(str(e.get("split", "all")), []).append(hit)
    res = {"checkpoint": os.path.abspath(ckpt), "data": os.path.abspath(data), "entries": len(entries),
           "scored": len(hits), "left_out": left_out, "layer": albef_layer(model.cfg.fusion_layers),
           "grounding_acc": 100.0 * sum(hits) / len(hits) if hits else None}
    if len(per_split) > 1 or "all" not in per_split:
        res["per_split"] = {k: 100.0 * sum(v) / len(v) for k, v in sorted(per_split.items())}
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a softmask run or checkpoint directory")
    p.add_argument("--data", required=True, help="referring expressions: a JSON list of {image, text, bbox, dets}")
    p.add_argument("--image-root", default=None, help="folder the image paths are relative to (default: the JSON's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default=None, help="where the result JSON goes (default: RUN/grounding.json)")
    a = p.parse_args(argv)
    from softmask.runs.device import check_device
    from softmask.runs.errors import ConfigError

    try:
        if a.batch_size < 1:
            raise ConfigError("batch_size", a.batch_size, "expected a positive integer")
        device = check_device(a.device)
        res = ground(a.checkpoint, a.data, image_root=a.image_root, device=device, batch_size=a.batch_size)
    except ConfigError as e:
        flag = f"--{e.field.replace('_', '-')}"
        print(f"{PROG}: error: {e.render(flag, flag=True)}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    out = a.out or os.path.join(a.checkpoint, "grounding.json")
    with open(out, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))
    if res["left_out"]:
        print(f"{PROG}: {res['left_out']} of {res['entries']} entries left out (named above); {res['scored']} scored",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
