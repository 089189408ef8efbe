"""The shapes variants that test the paper's claims (partial captions, a long tail), the occluded images, and the
evaluations on them: ALBEF-protocol grounding, the occlusion evaluation, the head / tail split, ``softmask-ground``."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from softmask.data import Collator, build_dataset, get_tokenizer
from softmask.data.shapes import (TAIL_COMBOS, VARIANTS, ShapesDataset, caption_holds, longtail_ranking, phrase,
                                  sample_scene)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- the data


def test_partial_captions_name_a_subset():
    ds = ShapesDataset("train", size=300, variant="partial")
    n_scene, n_named = collections.Counter(), collections.Counter()
    for i in range(300):
        it = ds[i]
        every = {(o["color"], o["word"]) for o in it["scene_objects"]}
        named = {(o["color"], o["word"]) for o in it["objects"]}
        assert named <= every and 1 <= len(named) <= 3
        assert caption_holds(it["caption"], it["scene_objects"], partial=True), it
        # a caption naming part of the image is not an exact description of it
        assert caption_holds(it["caption"], it["scene_objects"]) == (named == every)
        n_scene[len(every)] += 1
        n_named[len(named)] += 1
    assert set(n_scene) <= {2, 3, 4} and n_scene[2] and n_scene[3] and n_scene[4], n_scene
    assert n_named[1] and n_named[2] and n_named[3], n_named
    # a pure function of (seed, split, index)
    again = ShapesDataset("train", size=300, variant="partial")
    assert again[17]["caption"] == ds[17]["caption"]
    assert np.array_equal(np.asarray(again[17]["image"]), np.asarray(ds[17]["image"]))


def test_caption_holds_partial_needs_every_named_object_and_the_relation():
    objs = [{"word": "circle", "color": "red", "box": [0, 0, 10, 10]},
            {"word": "square", "color": "blue", "box": [20, 0, 30, 10]},
            {"word": "cross", "color": "green", "box": [0, 30, 10, 40]}]
    assert caption_holds("a red circle", objs, partial=True)
    assert caption_holds("a red circle left of a blue square", objs, partial=True)
    assert not caption_holds("a red circle right of a blue square", objs, partial=True)
    assert not caption_holds("a red circle and a yellow diamond", objs, partial=True)
    assert not caption_holds("a red circle", objs)  # exact: every object must be named


def test_partial_batches_carry_which_captions_hold():
    tok = get_tokenizer(None)
    ds = build_dataset("shapes-partial", "train", 64, train=False, size=40)
    batch = Collator(tok, 24)([ds[i] for i in range(40)])
    holds = batch["holds"]
    assert holds.shape == (40, 40) and holds.dtype == torch.bool and holds.diagonal().all()
    want = torch.tensor([[caption_holds(c, objs, partial=True) for c in batch["captions"]]
                         for objs in batch["scene_objects"]])
    assert torch.equal(holds, want)
    assert holds.sum() > 40  # some captions of other images hold too (else the test would not test anything)
    assert "holds" not in Collator(tok, 24)([build_dataset("shapes", "train", 64, train=False, size=4)[i]
                                              for i in range(4)])


def test_long_tail_frequencies_and_balanced_test_split():
    ds = ShapesDataset("train", size=3000, variant="longtail")
    counts = collections.Counter((o["color"], o["word"]) for i in range(3000) for o in ds.scene(i)["objects"])
    total = sum(counts.values())
    ranking = longtail_ranking()
    assert len(ranking) == 30 and len(set(ranking)) == 30 and TAIL_COMBOS == frozenset(ranking[-10:])
    assert sum(counts[c] for c in ranking[-3:]) / total < 0.02  # the rarest tenth under 2 %
    assert sum(counts[c] for c in ranking[:5]) / total > 0.4  # and a head that dominates
    test, default = ShapesDataset("test", size=50, variant="longtail"), ShapesDataset("test", size=50)
    assert all(test.scene(i) == default.scene(i) for i in range(50))  # the test split is the default's, balanced


def test_default_data_is_unchanged_by_the_variants():
    rng = np.random.default_rng([0, 0, 5])
    assert sample_scene(rng, 64) == ShapesDataset("train", size=10).scene(5)
    assert set(VARIANTS) == {"shapes", "shapes-partial", "shapes-longtail"}


@pytest.mark.parametrize("variant", ["default", "partial"])
def test_occluded_image_paints_one_named_object_over(variant):
    ds = ShapesDataset("test", size=60, variant=variant)
    done = 0
    for i in range(60):
        drop = ds.occlusion_choice(i)
        if drop is None:
            assert len(ds[i]["objects"]) < 2
            with pytest.raises(ValueError, match="fewer than two objects"):
                ds.occluded(i)
            continue
        clean, occ = ds[i], ds.occluded(i)
        assert occ["caption"] == clean["caption"] and occ["occluded"] == clean["objects"][drop]
        assert occ["objects"] == [o for j, o in enumerate(clean["objects"]) if j != drop]
        a, b = np.asarray(clean["image"]).astype(int), np.asarray(occ["image"]).astype(int)
        x0, y0, x1, y1 = (int(v) for v in occ["occluded"]["box"])
        outside = np.ones(a.shape[:2], dtype=bool)
        outside[y0:y1, x0:x1] = False
        assert (a[outside] == b[outside]).all()  # the same background, noise and other objects
        assert (a[~outside] != b[~outside]).any()  # the object is gone
        assert ds.occlusion_choice(i) == drop  # the seeded rule
        half = np.asarray(ds.occluded(i, "half")["image"]).astype(int)
        xm = (x0 + x1) // 2
        left = np.zeros(a.shape[:2], dtype=bool)
        left[y0:y1, x0:xm] = True
        assert (half[left] == b[left]).all() and (half[~left] == a[~left]).all()  # only the left half is gone
        done += 1
    assert done >= 10


def test_export_writes_the_variant_and_the_grounding_file(tmp_path):
    from softmask.data.export import export_shapes

    paths = export_shapes(str(tmp_path), size=3, test_size=4, data="shapes-partial")
    train = json.load(open(paths["train"]))
    assert all({"scene_objects", "objects"} <= set(e) for e in train)
    refs = json.load(open(paths["grounding"]))
    test = json.load(open(paths["test"]))
    assert len(refs) == sum(len(e["objects"]) for e in test)
    e, r = test[0], refs[0]
    o = e["objects"][0]
    assert r["text"] == phrase(o["color"], o["word"]) and r["image"] == e["image"]
    assert r["bbox"] == [o["box"][0], o["box"][1], o["box"][2] - o["box"][0], o["box"][3] - o["box"][1]]
    assert len(r["dets"]) == len(e["scene_objects"])


# ----------------------------------------------------------------------------- ITM never takes a true caption as negative


def test_hard_negatives_skip_captions_that_hold():
    from softmask.model import SoftMaskALBEF, model_preset

    torch.manual_seed(0)
    model = SoftMaskALBEF(model_preset("tiny", vocab_size=64, vision_depth=1, queue_size=8))
    B, E = 6, model.cfg.embed_dim
    f = torch.nn.functional.normalize(torch.randn(B, E), dim=-1)
    holds = torch.eye(B, dtype=torch.bool)
    holds[0, 1] = holds[2, 3] = holds[4, 5] = True  # caption 1 true of image 0, ...
    ids = torch.arange(B)[:, None].expand(B, 5)
    for _ in range(200):
        nt, ni = model.hard_negatives(f, f, f, f, ids, holds=holds)
        assert not holds[torch.arange(B), nt].any()  # image i's negative caption
        assert not holds.t()[torch.arange(B), ni].any()  # caption i's negative image
    seen = set()
    for _ in range(200):
        nt, _ = model.hard_negatives(f, f, f, f, ids)
        seen.add((0, int(nt[0])))
    assert (0, 1) in seen  # without holds the pair is drawn: the test can fail


# ----------------------------------------------------------------------------- grounding as ALBEF scores it


def test_iou_and_box_scores_follow_albef():
    from softmask.eval.grounding import box_scores, iou_xywh, pick_box

    assert iou_xywh([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou_xywh([0, 0, 10, 10], [20, 20, 5, 5]) == 0.0
    assert iou_xywh([0, 0, 10, 10], [5, 0, 10, 10]) == pytest.approx(50 / 150)  # ALBEF's x .. x + w - 1 spans
    heat = torch.zeros(8, 8)
    heat[0, 0] = 1.0
    s = box_scores(heat, [[0, 0, 16, 16], [0, 0, 64, 64], [32, 32, 16, 16]], 64, 64)
    m = torch.nn.functional.interpolate(heat[None, None].double(), size=(64, 64), mode="bicubic")[0, 0]
    assert s[0] == pytest.approx(float(m[:16, :16].sum()) / 16) and s[1] == pytest.approx(float(m.sum()) / 64)
    assert pick_box(heat, [[32, 32, 16, 16], [0, 0, 16, 16]], 64, 64) == 1


def test_expression_heat_is_the_token_mean_of_albefs_map():
    """Against the materialized map: A * relu(dA) averaged over heads and the expression's tokens."""
    from softmask.eval.grounding import expression_heat
    from softmask.model import SoftMaskALBEF, model_preset

    torch.manual_seed(1)
    tok = get_tokenizer(None)
    model = SoftMaskALBEF(model_preset("tiny", vocab_size=len(tok), vision_depth=1, queue_size=8)).eval()
    enc = Collator(tok, 12).tokenize(["a red circle", "a blue square left of a green cross"])
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        embeds, _ = model.encode_image(img)
    heat = expression_heat(model, embeds, enc["input_ids"], enc["attention_mask"], layer=0)
    ids, mask = enc["input_ids"][:, :int(enc["attention_mask"].sum(1).max())], \
        enc["attention_mask"][:, :int(enc["attention_mask"].sum(1).max())]
    with torch.no_grad():
        te, _ = model.encode_text(ids, mask)
    _, _, q, k, v, gc = model.word_gradcam_inputs(te, mask, embeds, layer=0)
    A = torch.softmax(q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)  # (B, H, T, N)
    dA = gc.double() @ v.double().transpose(-1, -2)
    cam = (A * dA.clamp(min=0)).mean(1)  # (B, T, N)
    want = (cam * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    g = model.cfg.grid
    assert torch.allclose(heat.double(), want[:, 1:].reshape(2, g, g), rtol=1e-4, atol=1e-9)


# ----------------------------------------------------------------------------- a trained run's evaluation


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two-step runs on each variant, evaluated on 24 held-out pairs."""
    from softmask.train.loop import TrainConfig, train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    try:
        for data in ("shapes-partial", "shapes-longtail"):
            d = str(tmp_path_factory.mktemp(data))
            out[data] = (d, train(TrainConfig(data=data, steps=2, out=d, batch_size=6, train_size=24, queue_size=16,
                                              progress=False, test_size=24, pointing_every=0, num_workers=0)))
    finally:
        torch.set_num_threads(threads)
    return out


def test_runs_report_grounding_and_occlusion(runs):
    for data, (d, summary) in runs.items():
        ev = json.load(open(os.path.join(d, "eval.json")))
        assert 0 <= ev["grounding_acc"] <= 100 and ev["grounding_n"] > 0 and ev["grounding_layer"] == 0
        for occ in (ev["occlusion"], ev["occlusion_half"]):
            assert occ["n"] > 0 and occ["pointing_n"] > 0
            for name in ("clean", "occluded"):
                assert 0 <= occ[f"itm_{name}"] <= 1 and occ[f"tr_rank_{name}"] >= 1
                assert 0 <= occ[f"tr_r1_{name}"] <= occ[f"tr_r5_{name}"] <= 100
        assert ev["occlusion"]["itm_clean"] == ev["occlusion_half"]["itm_clean"]
    lt = json.load(open(os.path.join(runs["shapes-longtail"][0], "eval.json")))["long_tail"]
    assert lt["images_head"] + lt["images_tail"] == 24 and lt["objects_head"] > 0 and lt["objects_tail"] > 0
    assert "long_tail" not in json.load(open(os.path.join(runs["shapes-partial"][0], "eval.json")))


def test_grounding_chance_and_occlusion_against_itself(runs, monkeypatch):
    """The chance of a random candidate is the mean of 1 / candidates (no two shapes boxes overlap); occluding
    nothing gives the clean numbers exactly."""
    from softmask.eval.evaluate import encode_set, load_model
    from softmask.eval.grounding import shapes_grounding
    from softmask.eval.occlusion import occlusion_eval

    d = runs["shapes-partial"][0]
    model, tok, _, _ = load_model(d)
    model.eval()
    ds = build_dataset("shapes-partial", "test", 64, train=False, size=24)
    enc = encode_set(model, tok, ds)
    g = shapes_grounding(model, tok, enc, ds)
    per = [1 / len(ds.scene(i)["scene_objects"]) for i in range(24) for _ in ds.scene(i)["objects"]]
    assert g["grounding_n"] == len(per) and g["grounding_chance"] == pytest.approx(100 * sum(per) / len(per))
    monkeypatch.setattr(ds, "occluded", lambda i, part: {**ds[i], "objects": ds[i]["objects"][1:]})
    res = occlusion_eval(model, tok, enc, ds)
    for occ in (res["occlusion"], res["occlusion_half"]):
        for key in ("itm", "tr_rank", "tr_r1", "pointing", "pointing_color"):
            assert occ[f"{key}_clean"] == pytest.approx(occ[f"{key}_occluded"], rel=1e-5), key


def test_partial_evaluation_counts_every_true_caption(runs):
    """On shapes-partial a caption is true of every image that shows the objects it names: the ITM probe's truth
    uses every object of the image, and R@1 "true" counts any true caption (never fewer hits than R@1)."""
    from softmask.data.shapes import caption_holds
    from softmask.eval.evaluate import _caption_truth, encode_set, load_model

    d = runs["shapes-partial"][0]
    model, tok, _, _ = load_model(d)
    ds = build_dataset("shapes-partial", "test", 64, train=False, size=24)
    enc = encode_set(model.eval(), tok, ds)
    truth = _caption_truth(enc)
    want = torch.tensor([[caption_holds(ds[i]["caption"], ds[j]["scene_objects"], partial=True) for i in range(24)]
                         for j in range(24)])
    assert torch.equal(truth, want) and truth.diagonal().all() and truth.sum() > 24
    ev = json.load(open(os.path.join(d, "eval.json")))
    assert ev["tr_r1_true"] >= ev["tr_r1"] - 1e-9 and ev["ir_r1_true"] >= ev["ir_r1"] - 1e-9


def test_partial_training_passes_holds_to_the_model(tmp_path, monkeypatch):
    from softmask.model import SoftMaskALBEF
    from softmask.train.loop import TrainConfig, train

    seen = []
    real = SoftMaskALBEF.hard_negatives

    def spy(self, *a, holds=None, **kw):
        seen.append(holds)
        return real(self, *a, holds=holds, **kw)

    monkeypatch.setattr(SoftMaskALBEF, "hard_negatives", spy)
    train(TrainConfig(data="shapes-partial", steps=1, out=str(tmp_path), batch_size=6, train_size=12, queue_size=16,
                      progress=False, run_eval=False, num_workers=0, threads=1))
    assert len(seen) == 1 and seen[0] is not None and seen[0].shape == (6, 6) and seen[0].diagonal().all()


# ----------------------------------------------------------------------------- softmask-ground


def test_softmask_ground_scores_and_names_bad_entries(runs, tmp_path):
    from softmask.data.export import export_shapes

    paths = export_shapes(str(tmp_path / "data"), size=2, test_size=6)
    refs = json.load(open(paths["grounding"]))
    run = runs["shapes-partial"][0]
    cmd = [sys.executable, "-m", "softmask.eval.ground", "--checkpoint", run, "--image-root", str(tmp_path / "data")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    good = subprocess.run(cmd + ["--data", paths["grounding"], "--out", str(tmp_path / "g.json")], capture_output=True,
                          text=True, env=env, timeout=300)
    assert good.returncode == 0, good.stderr
    res = json.load(open(tmp_path / "g.json"))
    assert res["scored"] == len(refs) and res["left_out"] == 0 and 0 <= res["grounding_acc"] <= 100
    bad = [dict(r) for r in refs]
    bad[0]["image"] = "images/test/none.jpg"
    bad[1]["bbox"] = [60, 60, 10, 10]
    bad[2]["dets"] = []
    bad[3]["text"] = "a red circle " * 20
    bad[4]["split"] = "testA"
    json.dump(bad, open(tmp_path / "bad.json", "w"))
    r = subprocess.run(cmd + ["--data", str(tmp_path / "bad.json"), "--out", str(tmp_path / "b.json")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if "left out" in line]
    assert lines[0].startswith("softmask-ground: entry 0 (ref_id 0): image: no such file")
    assert "entry 1 (ref_id 1): bbox: [60, 60, 10, 10] is not inside the 64x64 image" in lines[1]
    assert "entry 2 (ref_id 2): dets: expected a non-empty list" in lines[2]
    assert "entry 3 (ref_id 3): text:" in lines[3] and "longer than the run's text length (24)" in lines[3]
    assert "4 of" in lines[4] and "entries left out" in lines[4]
    res = json.load(open(tmp_path / "b.json"))
    assert res["left_out"] == 4 and res["scored"] == len(refs) - 4 and set(res["per_split"]) == {"all", "testA"}
    missing = subprocess.run(cmd + ["--data", str(tmp_path / "nothing.json")], capture_output=True, text=True,
                             env=env, timeout=300)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "no such file" in missing.stderr
