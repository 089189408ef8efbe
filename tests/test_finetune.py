"""Retrieval fine-tuning (issue 12): positive ids in the data (shapes object sets, caption-JSON ``image_id``),
``softmask-finetune`` from a pretraining run and from a file in ALBEF's layout, evaluation as ALBEF's
``itm_eval`` with several captions per image, bad inputs, and ``--resume``."""

import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from softmask.data import CaptionJsonDataset, Collator, ShapesDataset, get_tokenizer, object_set_id
from softmask.data.json_dataset import CaptionJsonError
from softmask.eval import evaluate as ev
from softmask.model import SoftMaskALBEF, model_preset
from softmask.train.__main__ import config_from_argv
from softmask.runs.checkpoint import latest_checkpoint
from softmask.train.finetune import main as finetune
from softmask.train.loop import LOSS_TERMS, TrainConfig, train
from tests.helpers import one_thread  # noqa: F401 (fixture)

pytestmark = [pytest.mark.filterwarnings("ignore:skipping image:RuntimeWarning"),
              pytest.mark.usefixtures("one_thread")]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--batch-size", "4", "--train-size", "16", "--no-progress", "--threads", "1", "--log-every", "1"]


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer(None)


def _one_line_error(capsys, rc):
    out = capsys.readouterr()
    err = out.err.strip()
    assert rc == 2, (rc, out.err)
    assert "Traceback" not in out.err and len(err.splitlines()) == 1, out.err
    return err


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _weights(run):
    return load_file(os.path.join(latest_checkpoint(run), "model.safetensors"))


@pytest.fixture(scope="module")
def pre(tmp_path_factory):
    """A 3-step pretraining run (the checkpoint fine-tuning starts from)."""
    out = str(tmp_path_factory.mktemp("pre") / "run")
    train(TrainConfig(steps=3, out=out, batch_size=4, train_size=16, queue_size=16, log_every=1, save_every=3,
                      progress=False, run_eval=False, warmup_steps=1, pointing_every=0))
    return out


# --------------------------------------------------------------------------- ids in the data


def test_shapes_ids_are_the_object_set(tok):
    ds = ShapesDataset("train", size=300, seed=0)
    scenes = [ds.scene(i)["objects"] for i in range(len(ds))]
    sets = [frozenset((o["color"], o["word"]) for o in objs) for objs in scenes]
    ids = [object_set_id(objs) for objs in scenes]
    # same object set <=> same id, whatever the order, positions and caption
    by_set = {}
    for s, i in zip(sets, ids):
        by_set.setdefault(s, set()).add(i)
    assert all(len(v) == 1 for v in by_set.values())
    assert len(set(ids)) == len(by_set)
    shared = [s for s in by_set if sum(x == s for x in sets) > 1]
    assert shared, "expected a repeated object set among 300 items"
    a, b = [k for k, s in enumerate(sets) if s == shared[0]][:2]
    assert ds[a]["id"] == ds[b]["id"] == ids[a]
    assert object_set_id([("red", "circle"), ("blue", "square")]) == object_set_id([("blue", "square"),
                                                                                     ("red", "circle")])
    assert object_set_id([("red", "circle")]) != object_set_id([("red", "square")])
    assert object_set_id([("red", "circle"), ("blue", "square")]) != object_set_id([("red", "square"),
                                                                                     ("blue", "circle")])
    with pytest.raises(ValueError, match="colours"):
        object_set_id([("pink", "circle")])
    # the collated batch carries them as int64
    from softmask.data import image_transform

    ds_t = ShapesDataset("train", size=300, seed=0, transform=image_transform(64, False))
    batch = Collator(tok, 24)([ds_t[a], ds_t[b], ds_t[0]])
    assert batch["ids"].dtype == torch.int64 and batch["ids"].tolist() == [ids[a], ids[b], ids[0]]
    # a fixed function of the colour and shape indices (no hash(): the same in every process): bit c * 5 + s
    assert object_set_id([("red", "circle")]) == 1
    assert object_set_id([("orange", "cross")]) == 1 << 29
    assert object_set_id([("green", "square"), ("blue", "triangle")]) == (1 << 6) | (1 << 12)


def _png(path, rgb):
    Image.fromarray(np.full((64, 64, 3), rgb, dtype=np.uint8)).save(path)


