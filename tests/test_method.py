"""The soft-mask ITM design (dimmed images in positive and negative pairs), the ITM shortcut
probe, the pointing game watched during training, ViT registers and the conv stem, the
soft-mask picture and the ablation table."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from softmask.data import Collator, build_dataset, candidate_word_mask, get_tokenizer, mask_tokens
from softmask.model import SoftMaskALBEF, model_preset
from softmask.model.albef import build_vision_encoder

B = 6


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer(None)


@pytest.fixture(scope="module")
def batch(tok):
    ds = build_dataset("shapes", "train", 64, train=True, size=B, seed=5)
    b = Collator(tok, 24)([ds[i] for i in range(B)])
    L = int(b["attention_mask"].sum(1).max())
    ids, am = b["input_ids"][:, :L], b["attention_mask"][:, :L]
    mids, labels = mask_tokens(ids, tok, generator=torch.Generator().manual_seed(0))
    labels[0, 1] = ids[0, 1]
    return dict(image=b["image"], input_ids=ids, attention_mask=am, mlm_input_ids=mids, mlm_labels=labels,
                word_candidates=candidate_word_mask(mids, am, tok))


def small(tok, **kw):
    return model_preset("tiny", vocab_size=len(tok), vision_depth=1, queue_size=16, **kw)


def rig_itm_head(model, match_logit: float):
    """ITM logits ``[0, match_logit]`` for every pair: match probability sigmoid(match_logit)."""
    with torch.no_grad():
        model.itm_head.weight.zero_()
        model.itm_head.bias.copy_(torch.tensor([0.0, match_logit]))


@pytest.mark.parametrize("negatives,pairs", [(True, "all"), (True, "one"), (False, "all")])
def test_softmask_branch_label_ratio(tok, batch, negatives, pairs):
    """With a constant ITM head (match probability p for every pair), loss_softmask is the cross-entropy
    of its labels: 1 positive per 2 negatives when dimmed images enter negative pairs as well (the
    dimming carries no label information), all positives otherwise."""
    torch.manual_seed(0)
    model = SoftMaskALBEF(small(tok, softmask_negatives=negatives, softmask_pairs=pairs))
    b = 0.7
    rig_itm_head(model, b)
    torch.manual_seed(1)
    out = model(batch["image"], batch["input_ids"], batch["attention_mask"], mlm_input_ids=batch["mlm_input_ids"],
                mlm_labels=batch["mlm_labels"], word_candidates=batch["word_candidates"], alpha=0.4)
    nll_pos, nll_neg = -F.logsigmoid(torch.tensor(b)), -F.logsigmoid(torch.tensor(-b))
    expect = (nll_pos + 2 * nll_neg) / 3 if negatives else nll_pos
    assert float(out["loss_softmask"].detach()) == pytest.approx(float(expect), rel=1e-5)
    assert float(out["loss_itm"].detach()) == pytest.approx(float((nll_pos + 2 * nll_neg) / 3), rel=1e-5)


def _spy_image_kv(model, monkeypatch):
    """Spy on the fusion encoder's ``image_kv``. Returns ``images_of(image_embeds, image_kv, image_index)``: the
    image embeddings of each pair of a fusion pass, whether the pass got them as embeddings or as shared keys /
    values with a per-pair index."""
    projected, real_kv = {}, model.fusion_encoder.image_kv

    def kv_spy(image_embeds):
        kv = real_kv(image_embeds)
        projected[id(kv)] = image_embeds.detach().clone()
        return kv

    def images_of(image_embeds, image_kv, image_index):
        if image_embeds is not None:
            return image_embeds
        images = projected[id(image_kv)]
        return images if image_index is None else images[image_index]

    monkeypatch.setattr(model.fusion_encoder, "image_kv", kv_spy)
    return images_of


def _spy_fusion_pairs(model, monkeypatch):
    """Record every ITM fusion pass as (captions [P, L, hidden], images [P, N, Dv]) of its pairs."""
    calls, real_itm = [], model.itm_logits
    images_of = _spy_image_kv(model, monkeypatch)

    def itm_spy(text_embeds, attention_mask, image_embeds=None, capture_layer=None, *, image_kv=None,
                image_index=None):
        images = images_of(image_embeds, image_kv, image_index)
        calls.append((text_embeds.detach().clone(), images.detach().clone()))
        return real_itm(text_embeds, attention_mask, image_embeds, capture_layer, image_kv=image_kv,
                        image_index=image_index)

    monkeypatch.setattr(model, "itm_logits", itm_spy)
    return calls


def _row_of(x, rows):
    """Index of each of x's entries among ``rows`` (nearest in L1)."""
    return [int((x[j] - rows).abs().flatten(1).sum(1).argmin()) for j in range(x.shape[0])]


