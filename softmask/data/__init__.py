"""softmask.data: the synthetic shapes data set, caption-JSON data sets, the tokenizer,
augmentations, batch collation and word-position helpers."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from softmask.data.augment import (
    IMAGE_MEAN,
    IMAGE_STD,
    CaptionSafeRandAugment,
    denormalize,
    image_transform,
    mask_tokens,
)
from softmask.data.json_dataset import CaptionJsonDataset
from softmask.data.shapes import COLORS, RELATIONS, SHAPES, VARIANTS, ShapesDataset, is_shapes, object_set_id
from softmask.data.tokenizer import (
    SPECIAL_TOKENS,
    build_shapes_tokenizer,
    get_tokenizer,
    load_tokenizer,
)

__all__ = [
    "COLORS",
    "SHAPES",
    "RELATIONS",
    "ShapesDataset",
    "VARIANTS",
    "is_shapes",
    "object_set_id",
    "CaptionJsonDataset",
    "SPECIAL_TOKENS",
    "build_shapes_tokenizer",
    "load_tokenizer",
    "get_tokenizer",
    "IMAGE_MEAN",
    "IMAGE_STD",
    "CaptionSafeRandAugment",
    "image_transform",
    "denormalize",
    "mask_tokens",
    "build_dataset",
    "Collator",
    "word_positions",
    "candidate_word_mask",
    "FUNCTION_WORDS",
    "SOFTMASK_WORDS",
]


def build_dataset(
    spec: str,
    split: str,
    image_size: int,
    *,
    train: bool,
    image_root: Optional[str] = None,
    seed: int = 0,
    size: Optional[int] = None,
    distort: bool = True,
):
    """Data set from a spec: ``"shapes"`` (or a variant of it, :data:`VARIANTS`: ``"shapes-partial"``,
    ``"shapes-longtail"``) → :class:`ShapesDataset` (``split``, ``size``,
    ``seed``); a path ending in ``.json`` → :class:`CaptionJsonDataset` (``split``,
    ``seed`` and ``size`` are ignored: one JSON file is one split). Both use
    ``image_transform(image_size, train, distort)`` (``distort=False``: training crops without the
    caption-safe RandAugment, the image half of the multi-modal augmentation switched off).
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"spec: expected 'shapes' or a path to a .json file, got {type(spec).__name__}")
    spec = os.fspath(spec)
    transform = image_transform(image_size, train, distort)
    if spec in VARIANTS:
        return ShapesDataset(split=split, size=size, image_size=image_size, seed=seed, transform=transform,
                             variant=VARIANTS[spec])
    if spec.lower().endswith(".json"):
        return CaptionJsonDataset(spec, image_root=image_root, transform=transform)
    raise ValueError(f"spec: expected {', '.join(repr(v) for v in VARIANTS)} or a path ending in .json, got {spec!r}")