def test_json_image_ids_are_mapped_as_albef_does(tmp_path, tok):
    for name, rgb in (("a.png", (200, 0, 0)), ("b.png", (0, 200, 0)), ("c.png", (0, 0, 200)), ("d.png", (9, 9, 9))):
        _png(tmp_path / name, rgb)
    entries = [
        {"image": "a.png", "caption": "one", "image_id": "coco_1"},
        {"image": "b.png", "caption": "two", "image_id": 7},
        {"image": "a.png", "caption": "three", "image_id": "coco_1"},
        {"image": "c.png", "caption": "four", "image_id": "7"},  # the string "7" is not the number 7
        {"image": "c.png", "caption": ["five", "six"]},  # no image_id: the image path's id
        {"image": "d.png", "caption": "seven", "image_id": 7},  # another file with image_id 7: the same id
        {"image": "d.png", "caption": "eight", "image_id": None},
    ]
    (tmp_path / "train.json").write_text(json.dumps(entries))
    ds = CaptionJsonDataset(str(tmp_path / "train.json"))
    assert ds.captions == ["one", "two", "three", "four", "five", "six", "seven", "eight"]
    assert ds.ids == [0, 1, 0, 2, 3, 3, 1, 4]  # first appearance order, as ALBEF's re_train_dataset
    assert ds.txt2img == [0, 1, 0, 2, 2, 2, 3, 3]
    assert [ds[i]["id"] for i in range(len(ds))] == ds.ids
    # subsets keep the ids (a held-out split does not renumber them)
    sub = ds.subset([3, 2])
    assert sub.captions == ["seven", "eight", "four", "five", "six"] and sub.ids == [1, 4, 2, 3, 3]
    from softmask.data import image_transform

    ds.transform = image_transform(64, False)
    batch = Collator(tok, 12)([ds[i] for i in (0, 2, 1, 6)])
    assert batch["ids"].tolist() == [0, 0, 1, 1]
    assert batch["image_id"].tolist() == [0, 0, 1, 3]
    (tmp_path / "bad.json").write_text(json.dumps([{"image": "a.png", "caption": "x", "image_id": [1]}]))
    with pytest.raises(CaptionJsonError, match="entry 0: 'image_id' must be a JSON scalar"):
        CaptionJsonDataset(str(tmp_path / "bad.json"))


# --------------------------------------------------------------------------- evaluation with several captions per image


@pytest.fixture(scope="module")
def retrieval_json(tmp_path_factory):
    """ALBEF's retrieval test format: three images with two captions each (one image unreadable)."""
    d = tmp_path_factory.mktemp("albef_test")
    for name, rgb in (("x.png", (200, 0, 0)), ("y.png", (0, 200, 0)), ("z.png", (0, 0, 200))):
        _png(d / name, rgb)
    (d / "broken.png").write_bytes(b"this is not an image")
    entries = [{"image": "x.png", "caption": ["a red circle", "a red square"]},
               {"image": "broken.png", "caption": ["a green cross", "a green circle"]},
               {"image": "y.png", "caption": ["a blue circle", "a blue cross"]},
               {"image": "z.png", "caption": ["a red circle", "a purple diamond"]}]
    (d / "test.json").write_text(json.dumps(entries))
    return d