@pytest.mark.parametrize("pairs", ["all", "one"])
def test_softmask_negatives_pair_dimmed_images_with_wrong_captions(tok, batch, monkeypatch, pairs):
    """The soft-masked fusion pass sees (caption i, dimmed i) as positives, and as negatives the dimmed
    hard-negative image with caption i and the dimmed image i with its hard-negative caption: all three per
    row (``softmask_pairs="all"``), or one of them per row, a third of the rows each (``"one"``)."""
    torch.manual_seed(0)
    model = SoftMaskALBEF(small(tok, softmask_pairs=pairs))
    calls = _spy_fusion_pairs(model, monkeypatch)
    torch.manual_seed(1)
    model(batch["image"], batch["input_ids"], batch["attention_mask"], mlm_input_ids=batch["mlm_input_ids"],
          mlm_labels=batch["mlm_labels"], word_candidates=batch["word_candidates"], alpha=0.0)
    (t_pos, i_pos), (t_neg, i_neg), (t_sm, i_sm) = calls  # positives (Grad-CAM pass), negatives, soft-masked
    neg_idx = _row_of(i_neg[:B], i_pos)  # each row's hard-negative image among the clean images
    assert torch.equal(t_neg[:B], t_pos) and torch.equal(i_neg[B:], i_pos)
    if pairs == "all":
        assert t_sm.shape[0] == 3 * B and i_sm.shape[0] == 3 * B
        assert torch.equal(t_sm[:B], t_pos) and torch.equal(t_sm[B : 2 * B], t_pos)
        assert torch.equal(t_sm[2 * B :], t_neg[B:])  # hard-negative captions of the clean negatives
        masked = i_sm[:B]
        assert torch.equal(i_sm[2 * B :], masked)
        assert torch.equal(i_sm[B : 2 * B], masked[neg_idx])
    else:
        assert t_sm.shape[0] == B and i_sm.shape[0] == B
        # row i's pair is one of (t_i, m_i), (t_i, m_neg(i)), (t_neg(i), m_i): recover which from the caption
        # and the image, and check the roles split into thirds
        roles = []
        masked = torch.empty_like(i_pos)
        for j in range(B):
            if torch.equal(t_sm[j], t_neg[B + j]) and not torch.equal(t_sm[j], t_pos[j]):
                roles.append(2)
                masked[j] = i_sm[j]
            elif _row_of(i_sm[j : j + 1, :1], i_pos[:, :1])[0] == j:  # [CLS] is never dimmed
                roles.append(0)
                masked[j] = i_sm[j]
            else:
                assert _row_of(i_sm[j : j + 1, :1], i_pos[:, :1])[0] == neg_idx[j]
                roles.append(1)
                masked[j] = float("nan")
            if roles[-1] != 2:
                assert torch.equal(t_sm[j], t_pos[j])
        assert sorted(roles.count(r) for r in range(3)) == [B // 3] * 3
        keep = [j for j in range(B) if roles[j] != 1]
        i_pos, masked = i_pos[keep], masked[keep]
    assert not torch.equal(masked, i_pos)  # dimmed
    # the mask is a per-token scale of the clean embeddings, [CLS] untouched
    scale = masked[:, 1:, 0] / i_pos[:, 1:, 0]
    assert torch.allclose(masked[:, 1:], i_pos[:, 1:] * scale[..., None], rtol=1e-4, atol=1e-6)
    assert torch.equal(masked[:, 0], i_pos[:, 0])


@pytest.mark.parametrize("itm_text_aug", [True, False])
def test_itm_text_aug_chooses_the_caption_itm_reads(tok, batch, monkeypatch, itm_text_aug):
    """With ``text_aug``, ITM and the soft-masked pairs read the masked caption (``itm_text_aug``, the default;
    MLM shares the positive pass) or the clean one (then MLM has its own fusion pass over the masked caption)."""
    torch.manual_seed(0)
    model = SoftMaskALBEF(small(tok, itm_text_aug=itm_text_aug))
    with torch.no_grad():
        clean, _ = model.encode_text(batch["input_ids"], batch["attention_mask"])
        masked, _ = model.encode_text(batch["mlm_input_ids"], batch["attention_mask"])
    assert not torch.allclose(clean, masked)
    calls = _spy_fusion_pairs(model, monkeypatch)
    fusion_texts, real_fusion = [], model.fusion_encoder.forward

    def fusion_spy(text_embeds, *a, **kw):
        fusion_texts.append(text_embeds.detach().clone())
        return real_fusion(text_embeds, *a, **kw)

    monkeypatch.setattr(model.fusion_encoder, "forward", fusion_spy)
    torch.manual_seed(1)
    out = model(batch["image"], batch["input_ids"], batch["attention_mask"], mlm_input_ids=batch["mlm_input_ids"],
                mlm_labels=batch["mlm_labels"], word_candidates=batch["word_candidates"], alpha=0.0)
    (t_pos, _), (t_neg, _), (t_sm, _) = calls
    expect = masked if itm_text_aug else clean
    assert torch.allclose(t_pos, expect, atol=1e-5) and torch.allclose(t_neg[:B], expect, atol=1e-5)
    # the MLM pass: an extra fusion pass over the masked caption only when ITM reads the clean one
    assert len(fusion_texts) == len(calls) + (0 if itm_text_aug else 1)
    if not itm_text_aug:
        assert torch.allclose(fusion_texts[-1], masked, atol=1e-5)
    assert torch.isfinite(out["loss_mlm"]) and float(out["loss_mlm"].detach()) > 0


def test_itm_probe_values_and_hard_negatives(tok, monkeypatch):
    """The probe's four means are the ITM match probabilities of the pairs it names: with a constant head
    every mean is sigmoid(b); the hard negatives never share the positive's caption."""
    from softmask.eval import evaluate as ev

    torch.manual_seed(0)
    model = SoftMaskALBEF(small(tok)).eval()
    rig_itm_head(model, -1.3)
    ds = build_dataset("shapes", "test", 64, train=False, size=10, seed=0)
    b = Collator(tok, 32)([ds[i] for i in range(10)])
    with torch.no_grad():
        ie, ifeat = model.encode_image(b["image"])
        _, tfeat = model.encode_text(b["input_ids"], b["attention_mask"])
    sims = ifeat @ tfeat.t()
    res = ev.itm_probe(model, tok, ie, b["input_ids"], b["attention_mask"], sims, b["captions"])
    p = 1 / (1 + math.exp(1.3))
    for k in ("itm_pos", "itm_neg", "itm_pos_masked", "itm_neg_masked"):
        assert res[k] == pytest.approx(p, rel=1e-5), k
    assert res["itm_probe_pairs"] == {"positives": 10, "hard_negatives": 20}
    # captions true of an image are no negatives of it: the hardest negative text of image 0 is skipped
    # when it holds, and no image keeps a negative when every caption holds
    holds = torch.zeros(10, 10, dtype=torch.bool)
    first = sims[0].clone()
    first[0] = float("-inf")
    holds[0, int(first.argmax())] = True
    seen = []
    real = ev._itm_match_prob

    def spy(m, e, i, mm, pi, pt, **kw):
        seen.append((pi.clone(), pt.clone()))
        return real(m, e, i, mm, pi, pt, **kw)

    monkeypatch.setattr(ev, "_itm_match_prob", spy)
    ev.itm_probe(model, tok, ie, b["input_ids"], b["attention_mask"], sims, b["captions"], holds=holds)
    res_all = ev.itm_probe(model, tok, ie, b["input_ids"], b["attention_mask"], sims, b["captions"],
                           holds=torch.ones(10, 10, dtype=torch.bool))
    pi, pt = seen[1]  # the negatives of the first call
    assert int(pt[(pi == 0).nonzero()[0]]) != int(first.argmax())
    assert res_all["itm_probe_pairs"] == {"positives": 10, "hard_negatives": 0}


def test_itm_probe_separates_what_the_head_separates(tok, monkeypatch):
    """A head that says 'match' exactly for the true pairs gives probe positives ~1 and negatives ~0."""
    from softmask.eval import evaluate as ev

    torch.manual_seed(0)
    model = SoftMaskALBEF(small(tok)).eval()
    ds = build_dataset("shapes", "test", 64, train=False, size=8, seed=0)
    b = Collator(tok, 32)([ds[i] for i in range(8)])
    with torch.no_grad():
        ie, ifeat = model.encode_image(b["image"])
        _, tfeat = model.encode_text(b["input_ids"], b["attention_mask"])
    # identify each image by its [CLS] token and each text by its ids: the fake ITM head matches them
    img_key = {tuple(ie[i, 0, :4].tolist()): i for i in range(8)}
    txt_key = {tuple(b["input_ids"][i].tolist()): i for i in range(8)}
    encoded = []  # (text embeds, their text ids) per encode_text call
    images_of = _spy_image_kv(model, monkeypatch)

    def which_text(row):
        for te, ti in encoded:
            hit = (te == row).flatten(1).all(1).nonzero()
            if len(hit):
                return ti[int(hit[0])]
        return -2

    def fake_itm(text_embeds, attention_mask, image_embeds=None, capture_layer=None, *, image_kv=None,
                 image_index=None):
        image_embeds = images_of(image_embeds, image_kv, image_index)
        n = text_embeds.shape[0]
        ti = [which_text(text_embeds[j]) for j in range(n)]
        ii = [img_key.get(tuple(image_embeds[j, 0, :4].tolist()), -1) for j in range(n)]
        logit = torch.tensor([10.0 if (a == c and a >= 0) else -10.0 for a, c in zip(ii, ti)])
        return torch.stack([torch.zeros(n), logit], 1), None, None

    real_encode = model.encode_text

    def spy_encode(ids, mask):
        L = ids.shape[1]
        out = real_encode(ids, mask)
        encoded.append((out[0], [txt_key.get(tuple(F.pad(r, (0, b["input_ids"].shape[1] - L)).tolist()), -2)
                                 for r in ids]))
        return out

    monkeypatch.setattr(model, "encode_text", spy_encode)
    monkeypatch.setattr(model, "itm_logits", fake_itm)
    sims = ifeat @ tfeat.t()
    pos = ev._itm_match_prob(model, ie, b["input_ids"], b["attention_mask"], torch.arange(8), torch.arange(8))
    neg = ev._itm_match_prob(model, ie, b["input_ids"], b["attention_mask"], torch.arange(8), (torch.arange(8) + 1) % 8)
    assert bool((pos > 0.99).all()) and bool((neg < 0.01).all())
    del sims


def test_registers_are_dropped_from_the_image_tokens(tok):
    torch.manual_seed(0)
    model = SoftMaskALBEF(small(tok, vision_registers=3)).eval()
    img = torch.randn(2, 3, 64, 64)
    full = model.visual_encoder.forward_features(img)  # (2, 1 + 3 + 64, D)
    assert full.shape[1] == 1 + 3 + 64
    embeds, feat = model.encode_image(img)
    assert embeds.shape == (2, 65, model.cfg.vision_width)
    assert torch.equal(embeds[:, 0], full[:, 0]) and torch.equal(embeds[:, 1:], full[:, 4:])
    assert torch.allclose(feat, F.normalize(model.vision_proj(full[:, 0]), dim=-1))


def test_conv_stem_shapes_and_errors(tok):
    vit = build_vision_encoder(small(tok, vision_stem="conv"))
    convs = [m for m in vit.patch_embed.proj if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 3 and all(c.stride == (2, 2) for c in convs)  # 8 = 2^3
    R = vit.num_prefix_tokens - 1  # the tiny preset's registers
    assert vit.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 1 + R + 64, 128)
    # "cnn": one more 3x3 stride-1 conv at the token resolution; a token's receptive field is then 31 px (the
    # conv stem's token r sees pixels 8r - 7 .. 8r + 7; the extra conv adds one token on each side)
    vit = build_vision_encoder(small(tok, vision_stem="cnn")).eval()
    convs = [m for m in vit.patch_embed.proj if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2)] * 3 + [(1, 1)] and convs[-1].kernel_size == (3, 3)
    x = torch.zeros(1, 3, 64, 64, requires_grad=True)
    tokens = vit.patch_embed(x)  # (1, 64, D)
    (g,) = torch.autograd.grad(tokens[0, 3 * 8 + 3].sum(), x)
    rows = g.abs().sum((0, 1, 3)).nonzero().flatten()
    assert (int(rows.min()), int(rows.max())) == (24 - 15, 24 + 15)  # 31 rows
    with pytest.raises(ValueError, match="power of 2"):
        build_vision_encoder(model_preset("tiny", vocab_size=len(tok), image_size=60, patch_size=6,
                                          vision_stem="conv"))
    with pytest.raises(ValueError, match="vision_stem"):
        model_preset("tiny", vision_stem="resnet")
    with pytest.raises(ValueError, match="vision_registers"):
        model_preset("tiny", vision_registers=-1)
    with pytest.raises(ValueError, match="momentum"):
        model_preset("tiny", momentum=1.5)


