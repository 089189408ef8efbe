"""The embedded synthetic "shapes" data set: coloured shapes on a neutral background,
with captions that name colours, shapes and one spatial relation, and the box of
every named object.

Every item is a pure function of ``(seed, split, index)``: it is drawn with its own
``numpy.random.Generator`` (seeded with ``[seed, split_id, index]``), never with a
global RNG, and nothing is cached on disk. Generating 4096 images of 64x64 pixels
takes well under a second per thousand images on one CPU core.

Scene rules (what the captions can rely on):

- one to three objects; within an image every object has a distinct colour *and*
  a distinct shape, so each colour word and each shape word names exactly one
  object (this makes Grad-CAM per word and the pointing game unambiguous);
- objects never overlap (their boxes are at least ``gap`` pixels apart);
- a relation "A left of B" means A's box lies entirely left of B's box
  (likewise "right of", "above", "below"), so relations stay true under the
  mild geometric augmentations of :mod:`softmask.data.augment`;
- objects are painted with their exact RGB colour (no noise, no anti-aliasing),
  the background is a light, low-saturation grey with optional light noise that
  can never equal an object colour.
"""

from __future__ import annotations

import functools
import re
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageDraw

# Well separated, saturated RGB colours (pairwise distance > 90 in RGB space).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 70, 220),
    "yellow": (235, 215, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 10),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

#: Caption templates, by number of objects. ``{a}``, ``{b}``, ``{c}`` are noun
#: phrases ("a red circle"), ``{rel}`` is one of :data:`RELATIONS`.
TEMPLATES: dict[int, tuple[str, ...]] = {
    1: ("{a}", "a picture of {a}", "there is {a}", "an image with {a}"),
    2: ("{a} {rel} {b}", "there is {a} {rel} {b}", "{a} is {rel} {b}", "a picture of {a} {rel} {b}"),
    3: ("{a} {rel} {b} and {c}", "there is {a} {rel} {b} and {c}", "{c} and {a} {rel} {b}",
        "{a} is {rel} {b}, and {c}"),
}

_COLOR_INDEX = {c: i for i, c in enumerate(COLORS)}
_SHAPE_INDEX = {s: i for i, s in enumerate(SHAPES)}

SPLITS = {"train": 0, "test": 1}
DEFAULT_SIZES = {"train": 4096, "test": 256}

#: The variants of the shapes data, by the name ``--data`` takes (the paper's claims are tested on them: docs/method.md):
#:
#: - ``shapes``: the default; one to three objects, the caption names every one;
#: - ``shapes-partial``: two to four objects, the caption names a random subset of them (at least one, at most
#:   three), as web captions describe part of an image; a caption is true of an image when every object it names
#:   is there (and its relation holds): :func:`caption_holds` with ``partial=True``;
#: - ``shapes-longtail``: the training split draws each object's colour-shape combination with Zipf-like
#:   frequencies (:data:`LONGTAIL_EXPONENT`; the rarest tenth of the 30 combinations together under 2 % of the
#:   training objects, tested), the test split is the default's, balanced; :data:`TAIL_COMBOS` are the rarest
#:   third, whose retrieval and pointing the evaluation reports apart from the rest.
VARIANTS = {"shapes": "default", "shapes-partial": "partial", "shapes-longtail": "longtail"}
#: Zipf exponent of the long-tailed training split: the combination of frequency rank r (1..30) has weight r^-1.5,
#: renormalized over the combinations still free (an image's objects differ in colour and in shape). Counted over
#: 6,000 drawn training scenes: the rarest 3 combinations 1.0 % of the objects, the rarest 10 (the tail) 5.7 %, the
#: commonest 5 63 % (exponent 1.2: 1.9 % / 8.8 %, too near the 2 % bound; 2.0: 0.3 % / 2.8 %)
LONGTAIL_EXPONENT = 1.5


def is_shapes(data) -> bool:
    """Whether the data setting ``data`` names the embedded shapes data (the default or a variant, :data:`VARIANTS`)."""
    return isinstance(data, str) and data in VARIANTS

# Object side as a fraction of the image side: 0.22..0.44 of 64 px = 14..28 px,
# i.e. about 2..3.5 ViT patches of 8 px across.
_MIN_FRAC, _MAX_FRAC = 0.22, 0.44
_MAX_TRIES = 50


