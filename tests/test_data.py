"""Data layer: shapes determinism and geometry, tokenizer, augmentations, token masking,
caption JSON data sets with bad images, collation and word positions."""

import json
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from softmask.data import (
    COLORS,
    IMAGE_MEAN,
    RELATIONS,
    SHAPES,
    SPECIAL_TOKENS,
    CaptionJsonDataset,
    CaptionSafeRandAugment,
    Collator,
    ShapesDataset,
    build_dataset,
    build_shapes_tokenizer,
    candidate_word_mask,
    denormalize,
    get_tokenizer,
    image_transform,
    load_tokenizer,
    mask_tokens,
    word_positions,
)
from softmask.data.shapes import vocabulary_words


@pytest.fixture(scope="module")
def tok():
    return build_shapes_tokenizer()


def _pixels(item):
    return np.asarray(item["image"])


# ---------------------------------------------------------------- shapes


def test_shapes_deterministic_per_seed_split_index():
    a = ShapesDataset("train", size=64, seed=3)
    b = ShapesDataset("train", size=64, seed=3)
    for i in (0, 17, 63):
        x, y = a[i], b[i]
        assert np.array_equal(_pixels(x), _pixels(y))
        assert x["caption"] == y["caption"] and x["objects"] == y["objects"] and x["index"] == i
    # reading in another order gives the same items (no shared RNG state)
    assert np.array_equal(_pixels(a[5]), _pixels(ShapesDataset("train", size=64, seed=3)[5]))


@pytest.mark.parametrize("other", [dict(split="test", seed=3), dict(split="train", seed=4)])
def test_shapes_splits_and_seeds_differ(other):
    ref = ShapesDataset("train", size=32, seed=3)
    alt = ShapesDataset(size=32, **other)
    same_pix = sum(np.array_equal(_pixels(ref[i]), _pixels(alt[i])) for i in range(32))
    same_cap = sum(ref[i]["caption"] == alt[i]["caption"] for i in range(32))
    assert same_pix == 0
    assert same_cap < 16


def test_shapes_default_sizes_and_bad_args():
    assert len(ShapesDataset("train")) == 4096 and len(ShapesDataset("test")) == 256
    with pytest.raises(ValueError, match="split"):
        ShapesDataset("val")
    with pytest.raises(ValueError, match="size"):
        ShapesDataset("train", size=-1)
    with pytest.raises(IndexError):
        ShapesDataset("train", size=4)[4]


@pytest.mark.parametrize("image_size", [64, 96])
def test_shapes_boxes_match_painted_pixels(image_size):
    ds = ShapesDataset("test", size=48, image_size=image_size, seed=1)
    n_objects = []
    for i in range(len(ds)):
        item = ds[i]
        img = _pixels(item).astype(int)
        assert img.shape == (image_size, image_size, 3)
        objs = item["objects"]
        n_objects.append(len(objs))
        assert 1 <= len(objs) <= 3
        assert len({o["color"] for o in objs}) == len(objs) and len({o["word"] for o in objs}) == len(objs)
        for o in objs:
            x0, y0, x1, y1 = o["box"]
            assert 0 <= x0 < x1 <= image_size and 0 <= y0 < y1 <= image_size
            side = x1 - x0
            assert 0.2 * image_size <= side <= 0.45 * image_size  # several 8-px patches at 64 px
            rgb = np.array(COLORS[o["color"]])
            painted = np.all(img == rgb, axis=-1)
            ys, xs = np.nonzero(painted)
            assert len(xs) > 0, (i, o)
            # painted pixels are exactly the shape's extent
            assert abs(xs.min() - x0) <= 1 and abs(xs.max() + 1 - x1) <= 1
            assert abs(ys.min() - y0) <= 1 and abs(ys.max() + 1 - y1) <= 1
            cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
            assert painted[cy, cx], (i, o)
            words = re.findall(r"[a-z]+", item["caption"])
            assert o["word"] in words and o["color"] in words
        # objects are listed in caption order
        idx = [words.index(o["word"]) for o in objs]
        assert idx == sorted(idx)
    assert set(n_objects) == {1, 2, 3}