def test_pointing_game_is_logged_during_training(tmp_path):
    from softmask.eval.plots import plot_loss_curves
    from softmask.train.loop import TrainConfig, train

    out = str(tmp_path / "run")
    torch.set_num_threads(1)
    train(TrainConfig(steps=4, out=out, batch_size=4, train_size=16, log_every=3, save_every=4, progress=False,
                      run_eval=False, warmup_steps=1, queue_size=8, pointing_every=2, pointing_size=4))
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    pointing = [r["step"] for r in rows if "pointing_game" in r]
    assert pointing == [0, 2, 4]  # before the first step, then every 2 steps
    assert [r["step"] for r in rows if "loss" in r] == [2, 3, 4]  # step 2 logged for the pointing game
    for r in rows:
        if "pointing_game" in r:
            assert 0.0 <= r["pointing_game"] <= 100.0 and 0.0 <= r["pointing_game_color"] <= 100.0
    png = plot_loss_curves(os.path.join(out, "metrics.jsonl"), str(tmp_path / "curves.png"))
    assert os.path.getsize(png) > 0
    with pytest.raises(ValueError, match="pointing_every"):
        TrainConfig(pointing_every=-1)


def test_pointing_subset_matches_full_evaluation(tok):
    """The training-time pointing game is the evaluation's pointing game on the same items."""
    from softmask.eval.evaluate import evaluate, pointing_subset

    torch.manual_seed(0)
    model = SoftMaskALBEF(small(tok))
    ds = build_dataset("shapes", "test", 64, train=False, size=6, seed=0)
    a = pointing_subset(model, tok, ds)
    full = evaluate(model, tok, ds, k=2, probe=False)
    assert a["pointing_game"] == full["pointing_game"] and a["pointing_game_color"] == full["pointing_game_color"]
    assert model.training  # mode restored