def object_set_id(objects) -> int:
    """The positive id of a shapes image for retrieval fine-tuning: a function of its object set, the set
    of ``(colour, shape)`` pairs, whatever their order, positions or sizes and whatever the caption says.

    Object ``(c, s)`` is bit ``COLOR_INDEX[c] * len(SHAPES) + SHAPE_INDEX[s]`` (30 bits for 6 colours and
    5 shapes), and the id is the sum of the objects' bits: a non-negative int below ``2**30``, the same in
    every process (no hashing), and equal for two images exactly when they show the same object set.

    Args:
        objects: the items' ``"objects"`` (dicts with ``"color"`` and ``"word"``), or ``(colour, shape)`` pairs.
    """
    bits = 0
    for o in objects:
        color, shape = (o["color"], o["word"]) if isinstance(o, dict) else o
        if color not in _COLOR_INDEX or shape not in _SHAPE_INDEX:
            raise ValueError(f"objects: expected colours in {tuple(COLORS)} and shapes in {SHAPES}, got "
                             f"{(color, shape)!r}")
        bits |= 1 << (_COLOR_INDEX[color] * len(SHAPES) + _SHAPE_INDEX[shape])
    return bits


def longtail_ranking() -> list:
    """The 30 ``(colour, shape)`` combinations from the commonest to the rarest in the long-tailed training split
    (a fixed order, the same for every seed, so that every run's tail is the same combinations)."""
    combos = [(c, sh) for c in COLORS for sh in SHAPES]
    order = np.random.default_rng(2023).permutation(len(combos))
    return [combos[int(k)] for k in order]


#: The rarest third of :func:`longtail_ranking`: the "tail" the evaluation of a long-tailed run reports apart.
TAIL_COMBOS = frozenset(longtail_ranking()[-10:])


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def phrase(color: str, shape: str) -> str:
    """The noun phrase of an object as the captions write it: ``"a red circle"``, ``"an orange square"``."""
    return f"{_article(color)} {color} {shape}"


_phrase = phrase


def xywh(box) -> list:
    """A box ``[x0, y0, x1, y1]`` as COCO's (and ALBEF's grounding's) ``[x, y, w, h]``."""
    return [box[0], box[1], box[2] - box[0], box[3] - box[1]]


def _relation(a: list[float], b: list[float]) -> list[str]:
    """Relations that hold from box ``a`` to box ``b`` (boxes fully separated on an axis)."""
    rels = []
    if a[2] <= b[0]:
        rels.append("left of")
    if a[0] >= b[2]:
        rels.append("right of")
    if a[3] <= b[1]:
        rels.append("above")
    if a[1] >= b[3]:
        rels.append("below")
    return rels


def _sample_box(rng: np.random.Generator, image_size: int) -> list[float]:
    """A square object box ``[x0, y0, x1, y1]`` of side 22-44 % of the image, inside it."""
    side = float(rng.uniform(_MIN_FRAC, _MAX_FRAC)) * image_size
    side = float(max(4, int(round(side))))
    x0 = float(rng.integers(1, max(2, image_size - int(side) - 1)))
    y0 = float(rng.integers(1, max(2, image_size - int(side) - 1)))
    return [x0, y0, x0 + side, y0 + side]


def _sample_background(rng: np.random.Generator) -> tuple[tuple[int, int, int], float]:
    """``(background RGB, noise std)``: a light, low-saturation grey, with light noise half of the time."""
    grey = float(rng.uniform(200, 245))
    tint = rng.uniform(-6, 6, size=3)  # low saturation: never close to a named colour
    background = tuple(int(np.clip(grey + t, 0, 255)) for t in tint)
    noise = float(rng.uniform(2.0, 8.0)) if rng.random() < 0.5 else 0.0
    return background, noise


def _longtail_combos(rng: np.random.Generator, n_obj: int) -> tuple:
    """``(colours, shapes)`` of ``n_obj`` objects drawn one by one with the long tail's weights, among the
    combinations whose colour and shape are not taken yet."""
    ranking = longtail_ranking()
    weights = (np.arange(len(ranking)) + 1.0) ** -LONGTAIL_EXPONENT
    colors, shapes = [], []
    for _ in range(n_obj):
        allowed = np.array([c not in colors and sh not in shapes for c, sh in ranking])
        p = weights * allowed
        c, sh = ranking[int(rng.choice(len(ranking), p=p / p.sum()))]
        colors.append(c)
        shapes.append(sh)
    return colors, shapes