def test_evaluation_counts_any_caption_of_the_image(retrieval_json, tok, monkeypatch):
    """Hand-made scores with a known answer: text retrieval counts an image when any of its captions is
    ranked first (ALBEF's itm_eval), image retrieval a caption when its own image is."""
    ds = CaptionJsonDataset(str(retrieval_json / "test.json"))
    from softmask.data import image_transform

    ds.transform = image_transform(64, False)
    torch.manual_seed(0)
    model = SoftMaskALBEF(model_preset("tiny", vocab_size=len(tok), vision_depth=1, queue_size=8))
    enc = ev.encode_set(model, tok, ds)
    # the unreadable image is left out with both its captions: 3 images, 6 texts
    assert enc.img2txt == [[0, 1], [2, 3], [4, 5]] and enc.txt2img == [0, 0, 1, 1, 2, 2]
    assert enc.captions == ["a red circle", "a red square", "a blue circle", "a blue cross", "a red circle",
                            "a purple diamond"]
    assert enc.img_embeds.shape[0] == 3 and enc.txt_feats.shape[0] == 6
    # text 0 and text 4 are the same string: each counts for both images that have it
    assert enc.text_hits() == [[0, 1, 4], [2, 3], [0, 4, 5]]

    # i2t: image 0 ranks its second caption first and its first one last but one (a hit); image 1 ranks image
    # 2's "purple diamond" first and its own "blue cross" second (a miss at 1, a hit at 5); image 2 ranks image
    # 0's "a red square" first and its own "purple diamond" second.
    i2t = torch.tensor([[0.1, 0.9, 0.2, 0.3, 0.0, 0.4],
                        [0.1, 0.2, 0.3, 0.8, 0.0, 0.9],
                        [0.2, 0.9, 0.1, 0.3, 0.4, 0.5]])
    # t2i [text, image]: texts 0, 2, 5 rank their own image first; text 1 ranks image 2 first and its own
    # second; text 3 ranks its own last; text 4 ranks image 0 first (its twin's image, a miss)
    t2i = torch.tensor([[0.9, 0.1, 0.2], [0.5, 0.1, 0.9], [0.1, 0.9, 0.2], [0.9, 0.1, 0.5], [0.9, 0.1, 0.5],
                        [0.1, 0.2, 0.9]])
    sims = i2t - 1.0  # ITC alone: the same ranking of images to texts

    def fake_scores(model, img_embeds, img_feats, txt_ids, txt_masks, txt_feats, *, k=16, batch_size=128,
                    device="cpu"):
        assert img_feats.shape[0] == 3 and txt_feats.shape[0] == 6
        return sims, i2t, t2i

    monkeypatch.setattr(ev, "retrieval_scores", fake_scores)
    res = ev.evaluate(model, tok, ds, k=2, probe=False, pointing=False)
    assert res["num_images"] == 3 and res["num_texts"] == 6
    assert res["tr_r1"] == pytest.approx(100 / 3)  # image 0, through its second caption
    assert res["tr_r5"] == pytest.approx(100.0)  # images 1 and 2: their best caption is second
    assert res["ir_r1"] == pytest.approx(300 / 6)  # texts 0, 2, 5
    assert res["ir_r5"] == pytest.approx(100.0)  # 3 images: everything within 5
    assert res["itc_tr_r1"] == res["tr_r1"] and res["r_mean"] == pytest.approx((res["tr_mean"] + res["ir_mean"]) / 2)
    for key in ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "itc_tr_r1", "itc_ir_r1", "tr_mean",
                "ir_mean", "r_mean"):
        assert key in res, key


# --------------------------------------------------------------------------- softmask-finetune from a pretraining run


def _shapes_ids(n=16, seed=0):
    ds = ShapesDataset("train", size=n, seed=seed)
    return {ds[i]["id"] for i in range(n)}