def test_plot_soft_masks(tmp_path):
    from softmask.eval.plots import plot_soft_masks

    imgs = torch.rand(2, 3, 16, 16)
    masks = torch.rand(2, 4, 4)
    png = plot_soft_masks(imgs, ["a red circle", "a blue square"], ["red", "square"], masks, str(tmp_path / "m.png"))
    assert os.path.getsize(png) > 0
    with pytest.raises(ValueError, match="masks"):
        plot_soft_masks(imgs, ["a", "b"], ["a", "b"], torch.rand(3, 4, 4), str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="captions, words"):
        plot_soft_masks(imgs, ["a"], ["a", "b"], masks, str(tmp_path / "x.png"))


def test_ablation_table_mean_and_std(tmp_path):
    from research import ablation

    rows = []
    for seed, tr in ((0, 10.0), (1, 20.0), (2, 30.0)):
        rows.append({"config": "full", "seed": seed, **{k: tr for k in ablation.METRICS}})
    rows.append({"config": "albef", "seed": 0, **{k: 5.0 for k in ablation.METRICS}})
    with open(tmp_path / "ablation.json", "w") as f:
        json.dump(rows, f)
    table = ablation.render(str(tmp_path))
    full = next(line for line in table.splitlines() if line.startswith("| full"))
    assert "| 3 |" in full and "20.0 ± 10.0" in full  # mean 20, sample std 10
    assert "| albef | 1 | 5.0 |" in table
    assert (tmp_path / "README.md").exists() and (tmp_path / "ablation.png").exists()


