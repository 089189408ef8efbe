"""ALBEF / COCO-style caption JSON data sets."""

from __future__ import annotations

import json
import os
import warnings
from typing import Iterable, Optional

import torch
from PIL import Image, UnidentifiedImageError


__all__ = ["CaptionJsonDataset", "CaptionJsonError"]


class CaptionJsonError(ValueError):
    """A caption JSON file that is not a list of ``{"image", "caption"}`` entries. ``str(e)`` is
    ``"<path>: <detail>"``; :attr:`path` and :attr:`detail` give the two parts."""

    def __init__(self, path: str, detail: str):
        super().__init__(f"{path}: {detail}")
        self.path, self.detail = path, detail


class CaptionJsonDataset(torch.utils.data.Dataset):
    """Image-caption pairs from a JSON list ``[{"image": path, "caption": str | [str, ...]}, ...]``.

    A list caption gives one item per caption (all sharing one image id): ALBEF's retrieval test
    files (``[{"image", "caption": [...]}]``, several captions per image) load as they are, with
    :attr:`txt2img` / :attr:`img2txt` for the retrieval metrics. Relative image paths are joined to
    ``image_root`` when given, otherwise to the folder of the JSON file; absolute paths are used as
    they are.

    An entry may carry ``"image_id"`` (any JSON scalar, as in ALBEF's retrieval training files,
    ``{"image", "caption", "image_id"}``): the positive id of its captions for retrieval fine-tuning.
    The values are mapped to ints in order of first appearance, as ALBEF's ``re_train_dataset``
    does (so ``"coco_9"`` and ``9`` are two ids, ``9`` twice is one). An entry without one (or with
    ``null``) takes the id of its image path: entries naming the same image share it. Other keys of
    an entry are ignored.

    ``ds[i]`` is ``{"image": transform(PIL RGB) or PIL, "caption": str, "objects": [],
    "index": i, "image_id": int, "id": int}`` (``image_id`` indexes :attr:`image_paths`; ``id`` is
    the positive id, :attr:`ids`), or
    ``None`` when the image is missing or unreadable: the path and reason are given
    with ``warnings.warn`` and :attr:`num_skipped` is incremented (per process: with
    DataLoader workers each worker counts its own; :class:`softmask.data.Collator`
    reports dropped items per batch). Nothing raises mid-epoch.

    Attributes:
        image_paths: list[str], resolved path of every distinct image (first-seen order).
        image_names: list[str], the same images' paths as written in the JSON file.
        txt2img: list[int], image id of every item (caption).
        img2txt: list[list[int]], item indices of every image, for retrieval metrics.
        ids: list[int], positive id of every item (from ``image_id``, else from the image path); kept
            as they are by :meth:`subset` and :meth:`drop_missing`.
        num_skipped: int, items returned as None so far in this process.

    :meth:`drop_missing` removes the images that are not files (before training, so
    that a wrong ``image_root`` is noticed at once) and :meth:`subset` keeps some
    images; :meth:`entries` gives the JSON entries back (e.g. to write a split).

    Raises:
        FileNotFoundError: ``json_path`` does not exist.
        CaptionJsonError (a ValueError): the file is not valid JSON or not a list of such
            entries (the message names the file and the entry index).
    """

    def __init__(self, json_path: str, image_root: Optional[str] = None, transform=None):
        json_path = os.fspath(json_path)
        if not os.path.isfile(json_path):
            raise FileNotFoundError(f"json_path: no such file {json_path!r}")
        try:
            with open(json_path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CaptionJsonError(json_path, f"not valid JSON: {e}") from e
        if not isinstance(data, list):
            raise CaptionJsonError(json_path, f"expected a JSON list of {{'image', 'caption'}} entries, got "
                                              f"{type(data).__name__}")
        root = os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(json_path))
        self.json_path = json_path
        self.image_root = root
        self.transform = transform
        self.num_skipped = 0
        self.image_paths: list[str] = []
        self.image_names: list[str] = []
        self.captions: list[str] = []
        self.txt2img: list[int] = []
        self.img2txt: list[list[int]] = []
        self.ids: list[int] = []
        path_ids: dict[str, int] = {}
        positive_ids: dict[tuple, int] = {}  # ("id", JSON text of image_id) or ("path", resolved path) -> int
        for k, entry in enumerate(data):
            where = f"entry {k}"
            if not isinstance(entry, dict):
                raise CaptionJsonError(json_path, f"{where}: expected an object with 'image' and 'caption', got "
                                                  f"{type(entry).__name__}")
            image, caption = entry.get("image"), entry.get("caption")
            if "image" not in entry:
                raise CaptionJsonError(json_path, f"{where} has no 'image' (expected a non-empty string path)")
            if "caption" not in entry:
                raise CaptionJsonError(json_path, f"{where} has no 'caption' (expected a string or a non-empty "
                                                  f"list of strings)")
            if not isinstance(image, str) or not image:
                raise CaptionJsonError(json_path, f"{where}: 'image' must be a non-empty string path, got {image!r}")
            if isinstance(caption, str):
                caps = [caption]
            elif isinstance(caption, list) and caption and all(isinstance(c, str) for c in caption):
                caps = caption
            else:
                raise CaptionJsonError(json_path, f"{where}: 'caption' must be a string or a non-empty list of "
                                                  f"strings, got {caption!r}")
            image_id = entry.get("image_id")
            if isinstance(image_id, (list, dict)):
                raise CaptionJsonError(json_path, f"{where}: 'image_id' must be a JSON scalar (string, number or "
                                                  f"boolean), got {type(image_id).__name__}")
            path = image if os.path.isabs(image) else os.path.join(root, image)
            key = ("path", path) if image_id is None else ("id", json.dumps(image_id))
            pid = positive_ids.setdefault(key, len(positive_ids))
            if path not in path_ids:
                path_ids[path] = len(self.image_paths)
                self.image_paths.append(path)
                self.image_names.append(image)
                self.img2txt.append([])
            img_id = path_ids[path]
            for c in caps:
                self.img2txt[img_id].append(len(self.captions))
                self.captions.append(c)
                self.txt2img.append(img_id)
                self.ids.append(pid)

    def __len__(self) -> int:
        return len(self.captions)

    def subset(self, image_ids: Iterable[int]) -> "CaptionJsonDataset":
        """A new data set with only the images ``image_ids`` (in that order) and all their captions;
        image ids, ``txt2img`` and ``img2txt`` are renumbered, the positive :attr:`ids` kept. The
        transform is shared."""
        new = object.__new__(type(self))
        new.json_path, new.image_root, new.transform, new.num_skipped = (self.json_path, self.image_root,
                                                                         self.transform, 0)
        new.image_paths, new.image_names, new.captions, new.txt2img, new.img2txt = [], [], [], [], []
        new.ids = []
        for i in image_ids:
            new.image_paths.append(self.image_paths[i])
            new.image_names.append(self.image_names[i])
            new.img2txt.append([])
            for t in self.img2txt[i]:
                new.img2txt[-1].append(len(new.captions))
                new.captions.append(self.captions[t])
                new.txt2img.append(len(new.image_paths) - 1)
                new.ids.append(self.ids[t])
        return new

    def drop_missing(self, *, open_images: bool = False) -> tuple["CaptionJsonDataset", list[str]]:
        """``(kept, dropped_paths)``: a data set without the images that are not files (``open_images``:
        nor files PIL cannot identify from their header; the full decode still happens, and can still
        fail, in ``ds[i]``), and the resolved paths of the dropped images."""
        keep, dropped = [], []
        for i, path in enumerate(self.image_paths):
            ok = os.path.isfile(path)
            if ok and open_images:
                try:
                    with Image.open(path):
                        pass
                except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError):
                    ok = False
            (keep if ok else dropped).append(i if ok else path)
        return self.subset(keep), dropped

    def entries(self, absolute: bool = False) -> list[dict]:
        """The data set as caption-JSON entries, one per image: ``{"image": name, "caption": [str, ...]}``
        (``absolute``: the resolved paths, so that the file can live anywhere)."""
        names = self.image_paths if absolute else self.image_names
        return [{"image": os.path.abspath(names[i]) if absolute else names[i],
                 "caption": [self.captions[t] for t in self.img2txt[i]]} for i in range(len(self.image_paths))]

    def __getitem__(self, index: int) -> Optional[dict]:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index: expected 0 <= index < {len(self)}, got {index}")
        img_id = self.txt2img[index]
        path = self.image_paths[img_id]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")  # forces a full decode: truncated files fail here
        except FileNotFoundError:
            return self._skip(path, "file not found")
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
            return self._skip(path, f"unreadable image ({type(e).__name__}: {e})")
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "caption": self.captions[index], "objects": [], "index": index, "image_id": img_id,
                "id": self.ids[index]}

    def _skip(self, path: str, reason: str) -> None:
        self.num_skipped += 1
        warnings.warn(f"skipping image {path}: {reason}", RuntimeWarning, stacklevel=3)
        return None