class Collator:
    """Batch a list of data-set items (``None`` items are dropped).

    ``collate(items)`` returns a dict:

    - ``"image"``: FloatTensor[B, 3, S, S] (items must carry transformed tensors),
    - ``"input_ids"``, ``"attention_mask"``: LongTensor[B, max_len] (padded to
      ``max_len``, truncated, [CLS] first),
    - ``"captions"``: list[str] (B), ``"objects"``: list[list[dict]] (B),
    - ``"index"``: LongTensor[B], ``"image_id"``: LongTensor[B],
    - ``"ids"``: LongTensor[B], the positive id of every pair for retrieval fine-tuning (the items'
      ``"id"``: the object set of a shapes image, the ``image_id`` of a caption-JSON entry; items
      without one use their ``"image_id"``),
    - ``"holds"``: BoolTensor[B, B] and ``"scene_objects"``, only when every item carries
      ``"scene_objects"`` (captions that name part of the image, ``shapes-partial``): ``holds[i, j]`` is
      whether caption j is true of image i, so that ITM never takes it as a negative of image i,
    - ``"num_dropped"``: int, ``None`` items dropped from this batch (an addition, so
      that training loops can sum drops across DataLoader worker processes).

    :attr:`num_dropped` counts dropped items over all calls in this process. When
    every item of a batch is ``None`` the call returns ``None``: skip that step.
    """

    def __init__(self, tokenizer, max_len: int):
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
            raise ValueError(f"max_len: expected an int >= 2 (room for [CLS] and [SEP]), got {max_len!r}")
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.num_dropped = 0

    def __call__(self, items: Sequence[Optional[dict]]) -> Optional[dict]:
        kept = [it for it in items if it is not None]
        dropped = len(items) - len(kept)
        self.num_dropped += dropped
        if not kept:
            return None
        images = [it["image"] for it in kept]
        if not all(isinstance(im, torch.Tensor) for im in images):
            bad = next(type(im).__name__ for im in images if not isinstance(im, torch.Tensor))
            raise TypeError(f"items[*]['image']: expected tensors (give the data set a transform), got {bad}")
        shapes = {tuple(im.shape) for im in images}
        if len(shapes) != 1:
            raise ValueError(f"items[*]['image']: expected one shape [3, S, S] for the batch, got {sorted(shapes)}")
        captions = [it["caption"] for it in kept]
        enc = self.tokenize(captions)
        return {
            "image": torch.stack(images).float(),
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "captions": captions,
            "objects": [list(it.get("objects", [])) for it in kept],
            "index": torch.tensor([int(it["index"]) for it in kept], dtype=torch.long),
            "image_id": torch.tensor([int(it.get("image_id", it["index"])) for it in kept], dtype=torch.long),
            "ids": torch.tensor([int(it.get("id", it.get("image_id", it["index"]))) for it in kept], dtype=torch.long),
            "num_dropped": dropped,
            **self._holds(kept, captions),
        }

    @staticmethod
    def _holds(kept, captions) -> dict:
        """Items whose captions name part of their image (``"scene_objects"``: the shapes-partial data) add
        ``"holds"`` [B, B] bool: caption j is true of image i (so it is no ITM negative of it), and
        ``"scene_objects"``."""
        if not all("scene_objects" in it for it in kept):
            return {}
        from softmask.data.shapes import caption_holds

        scene = [it["scene_objects"] for it in kept]
        holds = torch.tensor([[caption_holds(c, objs, partial=True) for c in captions] for objs in scene],
                             dtype=torch.bool)
        return {"holds": holds, "scene_objects": [list(objs) for objs in scene]}


    def tokenize(self, captions: Sequence[str]) -> dict:
        """``{"input_ids", "attention_mask"}``: LongTensor[n, max_len] of ``captions``, as a batch has them."""
        enc = self.tokenizer(list(captions), padding="max_length", truncation=True, max_length=self.max_len,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}


def _word_ids(tokenizer, word: str) -> list[int]:
    return list(tokenizer(word, add_special_tokens=False)["input_ids"])


def _positions_one(ids: list[int], tokenizer, words: Sequence[str], special: set) -> list[int]:
    tokens = tokenizer.convert_ids_to_tokens(ids)
    continuation = [isinstance(t, str) and t.startswith("##") for t in tokens]
    out: list[int] = []
    used: dict[str, int] = {}
    for word in words:
        pieces = _word_ids(tokenizer, word)
        found = -1
        if pieces:
            start_from = used.get(word, 0)
            n = len(pieces)
            for p in range(start_from, len(ids) - n + 1):
                if ids[p] in special or continuation[p]:
                    continue
                if ids[p : p + n] != pieces:
                    continue
                if p + n < len(ids) and continuation[p + n]:
                    continue  # a prefix of a longer word
                found = p
                break
        if found >= 0:
            used[word] = found + 1  # a repeated word matches its next occurrence
        out.append(found)
    return out