def test_ablation_paired_differences(tmp_path):
    """The paired table compares full with each configuration seed by seed, over the seeds both have only."""
    from research import ablation

    rows = [{"config": "full", "seed": s, "tr_r1": v, "itm_neg": 0.1} for s, v in ((0, 10.0), (1, 20.0), (2, 30.0))]
    rows += [{"config": "albef", "seed": 0, "tr_r1": 5.0, "itm_neg": 0.3},
             {"config": "albef", "seed": 1, "tr_r1": 25.0, "itm_neg": 0.2},
             {"config": "albef", "seed": 7, "tr_r1": 99.0, "itm_neg": 0.0},     # no full row of seed 7: left out
             {"config": "no_aug", "seed": 2, "tr_r1": 28.0}]
    by = {}
    for r in rows:
        by.setdefault(r["config"], []).append(r)
    table = ablation._paired(by, ["full", "no_aug", "albef"], ["tr_r1", "itm_neg"])
    lines = table.splitlines()
    assert lines[0] == "| | tr_r1 | itm_neg |"
    assert lines[2] == "| full - no_aug | +2.0 (1 seed) |  |"
    assert lines[3] == "| full - albef | +0.0 (-5.0 to +5.0; 1/2) | -0.15 (-0.20 to -0.10; 0/2) |"
    assert ablation._paired({"albef": rows[3:5]}, ["albef"], ["tr_r1"]) == ""   # nothing to pair with
    with open(tmp_path / "ablation.json", "w") as f:
        json.dump([{**r, **{k: r.get(k, 1.0) for k in ablation.METRICS}} for r in rows], f)
    assert "| full - albef |" in ablation.render(str(tmp_path))


def test_model_passes_the_queue_without_a_copy(tok, batch, monkeypatch):
    """ITC gets the key banks as (momentum features, queue buffer itself): no per-step clone or cat."""
    import softmask as sm

    seen = {}
    real = sm.focal_itc_loss

    def spy(*args, **kw):
        seen.update(kw)
        return real(*args, **kw)

    monkeypatch.setattr(sm, "focal_itc_loss", spy)
    torch.manual_seed(0)
    model = SoftMaskALBEF(small(tok))
    torch.manual_seed(1)
    model(batch["image"], batch["input_ids"], batch["attention_mask"], mlm_input_ids=batch["mlm_input_ids"],
          mlm_labels=batch["mlm_labels"], word_candidates=batch["word_candidates"], alpha=0.4)
    assert isinstance(seen["text_keys"], tuple) and seen["text_keys"][1] is model.text_queue
    assert isinstance(seen["image_keys"], tuple) and seen["image_keys"][1] is model.image_queue
    assert seen["text_keys"][0] is seen["text_feat_m"] and seen["image_keys"][0] is seen["image_feat_m"]


def test_vision_pool_max_reads_the_patch_tokens_not_cls():
    from softmask.model import SoftMaskALBEF, model_preset

    torch.manual_seed(0)
    cfg = model_preset("tiny", vision_depth=1, queue_size=8, vision_pool="max")
    model = SoftMaskALBEF(cfg).eval()
    embeds = torch.randn(3, 1 + 64, cfg.vision_width)
    got = model._image_feature(embeds, model.vision_proj)
    want = torch.nn.functional.normalize(model.vision_proj(embeds[:, 1:].amax(1)), dim=-1)
    torch.testing.assert_close(got, want)
    changed = embeds.clone()
    changed[:, 0] += 5.0  # [CLS] does not enter the max-pooled feature
    torch.testing.assert_close(model._image_feature(changed, model.vision_proj), got)
    cls = SoftMaskALBEF(cfg.replace(vision_pool="cls")).eval()
    cls.load_state_dict(model.state_dict())
    assert not torch.allclose(cls._image_feature(changed, cls.vision_proj), cls._image_feature(embeds, cls.vision_proj))
    with pytest.raises(ValueError, match="vision_pool: expected 'cls' or 'max', got 'mean'"):
        model_preset("tiny", vision_pool="mean")


def _forward(model, batch):
    torch.manual_seed(0)
    return model(batch["image"], batch["input_ids"], batch["attention_mask"], mlm_input_ids=batch["mlm_input_ids"],
                 mlm_labels=batch["mlm_labels"], word_candidates=batch["word_candidates"], alpha=0.4)


def test_caption_bag_of_words_loss(tok, batch):
    torch.manual_seed(0)
    off = SoftMaskALBEF(small(tok))
    assert off.bow_head is None and not any(k.startswith("bow_head") for k in off.state_dict())
    torch.manual_seed(0)
    on = SoftMaskALBEF(small(tok, weight_bow=0.5))
    # the head is created last: every other weight starts as without it
    for k, v in off.state_dict().items():
        assert torch.equal(v, on.state_dict()[k]), k
    assert float(_forward(off, batch)["loss_bow"]) == 0.0
    with torch.no_grad():  # rig the head: uniform logits, so the loss is log(vocab) whatever the target
        on.bow_head.weight.zero_()
        on.bow_head.bias.zero_()
    out = _forward(on, batch)
    torch.testing.assert_close(out["loss_bow"], torch.tensor(math.log(len(tok))))
    # a head that puts all mass on the caption's words (never [CLS] / [SEP] / [PAD]) drives the loss to its floor:
    # the entropy of the caption's word distribution
    ids, am = batch["input_ids"], batch["attention_mask"]
    special = {tok.cls_token_id, tok.sep_token_id, tok.pad_token_id}
    with torch.no_grad():
        on.bow_head.bias.fill_(-30.0)
        words = {int(t) for row, m in zip(ids, am) for t, keep in zip(row, m) if keep and int(t) not in special}
        on.bow_head.bias[list(words)] = 0.0
    low = _forward(on, batch)["loss_bow"]
    assert low.item() < math.log(len(words)) + 1e-3
    with torch.no_grad():
        on.bow_head.weight.normal_(std=0.02)
    _forward(on, batch)["loss_bow"].backward()  # the bag of words trains the ViT through the max
    grad = on.visual_encoder.patch_embed.proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    with pytest.raises(ValueError, match="weight_bow: expected a float >= 0, got -1"):
        model_preset("tiny", weight_bow=-1.0)


