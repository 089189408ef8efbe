"""``python -m softmask.data.export --out DIR [--size N]``: the embedded shapes data as files.

Writes ``DIR/images/train/NNNNNN.jpg`` and ``DIR/images/test/NNNNNN.jpg`` and, next to
them, ``DIR/train.json`` and ``DIR/test.json`` in the caption-JSON format that
``softmask-pretrain --data`` reads (:class:`softmask.data.CaptionJsonDataset`)::

    [{"image": "images/train/000000.jpg", "caption": "a red circle left of a blue square"}, ...]

Image paths are relative to the JSON file's folder. Item ``i`` of a split is item ``i``
of :class:`softmask.data.ShapesDataset` with the same ``seed`` and ``image_size``, so
``softmask-pretrain --data DIR/train.json --test-data DIR/test.json`` trains on the
pictures the default job draws (JPEG-compressed). ``--data shapes-partial`` / ``shapes-longtail`` export a variant
(:data:`softmask.data.shapes.VARIANTS`). Each entry also carries its image's objects (``"objects"``: the named ones,
``"scene_objects"`` where a caption names part of the image), which caption-JSON readers ignore.

``DIR/grounding_test.json`` is the test split as a referring-expression set in ALBEF's RefCOCO+ layout with the boxes
inline, what ``softmask-ground --data`` reads: one entry per named object, ``{"image", "text", "ref_id", "bbox",
"dets"}``, with ``text`` the object's noun phrase as the captions write it ("a red circle"), ``bbox`` its box and
``dets`` the boxes of every object of the image, as ``[x, y, w, h]`` in pixels (COCO's convention).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from softmask.data.shapes import DEFAULT_SIZES, VARIANTS, ShapesDataset, phrase, xywh

__all__ = ["export_shapes", "main"]


def export_shapes(out: str, size: int = DEFAULT_SIZES["train"], test_size: int = DEFAULT_SIZES["test"], *,
                  image_size: int = 64, seed: int = 0, quality: int = 95, data: str = "shapes") -> dict:
    """Write ``size`` training and ``test_size`` test pairs under ``out`` (see the module docstring).
    ``data``: the shapes data or a variant of it (:data:`~softmask.data.shapes.VARIANTS`). Returns ``{"train":
    path of train.json, "test": path of test.json, "grounding": path of grounding_test.json}``.

    Raises:
        ValueError: a size below 1, an ``image_size`` below 16, a negative ``seed`` or a ``quality``
            outside [1, 95] (the message starts with the argument's name).
    """
    problem = _check(size=size, test_size=test_size, image_size=image_size, seed=seed, quality=quality)
    if problem:
        name, expected = problem
        raise ValueError(f"{name}: expected {expected}, got {locals()[name]!r}")
    if data not in VARIANTS:
        raise ValueError(f"data: expected one of {', '.join(repr(v) for v in VARIANTS)}, got {data!r}")
    paths = {}
    for split, n in (("train", size), ("test", test_size)):
        ds = ShapesDataset(split=split, size=n, image_size=image_size, seed=seed, variant=VARIANTS[data])
        folder = os.path.join(out, "images", split)
        os.makedirs(folder, exist_ok=True)
        entries, refs = [], []
        for i in range(n):
            item = ds[i]
            rel = f"images/{split}/{i:06d}.jpg"
            # 4:4:4 (no chroma subsampling): 2x2 colour blocks would smear the edges of 14-28 px objects
            item["image"].save(os.path.join(out, rel), format="JPEG", quality=quality, subsampling=0)
            entry = {"image": rel, "caption": item["caption"], "objects": item["objects"]}
            if "scene_objects" in item:
                entry["scene_objects"] = item["scene_objects"]
            entries.append(entry)
            every = item.get("scene_objects", item["objects"])
            for o in item["objects"]:
                refs.append({"image": rel, "text": phrase(o["color"], o["word"]), "ref_id": len(refs),
                             "bbox": xywh(o["box"]), "dets": [xywh(d["box"]) for d in every]})
        paths[split] = _write_json(os.path.join(out, f"{split}.json"), entries)
        if split == "test":
            paths["grounding"] = _write_json(os.path.join(out, "grounding_test.json"), refs)
    return paths


def _write_json(path: str, obj) -> str:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)
    return path


def _check(**args):
    """``(name, what is expected)`` of the first bad argument, or None."""
    rules = {"size": (1, None), "test_size": (1, None), "image_size": (16, None), "seed": (0, None),
             "quality": (1, 95)}
    for name, value in args.items():
        low, high = rules[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high and value > high):
            return name, f"an integer in [{low}, {high}]" if high else f"an integer >= {low}"
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m softmask.data.export", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (created; existing files of the same names are "
                                                "replaced)")
    p.add_argument("--size", type=int, default=DEFAULT_SIZES["train"], help="training pairs")
    p.add_argument("--test-size", type=int, default=DEFAULT_SIZES["test"], help="test pairs")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels (the tiny preset reads 64)")
    p.add_argument("--seed", type=int, default=0, help="shapes data seed (item i is a function of seed, split, i)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality (1-95)")
    p.add_argument("--data", choices=tuple(VARIANTS), default="shapes", help="the shapes data or a variant of it")
    a = p.parse_args(argv)
    problem = _check(size=a.size, test_size=a.test_size, image_size=a.image_size, seed=a.seed, quality=a.quality)
    if problem:
        name, expected = problem
        print(f"{p.prog}: error: --{name.replace('_', '-')} {getattr(a, name)}: expected {expected}", file=sys.stderr)
        return 2
    try:
        paths = export_shapes(a.out, a.size, a.test_size, image_size=a.image_size, seed=a.seed, quality=a.quality,
                              data=a.data)
    except OSError as e:
        print(f"{p.prog}: error: --out {a.out}: cannot write there ({e.strerror or e}); expected a writable "
              f"directory", file=sys.stderr)
        return 2
    print(f"wrote {a.size} training and {a.test_size} test pairs ({a.data}): {paths['train']}, {paths['test']}; "
          f"referring expressions of the test split: {paths['grounding']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
