"""The caption-JSON sets of a run, checked before any work starts, and what a finished run is evaluated on.

Used by training (:func:`softmask.train.data.prepare_data`) and evaluation (``softmask-eval``) alike, so it sits
below both.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from softmask.data.shapes import is_shapes
from softmask.runs.errors import ConfigError

__all__ = ["HOLDOUT_FILE", "check_test_json", "eval_target", "annotate_eval", "load_json_set", "dropped_note",
           "root_of", "write_json_atomic"]

HOLDOUT_FILE = "heldout.json"


def write_json_atomic(path: str, obj, indent: int = 1) -> None:
    """Write ``obj`` as JSON to ``path`` under a temporary name, then rename it: a kill leaves the old file or the
    new one, never half of one (a leftover ``<path>.tmp-<pid>`` is all it can leave)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)
    os.replace(tmp, path)


def load_json_set(field: str, path: str, image_root: Optional[str], transform, *, open_images: bool):
    """A caption-JSON data set with its missing (``open_images``: or unidentifiable) images dropped.
    Returns ``(dataset, dropped_paths, n_images)``; bad files raise :class:`ConfigError` on ``field``."""
    from softmask.data.json_dataset import CaptionJsonDataset, CaptionJsonError

    if not os.path.isfile(path):
        raise ConfigError(field, path, "no such file (expected a caption JSON file: a list of "
                                       "{\"image\": path, \"caption\": text or [texts]})")
    if image_root is not None and not os.path.isdir(image_root):
        root_field = "image_root" if field == "data" else "test_image_root"
        raise ConfigError(root_field, image_root, "no such directory (expected the folder the JSON's image paths "
                                                  "are relative to)")
    try:
        ds = CaptionJsonDataset(path, image_root=image_root, transform=transform)
    except CaptionJsonError as e:
        raise ConfigError(field, path, e.detail) from None
    n_images = len(ds.image_paths)
    if n_images == 0:
        raise ConfigError(field, path, "the JSON list is empty (expected at least one {\"image\", \"caption\"} "
                                       "entry)")
    ds, dropped = ds.drop_missing(open_images=open_images)
    if len(ds.image_paths) == 0:
        what = "missing or unreadable" if open_images else "missing"
        raise ConfigError(field, path, f"no images left: all {n_images} images are {what} (first: {dropped[0]}); "
                                       f"expected image files at the entries' paths, relative to "
                                       f"{'--image-root' if field == 'data' else '--test-image-root'} or else to "
                                       f"the JSON file's folder")
    return ds, dropped, n_images


def check_test_json(field: str, path: str, image_root: Optional[str]) -> list:
    """Check a caption JSON that a run is evaluated on: it exists, parses, and at least one of its images
    exists and has a header PIL can identify. Returns lines about the images dropped (for the log)."""
    _, dropped, n = load_json_set(field, path, image_root, None, open_images=True)
    return [dropped_note(field, path, dropped, n)] if dropped else []


def dropped_note(field: str, path: str, dropped: list, n: int) -> str:
    flag = "--" + field.replace("_", "-")
    return (f"{flag} {path}: {len(dropped)} of {n} images are missing or unreadable and were left out "
            f"(first: {dropped[0]})")


def root_of(json_path: str, image_root: Optional[str]) -> str:
    """The folder a JSON's relative image paths are read from (``image_root``, else the JSON's folder)."""
    return image_root if image_root is not None else os.path.dirname(os.path.abspath(json_path))


def eval_target(run_train_cfg: dict, run_dir: str) -> tuple:
    """``(data, image_root, split)`` that a finished run is evaluated on by default: its ``test_data``,
    else the images held out of its training JSON (``<run_dir>/heldout.json``), else its training data
    (``"shapes"`` or a variant: its held-out split)."""
    test = run_train_cfg.get("test_data")
    if test:
        return test, root_of(test, run_train_cfg.get("test_image_root")), "test"
    data = run_train_cfg.get("data", "shapes")
    if is_shapes(data):
        return data, None, "shapes_test"
    held = os.path.join(run_dir, HOLDOUT_FILE)
    if os.path.isfile(held):
        return held, os.path.dirname(os.path.abspath(held)), "heldout"
    return data, root_of(data, run_train_cfg.get("image_root")), "train"


def annotate_eval(eval_json: str, data: str, split: str) -> dict:
    """Add what the numbers of ``eval_json`` were computed on: ``eval_data`` (the data set),
    ``eval_split`` (``"test"``, ``"heldout"``, ``"train"``, ``"shapes_test"`` or ``"given"``) and
    ``eval_on_training_data``. Rewrites the file atomically; returns the annotated results."""
    with open(eval_json, encoding="utf-8") as f:
        res = json.load(f)
    res.update(eval_data=data, eval_split=split, eval_on_training_data=split == "train")
    write_json_atomic(eval_json, res)
    return res