def test_caption_bag_of_words_binary_loss(tok, batch):
    """``bow_loss="binary"``: one logistic loss per vocabulary word (does the caption name it),
    summed over the vocabulary and averaged over the batch."""
    torch.manual_seed(0)
    on = SoftMaskALBEF(small(tok, weight_bow=1.0, bow_loss="binary"))
    with torch.no_grad():  # zero logits: log 2 per vocabulary entry, whatever the target
        on.bow_head.weight.zero_()
        on.bow_head.bias.zero_()
    torch.testing.assert_close(_forward(on, batch)["loss_bow"], torch.tensor(len(tok) * math.log(2.0)))
    # logits +30 on the words of every caption of the batch, -30 elsewhere: the loss counts, per caption, the
    # words that other captions name and it does not (30 nats each)
    ids, am = batch["input_ids"], batch["attention_mask"]
    special = {tok.cls_token_id, tok.sep_token_id, tok.pad_token_id}
    per_row = [{int(t) for t, keep in zip(row, m) if keep and int(t) not in special} for row, m in zip(ids, am)]
    union = set().union(*per_row)
    with torch.no_grad():
        on.bow_head.bias.fill_(-30.0)
        on.bow_head.bias[list(union)] = 30.0
    expected = sum(len(union - r) for r in per_row) * 30.0 / len(per_row)
    torch.testing.assert_close(_forward(on, batch)["loss_bow"], torch.tensor(expected), rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="bow_loss: expected 'softmax' or 'binary', got 'bag'"):
        model_preset("tiny", bow_loss="bag")


def test_softmask_pairs_flag_and_setting():
    """``--softmask-pairs`` reaches the model config; a bad value is refused with the setting's name."""
    from softmask.train.__main__ import config_from_argv
    from softmask.train.loop import TrainConfig

    cfg, sources = config_from_argv(["--softmask-pairs", "one"])
    assert cfg.softmask_pairs == "one" and sources["softmask_pairs"] == ("flag", "--softmask-pairs")
    tok = get_tokenizer(None)
    assert cfg.model_config(tok).softmask_pairs == "one"
    assert TrainConfig().model_config(tok).softmask_pairs == model_preset("tiny").softmask_pairs
    with pytest.raises(SystemExit) as e:
        config_from_argv(["--softmask-pairs", "two"])
    assert e.value.code == 2
    with pytest.raises(ValueError, match="softmask_pairs: expected 'all' or 'one', got 'two'"):
        model_preset("tiny", softmask_pairs="two")


def test_itm_text_aug_flags():
    """``--itm-text-aug`` / ``--no-itm-text-aug`` set the field (unset: None, the recipe decides), each named as the
    flag that was given."""
    from softmask.train.__main__ import config_from_argv

    cfg, sources = config_from_argv([])
    assert cfg.itm_text_aug is None and "itm_text_aug" not in sources
    cfg, sources = config_from_argv(["--no-itm-text-aug"])
    assert cfg.itm_text_aug is False and sources["itm_text_aug"] == ("flag", "--no-itm-text-aug")
    cfg, sources = config_from_argv(["--itm-text-aug"])
    assert cfg.itm_text_aug is True and sources["itm_text_aug"] == ("flag", "--itm-text-aug")
    assert cfg.model_config(get_tokenizer(None)).itm_text_aug is True


def test_softmask_words_flag_and_setting():
    """``--softmask-words`` reaches the model config (default "all"); a bad value is refused with its name."""
    from softmask.train.__main__ import config_from_argv
    from softmask.train.loop import TrainConfig

    cfg, sources = config_from_argv(["--softmask-words", "content"])
    assert cfg.softmask_words == "content" and sources["softmask_words"] == ("flag", "--softmask-words")
    tok = get_tokenizer(None)
    assert cfg.model_config(tok).softmask_words == "content"
    assert TrainConfig().model_config(tok).softmask_words == "all" == model_preset("tiny").softmask_words
    with pytest.raises(SystemExit) as e:
        config_from_argv(["--softmask-words", "nouns"])
    assert e.value.code == 2
    with pytest.raises(ValueError, match="softmask_words: expected 'all' or 'content', got 'nouns'"):
        model_preset("tiny", softmask_words="nouns")


def test_softmask_words_reach_training_and_the_probe(tmp_path, monkeypatch):
    """The training loop and the evaluation's soft masks (probe, pictures) draw the word from the model's
    ``softmask_words`` candidates."""
    import softmask.data
    from softmask.train.loop import TrainConfig, train

    seen = []
    real = softmask.data.candidate_word_mask

    def spy(input_ids, attention_mask, tokenizer, words="all"):
        seen.append(words)
        return real(input_ids, attention_mask, tokenizer, words=words)

    monkeypatch.setattr(softmask.data, "candidate_word_mask", spy)
    torch.set_num_threads(1)
    train(TrainConfig(steps=2, out=str(tmp_path / "run"), batch_size=4, train_size=16, test_size=8, log_every=1,
                      save_every=2, progress=False, warmup_steps=1, queue_size=8, pointing_every=0,
                      softmask_words="content"))
    assert seen.count("content") >= 3  # two training steps and the probe
    assert "all" not in seen[:2]