@pytest.fixture(scope="module")
def ft(pre, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ft") / "run")
    import io
    from contextlib import redirect_stderr

    err = io.StringIO()
    with redirect_stderr(err):
        rc = finetune(["--checkpoint", pre, "--out", out, "--steps", "3", "--save-every", "3", "--test-size", "8",
                       "--eval-k", "4", *SMALL])
    return {"out": out, "rc": rc, "err": err.getvalue()}


def test_finetune_from_pretraining_end_to_end(pre, ft):
    out = ft["out"]
    assert ft["rc"] == 0, ft["err"]
    assert f"started from the softmask checkpoint {latest_checkpoint(pre)}" in ft["err"]
    cfg = json.load(open(os.path.join(out, "config.json")))
    pre_cfg = json.load(open(os.path.join(pre, "config.json")))
    t = cfg["train"]
    assert t["task"] == "retrieval" and t["use_ids"] is True and t["init_checkpoint"] == pre
    assert cfg["model"]["weight_mlm"] == 0.0 and cfg["model"]["text_aug"] is False
    for k in ("queue_size", "vision_registers", "fusion_layers", "vocab_size", "image_size"):  # the checkpoint's
        assert cfg["model"][k] == pre_cfg["model"][k], k
    assert cfg["model"]["queue_size"] == 16  # from the pretraining run, not the preset's 1024
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["loss_mlm"] == 0.0 and r["loss_itc"] > 0 and r["loss_itm"] > 0 and r["loss_softmask"] > 0
               for r in rows)
    # it started from the pretrained weights: the MLM head (no loss, not optimized) is the pretrained one,
    # which differs from the seed's init (pretraining moved it)
    w_pre, w_ft = _weights(pre), _weights(out)
    assert torch.equal(w_ft["mlm_head.decoder.weight"], w_pre["mlm_head.decoder.weight"])
    torch.manual_seed(0)
    init = SoftMaskALBEF(model_preset("tiny", vocab_size=pre_cfg["model"]["vocab_size"], queue_size=16))
    assert not torch.equal(init.mlm_head.decoder.weight, w_pre["mlm_head.decoder.weight"])
    assert not torch.equal(w_ft["itm_head.weight"], w_pre["itm_head.weight"])  # fine-tuned
    # the ids reached the model: 3 steps of 4 pairs wrote 12 object-set ids after the pretraining's 12 slots
    idq = w_ft["idx_queue"]
    written = idq[idq != -100]
    assert written.numel() == 12 and set(written.tolist()) <= _shapes_ids()
    assert int(w_ft["queue_ptr"]) == (12 + 12) % 16
    assert (w_pre["idx_queue"] == -100).all()
    ev_ = json.load(open(os.path.join(out, "eval.json")))
    for key in ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "itc_tr_r1", "itc_ir_r1", "tr_mean",
                "ir_mean", "r_mean"):
        assert 0.0 <= ev_[key] <= 100.0, key
    assert ev_["num_images"] == 8 and ev_["rerank_k"] == 4 and ev_["eval_split"] == "shapes_test"
    assert ev_["tr_mean"] == pytest.approx((ev_["tr_r1"] + ev_["tr_r5"] + ev_["tr_r10"]) / 3)
    assert os.path.getsize(os.path.join(out, "plots", "loss_curves.png")) > 0


def test_softmask_eval_of_a_finetuned_run_on_another_seed(ft, tmp_path, monkeypatch):
    """``softmask-eval --seed N`` scores the shapes held-out split of seed N (default: the run's own)."""
    import softmask.data
    from softmask.eval.__main__ import main as eval_main

    seeds = []
    real = softmask.data.build_dataset

    def spy(spec, split, *args, **kw):
        seeds.append((spec, split, kw.get("seed"), kw.get("size")))
        return real(spec, split, *args, **kw)

    monkeypatch.setattr(softmask.data, "build_dataset", spy)
    dst = str(tmp_path / "ev")
    assert eval_main(["--checkpoint", ft["out"], "--seed", "5", "--test-size", "6", "--k", "2", "--out", dst,
                      "--no-plots"]) == 0
    assert eval_main(["--checkpoint", ft["out"], "--test-size", "6", "--k", "2", "--out", dst, "--no-plots"]) == 0
    assert seeds == [("shapes", "test", 5, 6), ("shapes", "test", 0, 6)]
    assert json.load(open(os.path.join(dst, "eval.json")))["num_images"] == 6
    assert eval_main(["--checkpoint", ft["out"], "--seed", "-1"]) == 2


def test_finetune_without_ids_and_without_the_method(pre, tmp_path):
    out = str(tmp_path / "noids")
    rc = finetune(["--checkpoint", pre, "--out", out, "--steps", "2", "--no-eval", "--no-ids", "--no-softmask",
                   "--gamma", "0", *SMALL])
    assert rc == 0
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["train"]["use_ids"] is False and cfg["model"]["softmask"] is False and cfg["model"]["gamma"] == 0.0
    assert all(r["loss_softmask"] == 0.0 and r["loss_mlm"] == 0.0 for r in _rows(out))
    assert (_weights(out)["idx_queue"] == -100).all()  # no ids: the enqueued slots say "unknown"