def word_positions(input_ids: torch.Tensor, tokenizer, words):
    """Token position of each word in tokenized captions (its first WordPiece sub-token).

    Args:
        input_ids: LongTensor[B, L] (with ``words`` a list of B lists of str), or
            LongTensor[L] (with ``words`` a list of str).
        tokenizer: the tokenizer that produced ``input_ids``.
        words: the words to find, e.g. the ``"word"`` of every object. The k-th
            occurrence of the same word in a list matches the k-th occurrence in the
            caption (objects are listed in caption order).

    Returns:
        list[list[int]] (B lists) or list[int]: the position in ``[0, L)`` of the
        word's first sub-token, or -1 where the word is absent (e.g. truncated).
    """
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids: expected a torch.Tensor, got {type(input_ids).__name__}")
    special = set(int(i) for i in tokenizer.all_special_ids)
    if input_ids.dim() == 1:
        if not all(isinstance(w, str) for w in words):
            raise TypeError("words: with 1-D input_ids expected a list of str")
        return _positions_one(input_ids.tolist(), tokenizer, words, special)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected shape [B, L] or [L], got {tuple(input_ids.shape)}")
    if len(words) != input_ids.shape[0]:
        raise ValueError(f"words: expected {input_ids.shape[0]} lists (one per row of input_ids), got {len(words)}")
    return [_positions_one(row, tokenizer, ws, special) for row, ws in zip(input_ids.tolist(), words)]


# English function words (articles, determiners, pronouns, prepositions, conjunctions, auxiliaries and a few
# adverbs): with ``words="content"`` they are never the soft-mask word. Their Grad-CAM names no region, so the
# soft mask they give dims whatever the layer happened to attend to rather than what a word names.
FUNCTION_WORDS = frozenset(
    """a an the this that these those there here it its they them their he him his she her we us our you your i me
    my what which who whom whose some any each every all both either neither no not one
    of in on at to for from with without by as into onto upon over under above below beneath behind beside besides
    between among near next around through across along against toward towards about after before during off out
    up down than like via
    and or but nor so yet if then while because although though whereas
    is are was were be been being am has have had do does did will would shall should can could may might must
    also just very too only still even""".split()
)
SOFTMASK_WORDS = ("all", "content")  # the values of ``candidate_word_mask(words=...)`` and ``softmask_words``


def candidate_word_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, tokenizer,
                        words: str = "all") -> torch.Tensor:
    """BoolTensor[B, L]: True where a token may be chosen as the soft-mask word.

    ``words="all"``: every token but [CLS], [SEP], [PAD], [MASK] and wherever ``attention_mask`` is 0.
    ``words="content"``: of those, only tokens that are not a :data:`FUNCTION_WORDS` entry (case-insensitive;
    a ``##`` word piece is judged by its text) and hold a letter or digit (no punctuation); a row without any
    such token keeps its ``"all"`` candidates. A row can be all False (an empty caption): callers must handle it.
    """
    if not isinstance(input_ids, torch.Tensor) or not isinstance(attention_mask, torch.Tensor):
        raise TypeError("input_ids, attention_mask: expected torch.Tensors")
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids, attention_mask: expected equal shapes [B, L], got {tuple(input_ids.shape)} "
            f"and {tuple(attention_mask.shape)}"
        )
    if words not in SOFTMASK_WORDS:
        raise ValueError(f"words: expected one of {SOFTMASK_WORDS}, got {words!r}")
    excluded = [tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id, tokenizer.mask_token_id]
    excluded = torch.tensor([int(i) for i in excluded if i is not None], dtype=input_ids.dtype, device=input_ids.device)
    cand = (attention_mask != 0) & ~torch.isin(input_ids, excluded)
    if words == "all":
        return cand
    uniq = torch.unique(input_ids[cand]).tolist()
    function = [i for i, t in zip(uniq, tokenizer.convert_ids_to_tokens(uniq))
                if t.removeprefix("##").lower() in FUNCTION_WORDS or not any(ch.isalnum() for ch in t)]
    content = cand & ~torch.isin(input_ids, torch.tensor(function, dtype=input_ids.dtype, device=input_ids.device))
    return torch.where(content.any(1, keepdim=True), content, cand)