def test_fusion_text_input_embeddings(tok, batch):
    """``fusion_text_input="embeddings"``: the fusion encoder reads the BERT embedding output (its words do not
    depend on the text layers), ITC still reads the text encoder's [CLS]; the flag reaches the model config and a
    bad value is refused with the setting's name."""
    from softmask.train.__main__ import config_from_argv

    torch.manual_seed(0)
    enc = SoftMaskALBEF(small(tok)).eval()
    emb = SoftMaskALBEF(small(tok, fusion_text_input="embeddings")).eval()
    emb.load_state_dict(enc.state_dict())
    ids, am = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        fe, feat_e = emb.encode_text(ids, am)
        fa, feat_a = enc.encode_text(ids, am)
        torch.testing.assert_close(fe, emb.text_encoder.embeddings(input_ids=ids))
        torch.testing.assert_close(fa, enc.text_encoder(ids, am))
        torch.testing.assert_close(feat_e, feat_a)  # the same ITC feature
        assert not torch.allclose(fe, fa)
        # changing the text layers moves the ITC feature, not what the fusion encoder reads
        for p in emb.text_encoder.layer.parameters():
            p.add_(0.1)
        fe2, feat_e2 = emb.encode_text(ids, am)
        torch.testing.assert_close(fe2, fe)
        assert not torch.allclose(feat_e2, feat_e)
    out = _forward(SoftMaskALBEF(small(tok, fusion_text_input="embeddings")).train(), batch)
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()

    cfg, sources = config_from_argv(["--fusion-text-input", "embeddings"])
    assert cfg.model_config(tok).fusion_text_input == "embeddings"
    assert sources["fusion_text_input"] == ("flag", "--fusion-text-input")
    with pytest.raises(ValueError, match="fusion_text_input: expected 'encoder', 'embeddings' or 'shared', got 'cls'"):
        model_preset("tiny", fusion_text_input="cls")


def test_fusion_text_input_shared_reuses_the_text_layers(tok, batch):
    """``"shared"`` (BLIP): fusion layer i runs text layer i's self-attention and feed-forward (the same
    parameters, counted once by the optimizer and trained by ITC, ITM and MLM alike) with its own cross-attention,
    on the embeddings; more fusion than text layers is refused."""
    torch.manual_seed(0)
    model = SoftMaskALBEF(small(tok, fusion_text_input="shared")).train()
    for fl, tl in zip(model.fusion_encoder.layer, model.text_encoder.layer):
        assert fl.attention is tl.attention and fl.intermediate is tl.intermediate and fl.output is tl.output
        assert fl.crossattention is not None
    ids = {id(p) for p in model.parameters()}
    base = SoftMaskALBEF(small(tok)).train()
    shared = sum(p.numel() for l in base.fusion_encoder.layer for m in (l.attention, l.intermediate, l.output)
                 for p in m.parameters())
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in base.parameters()) - shared
    assert len(ids) == len(list(model.parameters()))
    # the momentum text encoder is a copy, not the shared layers
    assert model.text_encoder_m.layer[0].attention is not model.text_encoder.layer[0].attention
    with torch.no_grad():
        fe, _ = model.encode_text(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(fe, model.text_encoder.embeddings(input_ids=batch["input_ids"]))
    out = _forward(model, batch)
    out["loss_itm"].backward()  # ITM alone reaches the shared self-attention through the fusion pass
    assert model.text_encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    torch.manual_seed(0)
    apart = SoftMaskALBEF(small(tok, fusion_text_input="embeddings")).train()
    _forward(apart, batch)["loss_itm"].backward()  # ... and not the text layers of a separate fusion stack
    assert apart.text_encoder.layer[0].attention.self.query.weight.grad is None
    sd = model.state_dict()  # each shared tensor once, under its text-encoder name (safetensors needs that)
    assert "text_encoder.layer.0.attention.self.query.weight" in sd
    assert not any(k.startswith("fusion_encoder.layer.0.attention.") or k.startswith("fusion_encoder.layer.1.output.")
                   for k in sd)
    assert "fusion_encoder.layer.0.crossattention.self.query.weight" in sd
    from safetensors.torch import load as st_load, save as st_save
    sd = st_load(st_save({k: v.contiguous() for k, v in sd.items()}))
    again = SoftMaskALBEF(small(tok, fusion_text_input="shared"))
    again.load_state_dict(sd)  # strict: the aliases are filled in
    assert again.fusion_encoder.layer[1].attention is again.text_encoder.layer[1].attention
    torch.testing.assert_close(again.fusion_encoder.layer[1].attention.self.query.weight,
                               model.text_encoder.layer[1].attention.self.query.weight)
    with pytest.raises(ValueError, match="expected fusion_layers <= text_layers, got 3 > 2"):
        model_preset("tiny", fusion_text_input="shared", fusion_layers=3)


def test_fusion_text_input_refuses_an_albef_checkpoint(tmp_path):
    from softmask.train.loop import ConfigError, TrainConfig

    f = tmp_path / "ALBEF.pth"
    f.write_bytes(b"not read")
    with pytest.raises(ConfigError, match="fusion_text_input = shared: an ALBEF checkpoint .* expected 'encoder'"):
        TrainConfig(init_checkpoint=str(f), fusion_text_input="shared")
    assert TrainConfig(init_checkpoint=str(f), fusion_text_input="encoder").fusion_text_input == "encoder"


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(os.path.join(os.path.dirname(__file__), "..", "configs"))
                                        if f.endswith(".json")))