def test_finetune_resume_is_exact(pre, tmp_path):
    import shutil

    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    assert finetune(["--checkpoint", pre, "--out", full, "--steps", "4", "--save-every", "2", "--no-eval",
                     *SMALL]) == 0
    # the run as a kill after the step-2 checkpoint leaves it
    os.makedirs(os.path.join(cut, "checkpoints"))
    shutil.copytree(os.path.join(full, "checkpoints", "step_000002"), os.path.join(cut, "checkpoints", "step_000002"))
    shutil.copytree(os.path.join(full, "tokenizer"), os.path.join(cut, "tokenizer"))
    with open(os.path.join(cut, "checkpoints", "latest"), "w") as f:
        f.write("step_000002\n")
    with open(os.path.join(full, "metrics.jsonl")) as f, open(os.path.join(cut, "metrics.jsonl"), "w") as g:
        g.writelines(f.readlines()[:2])
    # resume takes every setting from the run (only --out and --resume given) and continues to step 4
    assert finetune(["--out", cut, "--resume", "--no-progress"]) == 0
    a, b = _rows(full), _rows(cut)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert [ra[k] for k in ("loss",) + LOSS_TERMS] == [rb[k] for k in ("loss",) + LOSS_TERMS], ra["step"]
    wa, wb = _weights(full), _weights(cut)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# --------------------------------------------------------------------------- an ALBEF checkpoint file


def _albef_state(model, *, retrieval):
    """This model's weights under ALBEF's key names and layouts (model_pretrain.py / model_retrieval.py)."""
    T = model.cfg.text_layers
    R = model.cfg.vision_registers
    bert = "" if retrieval else "bert."
    state = {}
    for k, v in model.state_dict().items():
        v = v.clone()
        m = re.match(r"^(text_encoder(?:_m)?)\.(embeddings\..*)$", k)
        m2 = re.match(r"^(text_encoder(?:_m)?)\.layer\.(\d+)\.(.*)$", k)
        m3 = re.match(r"^fusion_encoder\.layer\.(\d+)\.(.*)$", k)
        if k.endswith("reg_token"):
            continue  # ALBEF's ViT has no registers
        if m:
            name = f"{m.group(1)}.{bert}{m.group(2)}"
        elif m2:
            name = f"{m2.group(1)}.{bert}encoder.layer.{m2.group(2)}.{m2.group(3)}"
        elif m3:
            name = f"text_encoder.{bert}encoder.layer.{int(m3.group(1)) + T}.{m3.group(2)}"
        elif k.startswith("mlm_head."):
            if retrieval:
                continue  # ALBEF's retrieval model has no MLM head
            name = "text_encoder.cls.predictions." + ("bias" if k == "mlm_head.decoder.bias" else k[9:])
        elif k in ("image_queue", "text_queue"):
            name, v = k, v.t().contiguous()  # ALBEF: [dim, K]
        elif k == "queue_ptr":
            name, v = k, v.reshape(1)
        elif k == "idx_queue":
            if not retrieval:
                continue
            name, v = k, v.reshape(1, -1)
        elif k.endswith("pos_embed"):
            name, v = k, torch.cat([v[:, :1], v[:, 1 + R:]], dim=1)  # [CLS] and patches, no register positions
        else:
            name = k
        state[name] = v
    return state


@pytest.fixture(scope="module")
def albef_file(tmp_path_factory, tok):
    """A pretraining-layout ALBEF file made from a tiny model with recognizable weights."""
    torch.manual_seed(123)
    src = SoftMaskALBEF(model_preset("tiny", vocab_size=len(tok), queue_size=16))
    with torch.no_grad():
        src.itm_head.weight.fill_(0.25)
        src.temp.fill_(0.05)
        src.image_queue.copy_(torch.nn.functional.normalize(torch.randn(16, src.cfg.embed_dim), dim=1))
    path = tmp_path_factory.mktemp("albef") / "ALBEF_tiny.pth"
    torch.save({"model": _albef_state(src, retrieval=False), "config": {"queue_size": 16}, "epoch": 0}, path)
    return str(path), src