def sample_scene(rng: np.random.Generator, image_size: int = 64, gap: float = 2.0, variant: str = "default") -> dict:
    """Draw a scene layout and its caption (no pixels) from ``rng``.

    Returns ``{"caption": str, "objects": [{"word", "color", "box"}...] (the named objects, in caption order),
    "background": (r, g, b), "noise": float}``; the ``partial`` variant adds ``"scene_objects"``, every object
    of the image (the named ones and the others). ``variant``: ``"default"``, ``"partial"`` or ``"longtail"``
    (the long-tailed colour-shape draw; see :data:`VARIANTS`).
    """
    if variant not in ("default", "partial", "longtail"):
        raise ValueError(f"variant: expected 'default', 'partial' or 'longtail', got {variant!r}")
    n_obj = int(rng.integers(2, 5)) if variant == "partial" else int(rng.integers(1, 4))
    if variant == "longtail":
        colors, shapes = _longtail_combos(rng, n_obj)
    else:
        colors = [list(COLORS)[k] for k in rng.permutation(len(COLORS))[:n_obj]]
        shapes = [SHAPES[k] for k in rng.permutation(len(SHAPES))[:n_obj]]
    boxes: list[list[float]] = []
    for _ in range(n_obj):
        for _try in range(_MAX_TRIES):
            box = _sample_box(rng, image_size)
            if all(
                box[0] >= o[2] + gap or o[0] >= box[2] + gap or box[1] >= o[3] + gap or o[1] >= box[3] + gap
                for o in boxes
            ):
                boxes.append(box)
                break
        else:
            break  # no room left: fewer objects
    n_obj = len(boxes)
    objs = [{"word": s, "color": c, "box": b} for s, c, b in zip(shapes[:n_obj], colors[:n_obj], boxes)]
    scene_objects = objs
    if variant == "partial":  # the caption names a random subset: at least one object, at most three
        k = int(rng.integers(1, min(n_obj, 3) + 1))
        objs = [objs[int(j)] for j in sorted(rng.permutation(n_obj)[:k])]
        n_obj = k

    if n_obj == 1:
        tmpl = TEMPLATES[1][int(rng.integers(len(TEMPLATES[1])))]
        caption = tmpl.format(a=_phrase(objs[0]["color"], objs[0]["word"]))
        ordered = objs
    else:
        order = [int(k) for k in rng.permutation(n_obj)]
        a, b = objs[order[0]], objs[order[1]]
        rels = _relation(a["box"], b["box"])
        rel = rels[int(rng.integers(len(rels)))]
        tmpls = TEMPLATES[n_obj]
        tmpl = tmpls[int(rng.integers(len(tmpls)))]
        fields = {"a": _phrase(a["color"], a["word"]), "b": _phrase(b["color"], b["word"]), "rel": rel}
        if n_obj == 3:
            c = objs[order[2]]
            fields["c"] = _phrase(c["color"], c["word"])
            ordered = [c, a, b] if tmpl.startswith("{c}") else [a, b, c]
        else:
            ordered = [a, b]
        caption = tmpl.format(**fields)

    background, noise = _sample_background(rng)
    scene = {"caption": caption, "objects": ordered, "background": background, "noise": noise}
    if variant == "partial":
        scene["scene_objects"] = scene_objects
    return scene


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: list[float], color: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    # PIL includes the last coordinate; draw in [x0, x1 - 1] so the painted
    # pixels are exactly the integer pixels inside the box.
    r, b = x1 - 1, y1 - 1
    cx, cy = (x0 + r) / 2, (y0 + b) / 2
    if shape == "circle":
        draw.ellipse([x0, y0, r, b], fill=color)
    elif shape == "square":
        draw.rectangle([x0, y0, r, b], fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (r, b), (x0, b)], fill=color)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (r, cy), (cx, b), (x0, cy)], fill=color)
    elif shape == "cross":
        w = (x1 - x0) / 3
        draw.rectangle([x0 + w, y0, r - w, b], fill=color)
        draw.rectangle([x0, y0 + w, r, b - w], fill=color)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(f"shape: expected one of {SHAPES}, got {shape!r}")