def test_shipped_configs_parse(name):
    """Every file in configs/ is a valid --config: known settings, valid values, a model config that builds."""
    from softmask.train.__main__ import config_from_argv

    path = os.path.join(os.path.dirname(__file__), "..", "configs", name)
    cfg, sources = config_from_argv(["--config", path])
    with open(path) as f:
        given = {k for k in json.load(f) if not k.startswith("_")}
    assert given and all(sources[k][0] == "file" for k in given)
    if cfg.preset == "tiny":
        cfg.model_config(get_tokenizer(None))


def test_ablation_suites_train_what_they_name():
    """The recipe suite ablates the default job (the shapes recipe); the from-scratch suite reproduces the earlier
    default's rows (random-init ViT, global attention); the full method of each is its suite's default job."""
    from research import ablation
    from softmask.train.loop import TrainConfig

    assert set(ablation.RECIPE_CONFIGS) == {"full", "no_softmask", "no_focal", "no_aug", "albef"}
    assert ablation.RECIPE_CONFIGS["full"] == {}
    for name, over in ablation.RECIPE_CONFIGS.items():
        r = TrainConfig(**over).resolved()
        assert (r.vit_checkpoint, r.text_attn_radius, r.vision_lr_scale) == ("shapes-objects", 1, 0.1), name
        assert (r.steps, r.itm_text_aug, r.mask_floor) == (1200, False, 0.75), name
        assert (r.vision_frozen_blocks, r.batch_size) == (3, 33), name
    # the full-compute default (until 2026-12-07) and the partial-caption seed run on it: every block, batches of 48
    pinned = ("vision_frozen_blocks", "batch_size")
    for suite, base in (("recipe_1200", ablation.RECIPE_CONFIGS), ("partial_1200", ablation.PARTIAL_CONFIGS)):
        assert set(ablation.SUITES[suite]) == set(base)
        for name, over in ablation.SUITES[suite].items():
            r = TrainConfig(**over).resolved()
            assert (r.vision_frozen_blocks, r.batch_size, r.steps, r.mask_floor) == (0, 48, 1200, 0.75), (suite, name)
            assert {k: v for k, v in over.items() if k not in pinned} == base[name], (suite, name)
    # the recipe's first version: the same configurations at 800 steps, ITM on the masked caption, floor 0.5
    assert set(ablation.RECIPE_800_CONFIGS) == set(ablation.RECIPE_CONFIGS)
    for name, over in ablation.RECIPE_800_CONFIGS.items():
        r = TrainConfig(**over).resolved()
        assert (r.vit_checkpoint, r.steps, r.itm_text_aug, r.mask_floor) == ("shapes-objects", 800, True, 0.5), name
        assert (r.vision_frozen_blocks, r.batch_size) == (0, 48), name
        assert {k: v for k, v in over.items() if k not in ("steps", "itm_text_aug", "mask_floor") + pinned} == \
            ablation.RECIPE_CONFIGS[name]
    for name, over in ablation.FROM_SCRATCH_CONFIGS.items():
        r = TrainConfig(**over).resolved()
        assert (r.vit_checkpoint, r.text_attn_radius, r.vision_lr_scale, r.steps) == ("none", None, 1.0, 800), name
    # the parts removed: exactly one per configuration, all three in the baseline
    parts = {"no_softmask": {"softmask"}, "no_focal": {"gamma"}, "no_aug": {"text_aug", "image_aug"},
             "albef": {"softmask", "gamma", "text_aug", "image_aug"}}
    for name, keys in parts.items():
        assert set(ablation.RECIPE_CONFIGS[name]) == keys
    with pytest.raises(SystemExit):  # a configuration of another suite is refused, not run under the wrong one
        ablation.main(["--suite", "recipe", "--configs", "full_one_pair", "--render"])


def test_ablation_import_run_checks_the_settings(tmp_path, capsys):
    """--import-run adds a row only for a run whose saved settings are the suite config's for that seed."""
    from research import ablation
    from softmask.train.loop import TrainConfig

    ev = {k: 50.0 for k in ablation.METRICS}
    ev.update({k: 0.5 for k in ablation.PROBE}, grounding_acc=90.0, occlusion={"itm_clean": 0.9})

    def fake_run(name, **over):
        d = tmp_path / name
        d.mkdir()
        train = TrainConfig(seed=4, out=str(d), **over).resolved().to_dict()
        (d / "config.json").write_text(json.dumps({"train": train}))
        (d / "eval.json").write_text(json.dumps(ev))
        return str(d)

    results = str(tmp_path / "rows")
    good, bad = fake_run("good"), fake_run("bad", batch_size=48)
    argv = ["--suite", "recipe", "--results", results, "--import-run", "full", "4"]
    assert ablation.main(argv + [bad]) == 2
    assert "batch_size: 48 in the run, 33 in the suite" in capsys.readouterr().err
    assert ablation.main(argv + [good]) == 0
    with open(os.path.join(results, "ablation.json")) as f:
        rows = json.load(f)
    assert len(rows) == 1 and rows[0]["seed"] == 4 and rows[0]["imported_from"] == good
    assert rows[0]["grounding_acc"] == 90.0 and rows[0]["occ_itm_clean"] == 0.9
    with pytest.raises(SystemExit):  # the same (config, seed) twice is refused
        ablation.main(argv + [good])