def test_finetune_from_an_albef_file(albef_file, tmp_path, capsys, monkeypatch):
    """``load_albef_checkpoint`` is called with the ALBEF file (MLM head allowed missing, partial off) on a model
    of the preset given (tiny here), every weight arrives, and the log gives the report's counts."""
    import softmask.model.albef_checkpoint as ac

    path, src = albef_file
    calls = []
    real = ac.load_albef_checkpoint

    def spy(model, source, **kw):
        report = real(model, source, **kw)
        calls.append((source, kw, {k: v.clone() for k, v in model.state_dict().items()}, report))
        return report

    monkeypatch.setattr(ac, "load_albef_checkpoint", spy)
    out = str(tmp_path / "ft")
    rc = finetune(["--checkpoint", path, "--preset", "tiny", "--queue-size", "16", "--out", out, "--steps", "1",
                   "--no-eval", *SMALL])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert len(calls) == 1
    source, kw, loaded, report = calls[0]
    assert source == path and kw == {"allow_missing": ("mlm_head.",), "partial": False}
    want = src.state_dict()
    for k, v in want.items():
        if k.endswith("reg_token") or k.endswith("pos_embed"):
            continue
        assert torch.equal(loaded[k], v), k
    R = src.cfg.vision_registers
    for k in ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed"):  # patches loaded, register positions kept
        assert torch.equal(loaded[k][:, :1], want[k][:, :1]) and torch.equal(loaded[k][:, 1 + R:], want[k][:, 1 + R:])
    assert report["missing"] == [] and report["unexpected"] == [] and report["queues"] == "loaded"
    line = next(ln for ln in err.splitlines() if "started from the ALBEF checkpoint" in ln)
    assert f"{report['loaded']} tensors loaded, 0 missing" in line and "0 unexpected" in line
    assert f"{len(report['ignored'])} ignored" in line
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["train"]["preset"] == "tiny" and cfg["train"]["init_checkpoint"] == path


def test_albef_retrieval_layout_and_partial_load(albef_file, tmp_path, capsys):
    path, src = albef_file
    state = torch.load(path, weights_only=True)["model"]
    # ALBEF's retrieval layout: text_encoder.* without bert., no MLM head, an id queue
    ret = _albef_state(src, retrieval=True)
    ret_path = str(tmp_path / "flickr_tiny.pth")
    torch.save({"model": ret}, ret_path)
    rc = finetune(["--checkpoint", ret_path, "--preset", "tiny", "--queue-size", "16", "--out",
                   str(tmp_path / "ret"), "--steps", "1", "--no-eval", *SMALL])
    err = capsys.readouterr().err
    assert rc == 0, err
    n_mlm = sum(1 for k in src.state_dict() if k.startswith("mlm_head."))
    assert f"{n_mlm} missing (left at their init: mlm_head." in err
    # a weight the file lacks: an error naming --partial-load, unless it is given
    del state["itm_head.weight"]
    cut = str(tmp_path / "cut.pth")
    torch.save({"model": state}, cut)
    err = _one_line_error(capsys, finetune(["--checkpoint", cut, "--preset", "tiny", "--queue-size", "16", "--out",
                                            str(tmp_path / "cut"), "--steps", "1", "--no-eval", *SMALL]))
    assert "--checkpoint" in err and "itm_head.weight" in err and "--partial-load" in err
    rc = finetune(["--checkpoint", cut, "--preset", "tiny", "--queue-size", "16", "--out", str(tmp_path / "part"),
                   "--steps", "1", "--no-eval", "--partial-load", *SMALL])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "1 missing (left at their init: itm_head.weight)" in err


def test_albef_file_means_the_base_preset(albef_file, tmp_path):
    path, _ = albef_file
    cfg, sources = config_from_argv(["--checkpoint", path, "--out", str(tmp_path / "x")], task="retrieval")
    assert cfg.preset == "base" and "ALBEF" in sources["preset"][1]
    cfg, _ = config_from_argv(["--checkpoint", path, "--preset", "tiny"], task="retrieval")
    assert cfg.preset == "tiny"
    assert cfg.task == "retrieval" and cfg.use_ids and cfg.weight_mlm == 0.0 and cfg.lr < TrainConfig().lr


# --------------------------------------------------------------------------- bad inputs