def render_scene(scene: dict, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Paint ``scene`` (from :func:`sample_scene`) as an ``image_size`` RGB PIL image."""
    bg = np.empty((image_size, image_size, 3), dtype=np.float32)
    bg[:] = scene["background"]
    if scene["noise"] > 0:
        bg += rng.normal(0.0, scene["noise"], size=bg.shape).astype(np.float32)
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for obj in scene.get("scene_objects", scene["objects"]):
        _draw_shape(draw, obj["word"], obj["box"], COLORS[obj["color"]])
    return img


class ShapesDataset(torch.utils.data.Dataset):
    """Deterministic synthetic image-caption pairs.

    Args:
        split: "train" or "test" (disjoint sample streams: the split id is part of the seed).
        size: number of items (default 4096 for train, 256 for test).
        image_size: side S of the square images in pixels (objects are 22-44% of S).
        seed: data-set seed; item ``i`` depends only on ``(seed, split, i)``.
        transform: optional callable applied to the PIL image.
        variant: ``"default"``, ``"partial"`` or ``"longtail"`` (:data:`VARIANTS`); the long tail's test split is
            the default's (balanced).

    ``ds[i]`` is a dict: ``"image"`` (``transform(PIL)`` or the PIL RGB image, S x S),
    ``"caption"`` (str), ``"objects"`` (list of ``{"word", "color", "box"}`` in caption
    order; ``box`` = ``[x0, y0, x1, y1]`` float pixel coordinates in the S x S image, the
    painted pixels are the integer pixels ``x0 <= x < x1``, ``y0 <= y < y1`` of the shape),
    ``"index"`` (i), ``"image_id"`` (i: one caption per image), ``"id"`` (the positive id for
    retrieval fine-tuning: :func:`object_set_id` of the objects, shared by every image with the same set
    of (colour, shape) pairs). The ``partial`` variant's items add ``"scene_objects"`` (every object of the
    image; ``"objects"`` are the named ones) and take their id from all of them.
    """

    def __init__(
        self,
        split: str = "train",
        size: Optional[int] = None,
        image_size: int = 64,
        seed: int = 0,
        transform=None,
        variant: str = "default",
    ):
        if variant not in ("default", "partial", "longtail"):
            raise ValueError(f"variant: expected 'default', 'partial' or 'longtail', got {variant!r}")
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {tuple(SPLITS)}, got {split!r}")
        if size is None:
            size = DEFAULT_SIZES[split]
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"size: expected a non-negative int or None, got {size!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 16:
            raise ValueError(f"image_size: expected an int >= 16, got {image_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
        self.split = split
        self.size = size
        self.image_size = image_size
        self.seed = seed
        self.transform = transform
        self.variant = variant
        # what the generator draws: the long tail is the training split's; its test split is balanced
        self._draw = "default" if variant == "longtail" and split == "test" else variant

    def __len__(self) -> int:
        return self.size

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, SPLITS[self.split], index])

    def scene(self, index: int) -> dict:
        """Layout and caption of item ``index`` without drawing it."""
        return sample_scene(self._rng(self._check_index(index)), self.image_size, variant=self._draw)

    def _check_index(self, index) -> int:
        if isinstance(index, torch.Tensor):
            index = int(index)
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise TypeError(f"index: expected an int, got {type(index).__name__}")
        index = int(index)
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"index: expected 0 <= index < {self.size}, got {index}")
        return index

    def __getitem__(self, index) -> dict:
        return self._item(self._check_index(index))

    def _item(self, index: int, occlude: Optional[int] = None, part: str = "whole") -> dict:
        rng = self._rng(index)
        scene = sample_scene(rng, self.image_size, variant=self._draw)
        drawn = scene
        if occlude is not None:  # the same scene and background noise, one named object painted over
            gone = scene["objects"][occlude]
            drawn = {**scene, "scene_objects": [o for o in scene.get("scene_objects", scene["objects"]) if o is not gone]}
        image = render_scene(drawn, self.image_size, rng)
        if occlude is not None and part == "half":  # only the object's left half painted over
            full = self._rng(index)
            whole = render_scene(sample_scene(full, self.image_size, variant=self._draw), self.image_size, full)
            x0, y0, x1, y1 = (int(v) for v in gone["box"])
            keep = whole.copy()
            keep.paste(image.crop((x0, y0, (x0 + x1) // 2, y1)), (x0, y0))
            image = keep
        if self.transform is not None:
            image = self.transform(image)
        copy = lambda objs: [{"word": o["word"], "color": o["color"], "box": list(o["box"])} for o in objs]  # noqa: E731
        objects = copy(scene["objects"])
        item = {"image": image, "caption": scene["caption"], "objects": objects, "index": index, "image_id": index,
                "id": object_set_id(objects)}
        if "scene_objects" in scene:
            item["scene_objects"] = copy(scene["scene_objects"])
            item["id"] = object_set_id(item["scene_objects"])
        if occlude is not None:
            item["occluded"] = objects[occlude]
            item["objects"] = [o for j, o in enumerate(objects) if j != occlude]
        return item

    def occlusion_choice(self, index: int) -> Optional[int]:
        """The named object that the occlusion evaluation paints over in item ``index`` (its position in the
        item's ``"objects"``), or None for an item with fewer than two named objects. A seeded rule, a function of
        ``(seed, split, index)`` alone, so every model is scored on the same occluded images."""
        index = self._check_index(index)
        n = len(self.scene(index)["objects"])
        if n < 2:
            return None
        return int(np.random.default_rng([self.seed, SPLITS[self.split], index, 7]).integers(n))

    def occluded(self, index: int, part: str = "whole") -> dict:
        """Item ``index`` with one named object (:meth:`occlusion_choice`) painted over by the background (the
        same background and noise), the caption unchanged (it still names the object): ``"objects"`` are the
        remaining named objects, ``"occluded"`` the one painted over. ``part="half"`` paints over the left half of
        the object's box only, so that the caption stays true of the image. Raises ValueError for an item with
        fewer than two named objects."""
        index = self._check_index(index)
        if part not in ("whole", "half"):
            raise ValueError(f"part: expected 'whole' or 'half', got {part!r}")
        drop = self.occlusion_choice(index)
        if drop is None:
            raise ValueError(f"index: item {index} names fewer than two objects; expected one that names two or more")
        return self._item(index, occlude=drop, part=part)

    @property
    def txt2img(self) -> list[int]:
        """Image index of every caption (identity: one caption per image)."""
        return list(range(self.size))

    @property
    def img2txt(self) -> list[list[int]]:
        """Caption indices of every image (``[[0], [1], ...]``)."""
        return [[i] for i in range(self.size)]


def vocabulary_words() -> list[str]:
    """Every word a shapes caption can contain (for building the tokenizer)."""
    words = set(COLORS) | set(SHAPES) | {"a", "an"}
    for rel in RELATIONS:
        words.update(rel.split())
    for tmpls in TEMPLATES.values():
        for t in tmpls:
            words.update(w for w in t.replace(",", " , ").split() if not w.startswith("{"))
    return sorted(words)


#: Split ids of :class:`ObjectsDataset`, disjoint from the scene splits (:data:`SPLITS`): an objects item is
#: drawn from the seed ``[seed, OBJECT_SPLITS[split], index]``, which no scene item uses.
OBJECT_SPLITS = {"train": 100, "test": 101}


def sample_object(rng: np.random.Generator, image_size: int = 64) -> dict:
    """One object alone on a background (the layout of :func:`sample_scene` for a single object, no caption):
    ``{"objects": [{"word", "color", "box"}], "background", "noise"}``, for :func:`render_scene`."""
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    color = list(COLORS)[int(rng.integers(len(COLORS)))]
    box = _sample_box(rng, image_size)
    background, noise = _sample_background(rng)
    return {"objects": [{"word": shape, "color": color, "box": box}], "background": background, "noise": noise}


class ObjectsDataset(torch.utils.data.Dataset):
    """Labelled single-object images: the shapes world's analogue of ImageNet, for pretraining the vision
    encoder before image-text pretraining (as ALBEF starts from ImageNet-trained DeiT weights).

    Each image shows one object, drawn as in :class:`ShapesDataset` (the same shapes, colours, sizes and
    backgrounds) but alone and without a caption; its labels are its shape and its colour. No image of the
    image-text data sets appears here: the items come from their own seeds (:data:`OBJECT_SPLITS`), and the
    scenes (one to three objects, relations, captions) are never seen.

    Args:
        split: "train" or "test".
        size: number of items (default: 10**9 for train, an effectively endless stream; 512 for test).
        image_size, seed, transform: as :class:`ShapesDataset`.

    ``ds[i]``: ``{"image", "shape" (index into SHAPES), "color" (index into COLORS), "box", "mask", "index"}``;
    ``mask`` is a ``uint8`` tensor ``[S, S]``, 1 on the object's painted pixels of the image before ``transform``
    (a geometric transform moves the pixels, not the mask).
    """

    def __init__(self, split: str = "train", size: Optional[int] = None, image_size: int = 64, seed: int = 0,
                 transform=None):
        if split not in OBJECT_SPLITS:
            raise ValueError(f"split: expected one of {tuple(OBJECT_SPLITS)}, got {split!r}")
        self._scenes = ShapesDataset(split="train", size=(10**9 if split == "train" else 512) if size is None else size,
                                     image_size=image_size, seed=seed, transform=transform)
        self.split = split

    def __len__(self) -> int:
        return len(self._scenes)

    def __getitem__(self, index) -> dict:
        s = self._scenes
        index = s._check_index(index)
        rng = np.random.default_rng([s.seed, OBJECT_SPLITS[self.split], index])
        scene = sample_object(rng, s.image_size)
        image = render_scene(scene, s.image_size, rng)
        if s.transform is not None:
            image = s.transform(image)
        o = scene["objects"][0]
        mask = Image.new("L", (s.image_size, s.image_size), 0)
        _draw_shape(ImageDraw.Draw(mask), o["word"], o["box"], 1)
        return {"image": image, "shape": _SHAPE_INDEX[o["word"]], "color": _COLOR_INDEX[o["color"]],
                "box": list(o["box"]), "mask": torch.from_numpy(np.array(mask, dtype=np.uint8)), "index": index}


_PHRASE = re.compile(r"\b(?:a|an) (" + "|".join(COLORS) + r") (" + "|".join(SHAPES) + r")\b")


@functools.lru_cache(maxsize=65536)
def _parse_caption(caption: str) -> tuple[tuple, Optional[tuple]]:
    """``(named objects, relation)`` of a shapes caption: the ``(colour, shape)`` phrases in order, and
    ``(subject, relation, object)`` (phrases before and after the relation words), None without a relation,
    or ``False`` for a relation with no phrase on one side."""
    named = [(m.group(1), m.group(2), m.start(), m.end()) for m in _PHRASE.finditer(caption)]
    for rel in RELATIONS:
        k = caption.find(f" {rel} ")
        if k < 0:
            continue
        before = [n for n in named if n[3] <= k]
        after = [n for n in named if n[2] > k]
        if not before or not after:
            return tuple((c, s) for c, s, _, _ in named), False
        return tuple((c, s) for c, s, _, _ in named), (before[-1][:2], rel, after[0][:2])
    return tuple((c, s) for c, s, _, _ in named), None


def caption_holds(caption: str, objects, *, partial: bool = False) -> bool:
    """Whether a shapes caption is true of an image with ``objects`` (dicts with ``"word"``, ``"color"`` and
    ``"box"``, as the items' ``"objects"``): the caption names exactly the image's objects (every shapes
    caption names all of its image's objects) and the relation it states, if any, holds between their boxes
    (:func:`_relation`, the rule the generator uses). Two different strings can both hold ("there is a red
    circle", "a picture of a red circle"); the evaluation's ITM probe counts only captions that do not hold as
    negatives. ``partial`` (the ``shapes-partial`` data, whose captions name part of the image): the caption holds
    when every object it names is among ``objects`` (every object of the image) and its relation holds."""
    named, relation = _parse_caption(caption)
    have = {(o["color"], o["word"]): o["box"] for o in objects}
    if relation is False or len(set(named)) != len(named) or not named:
        return False
    if not (set(named) <= set(have) if partial else (set(named) == set(have) and len(named) == len(have))):
        return False
    if relation is None:
        return True
    a, rel, b = relation
    return rel in _relation(have[a], have[b])
