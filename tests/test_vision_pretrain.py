"""The vision pretraining stage (labelled single-object images) and the shipped ViT checkpoint."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from softmask.data.shapes import COLORS, SHAPES, ObjectsDataset, ShapesDataset
from softmask.model import SoftMaskALBEF
from softmask.model.pretrained import load_pretrained
from softmask.train.loop import TrainConfig, build_model, resolve_vit_checkpoint
from softmask.train.vision_pretrain import (
    BUILTIN_VIT,
    VisionPretrainConfig,
    builtin_vit_path,
    main,
    patch_labels,
    pretrain_vision,
)


def test_objects_dataset_labels_match_the_pixels():
    ds = ObjectsDataset("train", size=40, image_size=64, seed=3)
    for i in range(len(ds)):
        item = ds[i]
        assert item["index"] == i and set(item) == {"image", "shape", "color", "box", "mask", "index"}
        x0, y0, x1, y1 = item["box"]
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        # the box centre is painted for every shape (triangle: its centroid column, mid-height)
        cx, cy = int((x0 + x1 - 1) / 2), int((y0 + y1 - 1) / 2)
        pixel = np.asarray(item["image"])[cy, cx]
        assert tuple(int(v) for v in pixel) == list(COLORS.values())[item["color"]], (i, item)
        # the mask is exactly the painted pixels
        img, mask = np.asarray(item["image"]), item["mask"].numpy().astype(bool)
        painted = (img == np.array(list(COLORS.values())[item["color"]])).all(-1)
        assert item["mask"].dtype == torch.uint8 and np.array_equal(mask, painted) and mask[cy, cx]
        assert 0 <= item["shape"] < len(SHAPES)


def test_objects_dataset_is_deterministic_and_disjoint_from_the_scenes():
    a, b = ObjectsDataset("train", size=8, seed=0), ObjectsDataset("train", size=8, seed=0)
    for i in range(8):
        assert np.array_equal(np.asarray(a[i]["image"]), np.asarray(b[i]["image"]))
    test = ObjectsDataset("test", seed=0)
    assert len(test) == 512 and len(ObjectsDataset("train")) == 10**9
    assert not np.array_equal(np.asarray(a[0]["image"]), np.asarray(test[0]["image"]))
    scenes = ShapesDataset("train", size=64, seed=0)
    objects = {np.asarray(a[i]["image"]).tobytes() for i in range(8)}
    assert not objects & {np.asarray(scenes[i]["image"]).tobytes() for i in range(64)}
    # every shape and colour occurs
    many = ObjectsDataset("train", size=300, seed=1)
    assert {many[i]["shape"] for i in range(300)} == set(range(len(SHAPES)))
    assert {many[i]["color"] for i in range(300)} == set(range(len(COLORS)))
    with pytest.raises(ValueError, match="split"):
        ObjectsDataset("val")
    with pytest.raises(IndexError):
        a[8]


@pytest.mark.parametrize("bad", [dict(steps=0), dict(lr=-1.0), dict(pool="mean"), dict(preset="huge"),
                                 dict(batch_size=True), dict(threads=0), dict(seed=-1)])
def test_config_rejects_bad_values(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        VisionPretrainConfig(**bad)


def test_patch_labels():
    mask = torch.zeros(2, 16, 16, dtype=torch.uint8)
    mask[0, :8, :8] = 1  # patch 0 fully covered
    mask[0, 8:10, 8:16] = 1  # patch 3: a quarter
    mask[1, 0, 0] = 1  # patch 0: 1/64 (ignored)
    mask[1, 8:, 0:7] = 1  # patch 2: 56/64
    got = patch_labels(mask, torch.tensor([3, 1]), 8, 5)
    assert got.tolist() == [[3, 5, 5, 3], [-100, 5, 1, 5]]


@pytest.mark.parametrize("pool", ["dense", "max", "cls"])
def test_every_pool_trains(pool):
    cfg = VisionPretrainConfig(steps=2, batch_size=3, test_size=4, eval_every=1, warmup_steps=0, pool=pool)
    vit, report = pretrain_vision(cfg, log=None)
    assert len(report["history"]) == 2 and all(np.isfinite(r["loss"]) for r in report["history"])


def test_pretrain_vision_writes_a_checkpoint_that_softmask_pretrain_loads(tmp_path):
    out = str(tmp_path / "vit.safetensors")
    cfg = VisionPretrainConfig(steps=3, batch_size=4, test_size=8, eval_every=2, warmup_steps=1)
    vit, report = pretrain_vision(cfg, out, log=None)
    assert [r["step"] for r in report["history"]] == [2, 3]
    assert 0 <= report["test_shape_acc"] <= 1 and 0 <= report["test_color_acc"] <= 1
    with open(str(tmp_path / "vit.json")) as f:
        assert json.load(f)["config"]["steps"] == 3
    state = load_file(out)
    assert "reg_token" in state and not any(k.startswith("head.") for k in state)
    tcfg = TrainConfig(vit_checkpoint=out)
    assert resolve_vit_checkpoint(tcfg) == out
    model = build_model(tcfg, None, tcfg.model_config(_tok()))
    for k, v in vit.state_dict().items():
        torch.testing.assert_close(model.visual_encoder.state_dict()[k], v, rtol=0, atol=0)
        torch.testing.assert_close(model.visual_encoder_m.state_dict()[k], v, rtol=0, atol=0)
    with pytest.raises(ValueError, match="out"):
        pretrain_vision(cfg, str(tmp_path / "vit.pt"), log=None)


def test_cli(tmp_path, capsys):
    out = str(tmp_path / "v.safetensors")
    main(["--out", out, "--steps", "2", "--batch-size", "2", "--warmup-steps", "0", "--threads", "1"])
    assert os.path.exists(out) and json.loads(capsys.readouterr().out.strip().splitlines()[-1])["seconds"] >= 0
    with pytest.raises(SystemExit):
        main(["--out", out, "--steps", "0"])
    assert "steps" in capsys.readouterr().err


def _tok():
    from softmask.data import get_tokenizer

    return get_tokenizer(None)


def test_vit_checkpoint_resolution(tmp_path):
    assert resolve_vit_checkpoint(TrainConfig()) == builtin_vit_path()  # the default job: the shapes recipe
    assert resolve_vit_checkpoint(TrainConfig(vit_checkpoint="none")) is None
    assert resolve_vit_checkpoint(TrainConfig(vit_checkpoint=None)) is None
    assert resolve_vit_checkpoint(TrainConfig(vit_checkpoint=BUILTIN_VIT, vision_attn_radius=1)) == builtin_vit_path()
    for bad in (dict(), dict(vision_attn_radius=2), dict(vision_attn_radius=1, preset="base")):
        with pytest.raises(Exception, match="vit_checkpoint.*radius 1"):
            TrainConfig(vit_checkpoint=BUILTIN_VIT, **bad)
    assert resolve_vit_checkpoint(TrainConfig(vit_checkpoint="x.safetensors")) == "x.safetensors"
    with pytest.raises(Exception, match="init_checkpoint"):
        TrainConfig(init_checkpoint=str(tmp_path), vit_checkpoint=BUILTIN_VIT, vision_attn_radius=1)
    TrainConfig(init_checkpoint=str(tmp_path), vit_checkpoint="none")  # no conflict


def test_shapes_recipe_resolution(tmp_path):
    """vit_checkpoint "auto" (the default) is the shapes recipe exactly where the shipped ViT fits: the tiny preset
    on the shapes data from no checkpoint; settings given keep their value; elsewhere the earlier default."""
    recipe = dict(vit_checkpoint=BUILTIN_VIT, vision_attn_radius=1, vision_lr_scale=0.1, text_attn_radius=1,
                  mask_floor=0.75, itm_text_aug=False, steps=1200, vision_frozen_blocks=3, batch_size=33)
    r = TrainConfig().resolved()
    assert {k: getattr(r, k) for k in recipe} == recipe
    assert r.resolved() == r  # idempotent: a run's saved config.json replays the same run
    assert TrainConfig(**recipe).resolved() == r  # the explicit recipe is the default
    # settings given are kept, the rest of the recipe still applies
    r = TrainConfig(text_attn_radius=3, vision_lr_scale=0.5, steps=700, itm_text_aug=True, mask_floor=0.0,
                    vision_frozen_blocks=0, batch_size=48).resolved()
    assert (r.vit_checkpoint, r.text_attn_radius, r.vision_lr_scale, r.vision_attn_radius) == (BUILTIN_VIT, 3, 0.5, 1)
    assert (r.steps, r.itm_text_aug, r.mask_floor, r.vision_frozen_blocks, r.batch_size) == (700, True, 0.0, 0, 48)
    # elsewhere: random init, global attention, the ViT at the full lr (the earlier default)
    earlier = dict(vit_checkpoint=None, vision_attn_radius=None, vision_lr_scale=1.0, text_attn_radius=None,
                   mask_floor=None, itm_text_aug=None, steps=800, vision_frozen_blocks=None, batch_size=48)
    for other in (dict(vit_checkpoint="none"), dict(vit_checkpoint=None), dict(preset="base"),
                  dict(data=str(tmp_path / "caps.json")), dict(init_checkpoint=str(tmp_path)),
                  dict(vision_stem="conv"), dict(vision_registers=2), dict(vision_attn_radius=2),
                  dict(bert_dir=str(tmp_path))):
        r = TrainConfig(**other).resolved()
        want = {**earlier, **{k: v for k, v in other.items() if k in earlier}}
        if other.get("vit_checkpoint") == "none":
            want["vit_checkpoint"] = "none"
        assert {k: getattr(r, k) for k in earlier} == want, other
        assert not TrainConfig(**other).recipe_applies(), other
    # an explicit ViT file: its own settings, the full lr unless given
    r = TrainConfig(vit_checkpoint="x.safetensors").resolved()
    assert (r.vit_checkpoint, r.vision_lr_scale, r.text_attn_radius) == ("x.safetensors", 1.0, None)
    # fine-tuning starts from its --checkpoint, or else from random weights, never from the recipe's ViT
    from softmask.train.loop import task_config

    assert task_config("retrieval").resolved().vit_checkpoint is None
    assert task_config("retrieval").resolved().steps == 300
    assert task_config("retrieval", init_checkpoint=str(tmp_path)).resolved().vit_checkpoint is None
    # the model built from the default has local attention on both sides
    mcfg = TrainConfig().model_config(_tok())
    assert (mcfg.vision_attn_radius, mcfg.text_attn_radius, mcfg.mask_floor, mcfg.itm_text_aug) == (1, 1, 0.75, False)
    assert TrainConfig(vit_checkpoint="none").model_config(_tok()).text_attn_radius is None


def test_default_job_starts_from_the_shipped_vit_only_when_asked():
    tok = _tok()
    for v, want in (("none", False), ("auto", True), (BUILTIN_VIT, True)):
        cfg = TrainConfig(vit_checkpoint=v, vision_attn_radius=1)
        model = build_model(cfg, tok)
        shipped = load_file(builtin_vit_path())
        same = torch.equal(model.visual_encoder.state_dict()["blocks.0.attn.qkv.weight"],
                           shipped["blocks.0.attn.qkv.weight"])
        assert same == want


def test_shipped_vit_loads_into_the_tiny_model_and_names_shapes():
    path = builtin_vit_path()
    assert os.path.exists(path), "the shipped ViT checkpoint is missing from the package"
    tcfg = TrainConfig(vit_checkpoint=BUILTIN_VIT, vision_attn_radius=1)
    model = SoftMaskALBEF(tcfg.model_config(_tok()))
    assert model.cfg.vision_attn_radius == 1
    rep = load_pretrained(model, vit_checkpoint=path)
    assert rep["vit_not_in_checkpoint"] == [] and rep["vit_loaded"] == len(load_file(path))
    with open(path[: -len(".safetensors")] + ".json") as f:
        report = json.load(f)
    assert report["model_preset"] == "tiny" and report["test_shape_acc"] >= 0.9
    assert report["config"] == {**report["config"], "pool": "max", "vision_attn_radius": 1}
    # the default command's settings are the shipped file's (only the thread count may differ)
    from dataclasses import asdict

    assert {**asdict(VisionPretrainConfig()), "threads": None} == {**report["config"], "threads": None}
    # a fresh check of the shipped weights: a linear head fitted on held-out single objects' max-pooled patch
    # tokens names their shape far above chance (20 %)
    vit = model.visual_encoder.eval()
    from softmask.data.augment import image_transform

    tf = image_transform(64, False)
    ds = ObjectsDataset("test", size=160, seed=7, transform=tf)
    with torch.no_grad():
        x = torch.stack([ds[i]["image"] for i in range(len(ds))])
        feats = vit.forward_features(x)[:, vit.num_prefix_tokens:].amax(1)
    y = torch.tensor([ds[i]["shape"] for i in range(len(ds))])
    from research.shape_probe import linear_probe

    assert linear_probe(feats[:100], y[:100], feats[100:], y[100:], len(SHAPES)) >= 0.8


@pytest.mark.parametrize("scale", [1.0, 0.1, 0.0])
def test_vision_lr_scale_groups(scale):
    from softmask.train.loop import _param_groups

    tcfg = TrainConfig(vision_lr_scale=scale)
    model = SoftMaskALBEF(tcfg.model_config(_tok()))
    groups = _param_groups(model, 0.02, 1e-3, 0.1, (), scale)
    by_id = {id(p): g for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    vit = [n for n, p in names.items() if n.startswith("visual_encoder.") and p.requires_grad]
    other = [n for n, p in names.items() if not n.startswith("visual_encoder.") and p.requires_grad and n != "temp"]
    assert vit and other
    for n in other:
        assert by_id[id(names[n])].get("lr", 1e-3) == 1e-3, n
    for n in vit:
        if scale == 0:
            assert id(names[n]) not in by_id, n
        else:
            assert by_id[id(names[n])].get("lr", 1e-3) == pytest.approx(1e-3 * scale), n
    assert by_id[id(names["temp"])]["lr"] == pytest.approx(1e-4)
    with pytest.raises(Exception, match="vision_lr_scale"):
        TrainConfig(vision_lr_scale=-1.0)


def test_local_attention_mask_and_receptive_field():
    from softmask.model.albef import build_vision_encoder, local_attention_mask
    from softmask.model.config import model_preset

    m = local_attention_mask(3, 2, 1)
    assert m.shape == (11, 11) and (m[:2] == 0).all()  # prefix tokens see everything
    assert torch.isinf(m[2:, :2]).all()  # patch tokens see no prefix token
    assert (m[2 + 0, 2:] == 0).tolist() == [True, True, False, True, True, False, False, False, False]
    assert (m[2 + 4] == 0)[2:].all()  # the centre patch sees all 9
    with pytest.raises(ValueError, match="vision_attn_radius"):
        model_preset("tiny", vision_attn_radius=-1)
    for radius, attn in ((1, "sdpa"), (1, "eager"), (0, "sdpa"), (None, "sdpa")):
        torch.manual_seed(0)
        vit = build_vision_encoder(model_preset("tiny", vision_attn_radius=radius, attn_impl=attn))
        x = torch.randn(1, 3, 64, 64, requires_grad=True)
        tokens = vit.forward_features(x)
        # the top-left patch token's receptive field: its own 8 px patch plus `radius` patches per block (4)
        g, = torch.autograd.grad((tokens[0, vit.num_prefix_tokens] * torch.randn(tokens.shape[-1])).sum(), x)
        seen = (g[0].abs().sum(0) > 0).nonzero().amax(0)
        want = 63 if radius is None else min(63, 8 * (1 + 4 * radius) - 1)
        assert seen.tolist() == [want, want], (radius, attn)
        # the masks are buffers, not weights: the state dict is the global ViT's
        assert not any("local_mask" in k for k in vit.state_dict())


def test_caption_holds():
    from softmask.data.shapes import caption_holds

    ds = ShapesDataset("train", size=600, seed=2)
    scenes = [ds.scene(i) for i in range(len(ds))]
    assert all(caption_holds(s["caption"], s["objects"]) for s in scenes)
    a = {"word": "circle", "color": "red", "box": [2, 2, 20, 20]}
    b = {"word": "square", "color": "blue", "box": [30, 2, 50, 20]}
    c = {"word": "cross", "color": "green", "box": [30, 40, 50, 60]}
    assert caption_holds("a red circle left of a blue square", [a, b])
    assert caption_holds("there is a blue square right of a red circle", [b, a])
    assert not caption_holds("a red circle right of a blue square", [a, b])
    assert not caption_holds("a red circle above a blue square", [a, b])  # same row: neither above nor below
    assert not caption_holds("a red circle left of a green square", [a, b])
    assert not caption_holds("a red circle", [a, b])  # a caption names every object of its image
    assert caption_holds("a picture of a red circle", [a]) and caption_holds("there is a red circle", [a])
    assert caption_holds("a green cross and a red circle left of a blue square", [a, b, c])
    assert caption_holds("a blue square is above a green cross, and a red circle", [a, b, c])
    assert not caption_holds("a blue square is below a green cross, and a red circle", [a, b, c])


def test_token_locality_probe_runs_on_a_small_set():
    from research.token_locality import locality, main as locality_main
    from softmask.model.albef import build_vision_encoder
    from softmask.model.config import model_preset

    torch.manual_seed(0)
    out = locality(build_vision_encoder(model_preset("tiny", vision_attn_radius=1)), n=24)
    assert 0 < out["images"] <= 24
    assert all(0 <= out[f"shape_probe_{k}"] <= 1 for k in ("inside", "outside", "far"))
    with pytest.raises(SystemExit):
        locality_main(["--radius", "1"])  # the weights argument is required


def test_shape_probe_features_per_box_and_per_token():
    """``object_features``: one row per object (the mean of the tokens inside its box) or, ``per_token``, one row per
    such token with its object's labels; the mean of an object's per-token rows is its per-box row."""
    from research.shape_probe import object_features
    from softmask.data import build_dataset
    from softmask.model import model_preset

    torch.manual_seed(0)
    model = SoftMaskALBEF(model_preset("tiny", vocab_size=len(_tok()), vision_depth=1, queue_size=8)).eval()
    ds = build_dataset("shapes", "test", 64, train=False, size=3, seed=0)
    Xb, sb, cb = object_features(model, ds, 3)
    Xt, st, ct = object_features(model, ds, 3, per_token=True)
    # tokens per object: patch centres (8 px patches) inside the box, at least one
    centres = [4 + 8 * k for k in range(8)]
    counts = []
    for i in range(3):
        for o in ds[i]["objects"]:
            x0, y0, x1, y1 = o["box"]
            n = sum(1 for cy in centres for cx in centres if y0 <= cy <= y1 and x0 <= cx <= x1)
            counts.append(max(n, 1))
    assert Xb.shape[0] == len(counts) == len(sb) == len(cb)
    assert Xt.shape[0] == sum(counts) == len(st) == len(ct) > len(counts)
    start = 0
    for j, n in enumerate(counts):
        assert (st[start:start + n] == sb[j]).all() and (ct[start:start + n] == cb[j]).all()
        torch.testing.assert_close(Xt[start:start + n].mean(0), Xb[j], atol=1e-5, rtol=1e-5)
        start += n


def test_runs_saved_before_frozen_blocks_keep_every_block_training(tmp_path):
    """A run saved before vision_frozen_blocks existed trained every block: resuming, replaying or comparing it
    counts the missing field as 0 (LEGACY_VALUES), not as today's recipe value, 3."""
    from softmask.train.config import LEGACY_VALUES, config_differences, load_config_file

    old = TrainConfig(vision_frozen_blocks=0, batch_size=48).resolved().to_dict()
    del old["vision_frozen_blocks"]
    assert LEGACY_VALUES["vision_frozen_blocks"] == 0
    assert config_differences(TrainConfig(vision_frozen_blocks=0, batch_size=48).resolved(), old) == []
    assert ("vision_frozen_blocks", 0, 3) in config_differences(TrainConfig(batch_size=48).resolved(), old)
    run_config = tmp_path / "config.json"  # replaying the older run from its own config.json
    run_config.write_text(json.dumps({"train": old}))
    assert TrainConfig(**load_config_file(str(run_config))).resolved().vision_frozen_blocks == 0