class _RunsCode:
    """Unpickling this object would call os.system: a tampered checkpoint."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_bad_checkpoints_and_flags(pre, albef_file, tmp_path, capsys):
    path, _ = albef_file
    common = ["--preset", "tiny", "--queue-size", "16", "--steps", "1", "--no-eval", *SMALL]
    # tampered: a pickle that would run code is refused, and the code does not run
    marker = tmp_path / "pwned"
    state = torch.load(path, weights_only=True)
    state["evil"] = _RunsCode(str(marker))
    bad = tmp_path / "tampered.pth"
    torch.save(state, bad)
    err = _one_line_error(capsys, finetune(["--checkpoint", str(bad), "--out", str(tmp_path / "a"), *common]))
    assert "--checkpoint" in err and "weights_only" in err and "tampered.pth" in err
    assert not marker.exists()
    # truncated
    trunc = tmp_path / "truncated.pth"
    trunc.write_bytes(open(path, "rb").read()[:5000])
    err = _one_line_error(capsys, finetune(["--checkpoint", str(trunc), "--out", str(tmp_path / "b"), *common]))
    assert "--checkpoint" in err and "truncated.pth" in err
    # missing file, a directory without a checkpoint, a vocabulary that does not fit
    err = _one_line_error(capsys, finetune(["--checkpoint", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "c"),
                                            *common]))
    assert "--checkpoint" in err and "nope.pth" in err and "no such file or directory" in err
    (tmp_path / "empty").mkdir()
    err = _one_line_error(capsys, finetune(["--checkpoint", str(tmp_path / "empty"), "--out", str(tmp_path / "d"),
                                            *common]))
    assert "no softmask checkpoint in this directory" in err
    # a preset that is not the run's
    err = _one_line_error(capsys, finetune(["--checkpoint", pre, "--preset", "base", "--out", str(tmp_path / "e"),
                                            "--steps", "1", "--no-eval", *SMALL]))
    assert "--preset base" in err and "'tiny' model" in err
    # --partial-load with a softmask run (it must fit exactly)
    err = _one_line_error(capsys, finetune(["--checkpoint", pre, "--partial-load", "--out", str(tmp_path / "f"),
                                            "--steps", "1", "--no-eval", *SMALL]))
    assert "--partial-load" in err and "ALBEF checkpoint file" in err
    # unknown flag, and a flag of pretraining only
    for argv in (["--bogus"], ["--vit-checkpoint", "x.pth"]):
        with pytest.raises(SystemExit) as e:
            finetune(argv)
        err = _one_line_error(capsys, e.value.code)
        assert "softmask-finetune: error: unrecognized arguments" in err
    # nothing was written for the runs that failed before training
    assert not os.path.exists(tmp_path / "a" / "config.json") and not os.path.exists(tmp_path / "c" / "config.json")


# --------------------------------------------------------------------------- ALBEF's retrieval JSON files


def test_finetune_on_albef_retrieval_json(pre, retrieval_json, tmp_path, capsys):
    """Training entries ``{image, caption, image_id}`` (several entries per image id) and a test file with
    several captions per image, one of them unreadable (skipped with a note)."""
    d = tmp_path
    rng = np.random.default_rng(0)
    entries = []
    for i in range(6):
        _png(d / f"t{i}.png", tuple(int(c) for c in rng.integers(0, 255, 3)))
        for c in ("a red circle", "a blue square"):
            entries.append({"image": f"t{i}.png", "caption": f"{c} {i}", "image_id": f"img_{i % 3}"})
    (d / "train.json").write_text(json.dumps(entries))
    out = str(d / "ft")
    rc = finetune(["--checkpoint", pre, "--data", str(d / "train.json"), "--test-data",
                   str(retrieval_json / "test.json"), "--out", out, "--steps", "2", "--eval-k", "2", *SMALL])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "1 of 4 images are missing or unreadable" in cap.err and "broken.png" in cap.err
    ev_ = json.load(open(os.path.join(out, "eval.json")))
    assert ev_["num_images"] == 3 and ev_["num_texts"] == 6 and ev_["eval_split"] == "test"
    assert ev_["chance_r1"] == pytest.approx(100 / 3)
    idq = _weights(out)["idx_queue"]
    written = idq[idq != -100].tolist()
    assert len(written) == 8 and set(written) <= {0, 1, 2}  # 2 steps of 4 pairs, ids of img_0 .. img_2
    assert "eval: " in cap.out and "r_mean" in cap.out


def test_finetune_help_lists_its_flags(capsys):
    with pytest.raises(SystemExit) as e:
        finetune(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: softmask-finetune")
    for flag in ("--checkpoint", "--partial-load", "--no-ids", "--no-softmask", "--gamma", "--text-aug", "--data",
                 "--image-root", "--test-data", "--out", "--steps", "--epochs", "--seed", "--device", "--config",
                 "--resume", "--no-progress", "--eval-k"):
        assert flag in text, flag
    assert "--vit-checkpoint" not in text and "--no-text-aug" not in text
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        assert 'softmask-finetune = "softmask.train.finetune:main"' in f.read()