def test_shapes_relation_in_caption_holds():
    ds = ShapesDataset("train", size=200, seed=0)
    seen = set()
    for i in range(len(ds)):
        item = ds[i]
        cap, objs = item["caption"], item["objects"]
        rels = [r for r in RELATIONS if f" {r} " in cap]
        if len(objs) == 1:
            assert rels == []
            continue
        assert len(rels) == 1, cap
        rel = rels[0]
        seen.add(rel)
        # "... A rel B ...": A is the noun phrase right before rel, B right after
        before, after = cap.split(f" {rel} ")
        a_word = [w for w in re.findall(r"[a-z]+", before) if w in SHAPES][-1]
        b_word = [w for w in re.findall(r"[a-z]+", after) if w in SHAPES][0]
        a = next(o for o in objs if o["word"] == a_word)
        b = next(o for o in objs if o["word"] == b_word)
        (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a["box"], b["box"]
        holds = {"left of": ax1 <= bx0, "right of": ax0 >= bx1, "above": ay1 <= by0, "below": ay0 >= by1}[rel]
        assert holds, (cap, a, b)
    assert seen == set(RELATIONS)


def test_shapes_transform_and_build_dataset():
    ds = build_dataset("shapes", "test", 64, train=False, size=4)
    x = ds[0]["image"]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    raw = np.asarray(ShapesDataset("test", size=4)[0]["image"]).astype(np.float32) / 255
    assert torch.allclose(denormalize(x).permute(1, 2, 0), torch.from_numpy(raw), atol=1e-5)
    tr = build_dataset("shapes", "train", 64, train=True, size=4)
    assert tr[0]["image"].shape == (3, 64, 64)
    with pytest.raises(ValueError, match="spec"):
        build_dataset("coco", "train", 64, train=True)


# ---------------------------------------------------------------- augment


def test_randaugment_ops_never_change_colour_names():
    aug = CaptionSafeRandAugment()
    ops = set(aug._augmentation_space(31, (64, 64)))
    assert ops and ops <= {"Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
                           "Brightness", "Contrast", "Sharpness"}
    with pytest.raises(ValueError, match="ops"):
        CaptionSafeRandAugment(ops=("Solarize",))


def test_train_transform_keeps_object_colours():
    # hue of the box centre stays that of the named colour under the train pipeline
    ds = ShapesDataset("test", size=24, seed=5)
    t = image_transform(64, train=True, distort=True)
    torch.manual_seed(0)
    for i in range(len(ds)):
        item = ds[i]
        o = max(item["objects"], key=lambda o: o["box"][2] - o["box"][0])
        x = denormalize(t(item["image"]))  # (3, 64, 64)
        # the crop keeps >= 70% of the area: the object colour is still the most
        # saturated colour present, close to its named colour in chromaticity
        rgb = x.permute(1, 2, 0).reshape(-1, 3)
        sat = rgb.max(1).values - rgb.min(1).values
        ref = torch.tensor(COLORS[o["color"]], dtype=torch.float32) / 255
        close = ((rgb - rgb.mean(1, keepdim=True)) - (ref - ref.mean())).norm(dim=1) < 0.15
        assert (close & (sat > 0.3)).sum() > 20, (i, o["color"])


def test_denormalize_inverts_and_checks():
    x = torch.rand(2, 3, 8, 8)
    mean = torch.tensor(IMAGE_MEAN).view(3, 1, 1)
    from softmask.data import IMAGE_STD

    y = (x - mean) / torch.tensor(IMAGE_STD).view(3, 1, 1)
    assert torch.allclose(denormalize(y), x, atol=1e-6)
    with pytest.raises(ValueError, match="x"):
        denormalize(torch.rand(4, 8, 8))


def test_mask_tokens_statistics(tok):
    torch.manual_seed(123)
    special = torch.tensor(tok.all_special_ids)
    regular = torch.tensor([i for i in range(len(tok)) if i not in tok.all_special_ids])
    ids = regular[torch.randint(len(regular), (512, 64))]
    ids[:, 0] = tok.cls_token_id
    ids[:, 40] = tok.sep_token_id
    ids[:, 41:] = tok.pad_token_id
    ids[::7, 20] = tok.mask_token_id
    before = ids.clone()
    g = torch.Generator().manual_seed(7)
    masked, labels = mask_tokens(ids, tok, prob=0.15, generator=g)
    assert torch.equal(ids, before)  # input untouched
    chosen = labels != -100
    is_special = torch.isin(before, special)
    assert not (chosen & is_special).any()
    assert torch.equal(masked[is_special], before[is_special])
    assert torch.equal(masked[~chosen], before[~chosen])
    assert torch.equal(labels[chosen], before[chosen])
    n_cand = int((~is_special).sum())
    rate = chosen.sum().item() / n_cand
    assert abs(rate - 0.15) < 0.01, rate
    n = chosen.sum().item()
    to_mask = (masked[chosen] == tok.mask_token_id).sum().item() / n
    unchanged = (masked[chosen] == before[chosen]).sum().item() / n
    random_ = 1 - to_mask - unchanged
    assert abs(to_mask - 0.8) < 0.03 and abs(unchanged - 0.1) < 0.025 and abs(random_ - 0.1) < 0.025
    assert not torch.isin(masked[chosen & (masked != tok.mask_token_id)], special).any()
    # deterministic given the generator; another seed differs
    m2, l2 = mask_tokens(ids, tok, prob=0.15, generator=torch.Generator().manual_seed(7))
    assert torch.equal(m2, masked) and torch.equal(l2, labels)
    m3, _ = mask_tokens(ids, tok, prob=0.15, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(m3, masked)


def test_mask_tokens_bad_args(tok):
    with pytest.raises(TypeError, match="input_ids"):
        mask_tokens(torch.zeros(2, 3), tok)
    with pytest.raises(ValueError, match="input_ids"):
        mask_tokens(torch.zeros(3, dtype=torch.long), tok)
    with pytest.raises(ValueError, match="prob"):
        mask_tokens(torch.zeros(2, 3, dtype=torch.long), tok, prob=1.5)


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_special_ids_and_roundtrip(tok, tmp_path):
    assert tok.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(len(SPECIAL_TOKENS)))
    assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (0, 1, 2, 3, 4)
    caps = [ShapesDataset("train", size=50)[i]["caption"] for i in range(50)]
    enc = tok(caps, padding="max_length", truncation=True, max_length=20, return_tensors="pt")
    ids, att = enc["input_ids"], enc["attention_mask"]
    assert ids.shape == (50, 20) and att.shape == (50, 20)
    assert (ids[:, 0] == tok.cls_token_id).all()
    for row, a, cap in zip(ids, att, caps):
        n = int(a.sum())
        assert row[n - 1] == tok.sep_token_id and (row[n:] == tok.pad_token_id).all()
        assert tok.decode(row, skip_special_tokens=True) == cap
        assert tok.unk_token_id not in row.tolist()
    # save / load round trip
    build_shapes_tokenizer(save_dir=str(tmp_path / "tok"))
    tok2 = load_tokenizer(str(tmp_path / "tok"))
    assert tok2(caps)["input_ids"] == tok(caps)["input_ids"]
    assert len(tok2) == len(tok) and tok2.mask_token_id == tok.mask_token_id


def test_tokenizer_covers_every_word_as_one_token(tok):
    vocab = tok.get_vocab()
    for w in vocabulary_words():
        assert w in vocab, w
        assert tok(w, add_special_tokens=False)["input_ids"] == [vocab[w]]
    # unseen words fall back to characters, never [UNK]
    ids = tok("zebra 42 quokka", add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids


def test_tokenizer_is_deterministic(tok):
    assert build_shapes_tokenizer().get_vocab() == tok.get_vocab()
    assert get_tokenizer("shapes").get_vocab() == tok.get_vocab()


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_tokenizer(str(tmp_path / "empty"))


# ---------------------------------------------------------------- JSON data sets


def _png(path, color):
    Image.new("RGB", (20, 16), color).save(path)


@pytest.fixture
def json_set(tmp_path):
    (tmp_path / "img").mkdir()
    _png(tmp_path / "img" / "a.png", (255, 0, 0))
    _png(tmp_path / "img" / "b.png", (0, 0, 255))
    (tmp_path / "img" / "bad.png").write_bytes(b"this is not a png at all")
    # a truncated PNG: valid header, cut data
    _png(tmp_path / "img" / "full.png", (0, 255, 0))
    data = (tmp_path / "img" / "full.png").read_bytes()
    (tmp_path / "img" / "cut.png").write_bytes(data[: len(data) // 2])
    entries = [
        {"image": "a.png", "caption": ["a red thing", "red"]},
        {"image": "missing.png", "caption": "nothing"},
        {"image": "bad.png", "caption": "garbage"},
        {"image": str(tmp_path / "img" / "b.png"), "caption": "a blue thing"},
        {"image": "cut.png", "caption": "truncated"},
    ]
    p = tmp_path / "train.json"
    p.write_text(json.dumps(entries))
    return p, tmp_path / "img"


def test_json_dataset_skips_bad_images(json_set, tok):
    path, root = json_set
    ds = CaptionJsonDataset(str(path), image_root=str(root), transform=image_transform(32, train=False))
    assert len(ds) == 6
    assert ds.txt2img == [0, 0, 1, 2, 3, 4] and ds.img2txt == [[0, 1], [2], [3], [4], [5]]
    items = []
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for i in range(len(ds)):
            items.append(ds[i])
    msgs = [str(w.message) for w in rec]
    assert [it is None for it in items] == [False, False, True, True, False, True]
    assert ds.num_skipped == 3
    for name in ("missing.png", "bad.png", "cut.png"):
        assert sum(name in m for m in msgs) == 1, msgs
    assert any("not found" in m for m in msgs if "missing.png" in m)
    assert items[0]["caption"] == "a red thing" and items[1]["caption"] == "red"
    assert items[0]["objects"] == [] and items[4]["image_id"] == 3
    col = Collator(tok, 12)
    batch = col(items)
    assert batch["image"].shape == (3, 3, 32, 32)
    assert batch["captions"] == ["a red thing", "red", "a blue thing"]
    assert batch["index"].tolist() == [0, 1, 4] and batch["num_dropped"] == 3 and col.num_dropped == 3
    assert col([None, None]) is None and col.num_dropped == 5
    # red image is red after denormalizing
    assert torch.allclose(denormalize(batch["image"][0])[:, 5, 5], torch.tensor([1.0, 0.0, 0.0]), atol=1e-3)


def test_json_dataset_relative_to_json_folder(tmp_path):
    _png(tmp_path / "x.png", (1, 2, 3))
    (tmp_path / "d.json").write_text(json.dumps([{"image": "x.png", "caption": "c"}]))
    item = CaptionJsonDataset(str(tmp_path / "d.json"))[0]
    assert item["image"].size == (20, 16) and item["image"].getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize(
    "content, match",
    [
        ("[{\"image\": \"a.png\", \"caption\": ", "not valid JSON"),
        (json.dumps({"image": "a.png"}), "expected a JSON list"),
        (json.dumps([{"image": "a.png", "caption": "x"}, {"image": "b.png"}]), "entry 1"),
        (json.dumps([{"image": "", "caption": "x"}]), "entry 0.*'image'"),
        (json.dumps([{"image": "a.png", "caption": ["x", 3]}]), "entry 0.*'caption'"),
        (json.dumps(["a.png"]), "entry 0"),
    ],
)
def test_json_dataset_malformed(tmp_path, content, match):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(ValueError, match=match) as e:
        CaptionJsonDataset(str(p))
    assert "bad.json" in str(e.value)


def test_build_dataset_json(json_set):
    path, root = json_set
    ds = build_dataset(str(path), "train", 32, train=True, image_root=str(root))
    assert isinstance(ds, CaptionJsonDataset) and ds[0]["image"].shape == (3, 32, 32)


# ---------------------------------------------------------------- collate and word helpers


def test_collator_shapes_and_types(tok):
    ds = build_dataset("shapes", "train", 64, train=False, size=8)
    col = Collator(tok, 24)
    b = col([ds[i] for i in range(8)])
    assert b["image"].shape == (8, 3, 64, 64) and b["image"].dtype == torch.float32
    assert b["input_ids"].shape == (8, 24) and b["input_ids"].dtype == torch.long
    assert b["attention_mask"].dtype == torch.long and b["index"].tolist() == list(range(8))
    assert len(b["captions"]) == 8 and len(b["objects"]) == 8 and b["num_dropped"] == 0
    with pytest.raises(TypeError, match="transform"):
        col([ShapesDataset("train", size=2)[0]])
    with pytest.raises(ValueError, match="max_len"):
        Collator(tok, 1)


def test_word_positions_point_at_object_words(tok):
    ds = build_dataset("shapes", "test", 64, train=False, size=32)
    b = Collator(tok, 32)([ds[i] for i in range(32)])
    words = [[o["word"] for o in objs] for objs in b["objects"]]
    pos = word_positions(b["input_ids"], tok, words)
    for i, (ws, ps) in enumerate(zip(words, pos)):
        assert len(ps) == len(ws)
        for w, p in zip(ws, ps):
            assert p > 0 and tok.convert_ids_to_tokens(int(b["input_ids"][i, p])) == w
    colours = word_positions(b["input_ids"][0], tok, [o["color"] for o in b["objects"][0]])
    assert all(tok.convert_ids_to_tokens(int(b["input_ids"][0, p])) == o["color"]
               for p, o in zip(colours, b["objects"][0]))


def test_word_positions_subtokens_repeats_and_truncation(tok):
    enc = tok(["a zebra near a zebra and a red circle"], padding="max_length", max_length=24,
              truncation=True, return_tensors="pt")
    ids = enc["input_ids"]
    toks = tok.convert_ids_to_tokens(ids[0].tolist())
    pos = word_positions(ids, tok, [["zebra", "zebra", "circle", "ze", "square"]])[0]
    first, second = [k for k, t in enumerate(toks) if t == "z"]
    assert pos[:3] == [first, second, toks.index("circle")]
    assert pos[3] == -1  # a prefix of a longer word is not the word
    assert pos[4] == -1  # absent
    short = tok(["a red circle left of a blue square"], max_length=5, truncation=True, return_tensors="pt")
    assert word_positions(short["input_ids"], tok, [["circle", "square"]]) == [[3, -1]]


def test_candidate_word_mask(tok):
    enc = tok(["a red circle", "a [MASK] square left of a circle"], padding="max_length", max_length=12,
              return_tensors="pt")
    ids, att = enc["input_ids"], enc["attention_mask"]
    m = candidate_word_mask(ids, att, tok)
    expect = (att == 1) & ~torch.isin(ids, torch.tensor([tok.cls_token_id, tok.sep_token_id,
                                                           tok.pad_token_id, tok.mask_token_id]))
    assert torch.equal(m, expect)
    assert m.sum(1).tolist() == [3, 6]
    toks = tok.convert_ids_to_tokens(ids[1].tolist())
    assert not m[1, toks.index("[MASK]")] and m[1, toks.index("square")]


def test_candidate_word_mask_content_words(tok):
    """``words="content"`` drops function words and punctuation (and, as always, special tokens); a row with
    no content word keeps its "all" candidates; an unknown policy is refused by name."""
    enc = tok(["there is a red circle, left of a blue square", "a picture of an orange [MASK]", "a [MASK] of a"],
              padding="max_length", max_length=14, return_tensors="pt")
    ids, att = enc["input_ids"], enc["attention_mask"]
    every = candidate_word_mask(ids, att, tok)
    content = candidate_word_mask(ids, att, tok, words="content")
    picked = [[t for t, k in zip(tok.convert_ids_to_tokens(ids[r].tolist()), content[r]) if k] for r in range(3)]
    assert picked[0] == ["red", "circle", "left", "blue", "square"]
    assert picked[1] == ["picture", "orange"]
    assert torch.equal(content[2], every[2]) and content[2].sum() == 3  # no content word: "a", "of", "a"
    assert not (content & ~every).any()
    with pytest.raises(ValueError, match="words: expected one of .*got 'nouns'"):
        candidate_word_mask(ids, att, tok, words="nouns")


def test_dataloader_with_workers(json_set, tok):
    path, root = json_set
    ds = build_dataset(str(path), "test", 32, train=False, image_root=str(root))
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, collate_fn=Collator(tok, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(loader)
    # items 2, 3 and 5 are unreadable: batch 1 keeps items 0, 1; batch 2 keeps item 4
    assert [b["index"].tolist() for b in batches] == [[0, 1], [4]]
    assert sum(b["num_dropped"] for b in batches) == 3
    shapes = build_dataset("shapes", "train", 64, train=True, size=10)
    loader = torch.utils.data.DataLoader(shapes, batch_size=4, num_workers=2, collate_fn=Collator(tok, 16))
    assert [b["image"].shape[0] for b in loader] == [4, 4, 2]


def test_local_bert_tokenizer_directory(tmp_path):
    from transformers import BertTokenizerFast

    vocab = SPECIAL_TOKENS + ["a", "red", "circle", "hex", "##agon", "left", "of"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    try:  # transformers 5 takes the vocabulary itself, 4.x a vocab.txt path
        bert = BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)})
    except TypeError:
        bert = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    if len(bert) != len(vocab):
        bert = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    bert.save_pretrained(str(tmp_path / "bert"))
    tok = get_tokenizer(str(tmp_path / "bert"))
    enc = tok(["a red hexagon left of a circle"], padding="max_length", max_length=12, return_tensors="pt")
    ids = enc["input_ids"]
    assert ids[0, 0] == tok.cls_token_id
    assert tok.convert_ids_to_tokens(ids[0, 3:5].tolist()) == ["hex", "##agon"]
    # a word split into sub-tokens points at its first sub-token; "hex" alone is not a word here
    assert word_positions(ids, tok, [["hexagon", "circle", "hex"]]) == [[3, 8, -1]]
    m = candidate_word_mask(ids, enc["attention_mask"], tok)
    assert m[0].tolist() == [False] + [True] * 8 + [False] * 3


@pytest.mark.parametrize("cursor", [0, 4])
def test_batch_stream_is_the_same_with_workers(tok, cursor):
    """The training stream's batches do not depend on the number of worker processes (every item is drawn with
    its own seed), across an epoch boundary and from a cursor mid-epoch (resume), in the epochs' order."""
    from softmask.train.data import EpochBatches, batch_stream

    ds = build_dataset("shapes", "train", 32, train=True, size=18)  # 6 batches of 3 per epoch
    take = 9

    def stream(workers):
        gen = batch_stream(ds, Collator(tok, 16), batch_size=3, seed=5, cursor=cursor, num_workers=workers)
        got = [next(gen) for _ in range(take)]
        gen.close()  # the loader and its workers go with the generator
        return got

    ref = stream(0)
    assert [c for c, _ in ref] == list(range(cursor, cursor + take))
    order = [key[0] for e in range(3) for b in EpochBatches(18, 3, seed=5, epoch=e) for key in b]
    assert torch.cat([b["index"] for _, b in ref]).tolist() == order[3 * cursor: 3 * (cursor + take)]
    for workers in (1, 2):
        for (c0, b0), (c1, b1) in zip(ref, stream(workers)):
            assert c0 == c1 and torch.equal(b0["image"], b1["image"]) and torch.equal(b0["input_ids"], b1["input_ids"])


def test_auto_num_workers():
    from softmask.train.loop import auto_num_workers

    assert [auto_num_workers("cuda", c) for c in (1, 2, 3, 8, 64)] == [0, 1, 2, 4, 4]
    assert [auto_num_workers("cpu", c) for c in (1, 2, 64)] == [0, 0, 0]  # the training threads use every core
    assert 0 <= auto_num_workers("cuda") <= 4 and auto_num_workers() == 0
