"""The ALBEF-style model: forward/backward, Grad-CAM plumbing, fused vs reference parity,
configuration checks, momentum/queues and local pretrained weights."""

import os

import pytest
import torch

from softmask.data import Collator, build_dataset, candidate_word_mask, get_tokenizer, mask_tokens
from softmask.model import ModelConfig, SoftMaskALBEF, model_preset
from softmask.model.layers import attention
from softmask.model.pretrained import load_pretrained

B = 6


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer(None)


@pytest.fixture(scope="module")
def batch(tok):
    ds = build_dataset("shapes", "train", 64, train=True, size=B, seed=3)
    b = Collator(tok, 24)([ds[i] for i in range(B)])
    L = int(b["attention_mask"].sum(1).max())
    ids, am = b["input_ids"][:, :L], b["attention_mask"][:, :L]
    mids, labels = mask_tokens(ids, tok, generator=torch.Generator().manual_seed(0))
    labels[0, 1] = ids[0, 1]  # at least one MLM target
    cand = candidate_word_mask(mids, am, tok)
    return dict(image=b["image"], input_ids=ids, attention_mask=am, mlm_input_ids=mids, mlm_labels=labels,
                word_candidates=cand)


def small(tok, **kw):
    return model_preset("tiny", vocab_size=len(tok), vision_depth=2, queue_size=32, **kw)


def run(model, batch, alpha=0.4, seed=0):
    torch.manual_seed(seed)
    return model(batch["image"], batch["input_ids"], batch["attention_mask"], mlm_input_ids=batch["mlm_input_ids"],
                 mlm_labels=batch["mlm_labels"], word_candidates=batch["word_candidates"], alpha=alpha)


TERMS = ("loss_itc", "loss_itm", "loss_softmask", "loss_mlm")


@pytest.mark.parametrize("text_aug", [True, False])
def test_forward_backward_all_losses_and_grads(tok, batch, text_aug):
    torch.manual_seed(0)
    model = SoftMaskALBEF(small(tok, text_aug=text_aug))
    out = run(model, batch)
    for k in TERMS + ("loss",):
        assert out[k].dim() == 0 and torch.isfinite(out[k]), (k, out[k])
        assert float(out[k].detach()) > 0, k
    assert float(out["mask_mean"]) < 0.99  # the soft mask dims something
    out["loss"].backward()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in trained if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing[:10]
    for name in ("visual_encoder.patch_embed.proj.weight", "text_encoder.embeddings.word_embeddings.weight",
                 "fusion_encoder.layer.0.crossattention.self.key.weight", "itm_head.weight",
                 "mlm_head.decoder.weight", "temp"):
        assert dict(trained)[name].grad.abs().sum() > 0, name
    assert all(p.grad is None and not p.requires_grad for p in model.momentum_parameters())


def test_gradcam_pass_leaves_parameter_grads_alone(tok, batch):
    torch.manual_seed(0)
    model = SoftMaskALBEF(small(tok))
    ie, _ = model.encode_image(batch["image"])
    te, _ = model.encode_text(batch["input_ids"], batch["attention_mask"])
    logits, _, q, k, v, g = model.word_gradcam_inputs(te, batch["attention_mask"], ie)
    H, dh = model.cfg.num_heads, model.cfg.hidden_size // model.cfg.num_heads
    T, N = batch["input_ids"].shape[1], 1 + model.cfg.grid ** 2
    assert q.shape == (B, H, T, dh) and k.shape == v.shape == (B, H, N, dh) and g.shape == (B, H, T, dh)
    assert g.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_grad_context_gives_the_materialized_attention_gradient(tok, batch):
    """dA = grad_context . value equals the gradient of the logits w.r.t. the materialized
    attention probabilities of the Grad-CAM layer (eager path, retain_grad)."""
    torch.manual_seed(0)
    model = SoftMaskALBEF(small(tok, attn_impl="eager")).eval()
    ie, _ = model.encode_image(batch["image"])
    te, _ = model.encode_text(batch["input_ids"], batch["attention_mask"])
    _, _, q, k, v, g = model.word_gradcam_inputs(te, batch["attention_mask"], ie, retain_graph=False)
    dA = torch.einsum("bhtd,bhnd->bhtn", g, v)

    captured = {}
    layer = model.fusion_encoder.layer[model.cfg.gradcam_layer].crossattention
    import softmask.model.layers as L

    real = L.attention

    def spy(q_, k_, v_, mask=None, *, dropout_p=0.0, impl="auto"):
        if q_.shape[-2] == te.shape[1] and k_.shape[-2] == ie.shape[1] and "p" not in captured:
            probs = torch.softmax(q_ @ k_.transpose(-1, -2) * q_.shape[-1] ** -0.5, -1)
            probs.retain_grad()
            captured["p"] = probs
            return probs @ v_
        return real(q_, k_, v_, mask, dropout_p=dropout_p, impl=impl)

    L.attention = spy
    try:
        logits, _, _ = model.itm_logits(te, batch["attention_mask"], ie)
    finally:
        L.attention = real
    logits[:, 1].sum().backward()
    assert layer is model.fusion_encoder.layer[0].crossattention  # the spy caught layer 0's cross-attention
    torch.testing.assert_close(dA, captured["p"].grad, rtol=1e-4, atol=1e-6)


def test_fused_and_reference_agree(tok, batch):
    torch.manual_seed(0)
    fused = SoftMaskALBEF(small(tok))
    ref = SoftMaskALBEF(small(tok, attn_impl="eager", op_backend="reference"))
    ref.load_state_dict(fused.state_dict())
    of, orf = run(fused, batch), run(ref, batch)
    for k in TERMS:
        torch.testing.assert_close(of[k], orf[k], rtol=1e-4, atol=1e-6, msg=k)
    of["loss"].backward()
    orf["loss"].backward()
    pr = dict(ref.named_parameters())
    grads = [(n, p.grad, pr[n].grad) for n, p in fused.named_parameters() if p.grad is not None]
    assert len(grads) == sum(p.requires_grad for p in fused.parameters())
    # key biases get a mathematically zero gradient (softmax is shift invariant): judge every
    # tensor relative to its own scale, floored at 1e-4 of the largest gradient entry
    floor = 1e-4 * max(float(r.abs().max()) for _, _, r in grads)
    errs = {n: float((g - r).abs().max()) / max(float(r.abs().max()), floor) for n, g, r in grads}
    worst = max(errs, key=errs.get)
    assert errs[worst] < 1e-3, (worst, errs[worst])


def test_shared_image_kv_matches_indexed_images(tok):
    """The fusion encoder with the images' keys / values projected once and indexed per pair gives the
    outputs and the gradients (images, texts, parameters) of passing ``images[index]``; the Grad-CAM capture
    hands out the per-pair keys."""
    torch.manual_seed(0)
    model = SoftMaskALBEF(small(tok, fusion_layers=3, gradcam_layer=1)).double()
    fusion = model.fusion_encoder
    M, P, L, N = 3, 7, 5, 9
    images = torch.randn(M, N, model.cfg.vision_width, dtype=torch.float64, requires_grad=True)
    texts = torch.randn(P, L, model.cfg.hidden_size, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(P, L, dtype=torch.long)
    mask[2, 3:] = 0
    index = torch.tensor([2, 0, 0, 1, 2, 2, 1])

    def grads(out, cap):
        loss = out.square().sum() + cap.context.sum() + cap.key.square().sum()
        return torch.autograd.grad(loss, [images, texts] + list(fusion.parameters()))

    out_ref, cap_ref = fusion(texts, mask, images[index], capture_layer=1)
    g_ref = grads(out_ref, cap_ref)
    out, cap = fusion(texts, mask, image_kv=fusion.image_kv(images), image_index=index, capture_layer=1)
    g = grads(out, cap)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(cap, cap_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # without an index the pairs take the images in order
    out_id, _ = fusion(texts[:M], mask[:M], image_kv=fusion.image_kv(images))
    torch.testing.assert_close(out_id, fusion(texts[:M], mask[:M], images)[0], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="exactly one of image_embeds and image_kv"):
        fusion(texts, mask, images[index], image_kv=fusion.image_kv(images))
    with pytest.raises(ValueError, match="image_index needs image_kv"):
        fusion(texts, mask, images[index], image_index=index)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_attention_matches_softmax_formula(impl):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g), torch.randn(2, 3, 7, 8, generator=g),
               torch.randn(2, 3, 7, 8, generator=g))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    s = (q @ k.transpose(-1, -2)) / 8 ** 0.5
    s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    want = torch.softmax(s, -1) @ v
    torch.testing.assert_close(attention(q, k, v, mask, impl=impl), want, rtol=1e-5, atol=1e-6)


def test_config_errors():
    with pytest.raises(ValueError, match="last fusion layer"):
        model_preset("tiny", gradcam_layer=1)
    with pytest.raises(ValueError, match="gradcam_layer"):
        model_preset("tiny", gradcam_layer=5)
    with pytest.raises(ValueError, match="preset"):
        model_preset("huge")
    with pytest.raises(ValueError, match="attn_impl"):
        ModelConfig(attn_impl="flash")
    model_preset("tiny", gradcam_layer=1, softmask=False)  # no Grad-CAM, no constraint
    base = model_preset("base")
    assert (base.image_size, base.patch_size, base.vision_width, base.text_layers, base.fusion_layers,
            base.embed_dim, base.queue_size, base.gradcam_layer) == (256, 16, 768, 6, 6, 256, 65536, 2)


def test_softmask_off_and_gamma_zero(tok, batch, monkeypatch):
    """softmask=False: the soft-mask op is never called, loss_softmask is 0 and the loss is the
    weighted sum of the other terms. gamma=0: loss_itc and its gradients (features and
    temperature) equal ALBEF's ITC, cross-entropy against the momentum-distillation targets,
    written out here on the features and key banks the model passed to the loss."""
    import softmask as sm

    seen = {}
    real = sm.focal_itc_loss

    def spy(image_feat, text_feat, temp, **kw):
        seen.update(image_feat=image_feat, text_feat=text_feat, temp=temp, **kw)
        for name in ("text_keys", "image_keys"):  # the model passes (feat_m, queue): record the bank as it is now,
            bank = kw[name]  # before the enqueue after the loss rewrites the queue in place
            seen[name] = torch.cat(list(bank)) if isinstance(bank, (tuple, list)) else bank.clone()
        return real(image_feat, text_feat, temp, **kw)

    def no_soft_mask(*args, **kw):
        raise AssertionError("text_driven_soft_mask called with softmask=False")

    monkeypatch.setattr(sm, "focal_itc_loss", spy)
    monkeypatch.setattr(sm, "text_driven_soft_mask", no_soft_mask)
    torch.manual_seed(0)
    model = SoftMaskALBEF(small(tok, softmask=False, gamma=0.0))
    cfg = model.cfg
    out = run(model, batch, alpha=0.4)
    assert float(out["loss_softmask"]) == 0.0 and float(out["mask_mean"]) == 1.0
    torch.testing.assert_close(out["loss"], cfg.weight_itc * out["loss_itc"] + cfg.weight_itm * out["loss_itm"]
                               + cfg.weight_mlm * out["loss_mlm"], rtol=1e-6, atol=0)

    assert seen["gamma"] == 0.0 and seen["alpha"] == 0.4 and seen["temp"] is model.temp
    temp = model.temp

    def albef_ce(q, keys, q_m):  # ALBEF's loss_i2t / loss_t2i
        logits = q @ keys.t() / temp  # (B, B + Q)
        with torch.no_grad():
            onehot = torch.zeros_like(logits)
            onehot[torch.arange(q.shape[0]), torch.arange(q.shape[0])] = 1.0
            targets = 0.4 * torch.softmax(q_m @ keys.t() / temp, dim=1) + 0.6 * onehot
        return -(torch.log_softmax(logits, dim=1) * targets).sum(1).mean()

    i, t = seen["image_feat"], seen["text_feat"]
    albef = 0.5 * (albef_ce(i, seen["text_keys"], seen["image_feat_m"]) + albef_ce(t, seen["image_keys"], seen["text_feat_m"]))
    torch.testing.assert_close(out["loss_itc"], albef, rtol=1e-5, atol=0)
    got = torch.autograd.grad(out["loss_itc"], (i, t, temp), retain_graph=True)
    want = torch.autograd.grad(albef, (i, t, temp), retain_graph=True)
    for name, g, w in zip(("d image_feat", "d text_feat", "d temp"), got, want):
        assert float(w.abs().max()) > 0, name
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6 * float(w.abs().max()), msg=name)

    out["loss"].backward()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    bad = [n for n, p in trained if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not bad, bad[:10]
    # the temperature enters only the ITC loss (the hard-negative sampling uses it detached)
    torch.testing.assert_close(temp.grad, cfg.weight_itc * want[2], rtol=1e-4, atol=0)


def test_momentum_and_queue(tok, batch):
    torch.manual_seed(0)
    model = SoftMaskALBEF(small(tok))
    Q = model.cfg.queue_size
    for p in model.parameters():
        if p.requires_grad:
            p.data.add_(1.0)
    before = next(model.visual_encoder_m.parameters()).clone()
    online = next(model.visual_encoder.parameters())
    model.momentum_update()
    after = next(model.visual_encoder_m.parameters())
    torch.testing.assert_close(after, 0.995 * before + 0.005 * online.detach())
    feats = torch.nn.functional.normalize(torch.randn(20, model.cfg.embed_dim), dim=1)
    model.queue_ptr.fill_(Q - 5)
    model.enqueue(feats, feats)
    assert int(model.queue_ptr) == 15
    torch.testing.assert_close(model.image_queue[Q - 5 :], feats[:5])
    torch.testing.assert_close(model.text_queue[:15], feats[5:])


def test_load_local_pretrained(tok, tmp_path):
    from timm.models.vision_transformer import VisionTransformer
    from transformers import BertConfig, BertForMaskedLM
    from safetensors.torch import save_file

    cfg = small(tok)
    bcfg = BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=4,
                      num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
                      max_position_embeddings=cfg.max_position_embeddings)
    torch.manual_seed(5)
    bert = BertForMaskedLM(bcfg)
    bert.save_pretrained(tmp_path / "bert")
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=cfg.vision_width, depth=cfg.vision_depth,
                            num_heads=cfg.vision_heads, num_classes=10)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    model = SoftMaskALBEF(cfg)
    reg_pos = model.visual_encoder.pos_embed[:, 1 : 1 + cfg.vision_registers].detach().clone()
    rep = load_pretrained(model, vit_checkpoint=str(tmp_path / "vit.safetensors"), bert_dir=str(tmp_path / "bert"))
    assert rep["bert_loaded"] > 0 and rep["vit_loaded"] > 0
    sd = bert.state_dict()
    torch.testing.assert_close(model.fusion_encoder.layer[0].attention.self.query.weight,
                               sd["bert.encoder.layer.2.attention.self.query.weight"])
    torch.testing.assert_close(model.text_encoder.layer[1].output.dense.weight,
                               sd["bert.encoder.layer.1.output.dense.weight"])
    torch.testing.assert_close(model.visual_encoder.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
    torch.testing.assert_close(model.visual_encoder_m.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
    R = cfg.vision_registers  # the checkpoint has no register tokens: they keep their init
    pe = model.visual_encoder.pos_embed
    assert pe.shape[1] == 1 + R + cfg.grid ** 2  # patches resampled from a 4x4 grid
    torch.testing.assert_close(pe[:, 0], vit.pos_embed[:, 0])
    torch.testing.assert_close(pe[:, 1 : 1 + R], reg_pos, rtol=0, atol=0)
    assert rep["vit_not_in_checkpoint"] == (["reg_token"] if R else [])
    with pytest.raises(FileNotFoundError, match="local"):
        load_pretrained(model, vit_checkpoint=str(tmp_path / "missing.pth"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pretrained(model, bert_dir=str(tmp_path / "empty"))


def test_text_attn_radius_mask_and_locality():
    """``text_attn_radius=r``: [CLS] sees every real token, every other token only the tokens within r positions
    ([CLS] excluded); padding rows keep [CLS] (no empty softmax); eager and SDPA agree on the per-query mask; a
    word's text-encoder state does not depend on words farther than ``layers * r`` positions away."""
    from softmask.model import SoftMaskALBEF, model_preset
    from softmask.model.layers import attention, text_self_attention_mask

    am = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0, 0]])
    m = text_self_attention_mask(am, 1)
    assert m.shape == (2, 7, 7) and m.dtype == torch.bool
    assert m[0, 0].tolist() == [True] * 6 + [False]
    assert m[0, 3].tolist() == [False, False, True, True, True, False, False]
    assert m[0, 1].tolist() == [False, True, True, False, False, False, False]
    assert m[1, 5].tolist() == [True] + [False] * 6  # a padding row with no key in reach keeps [CLS]
    assert m.any(-1).all()
    torch.testing.assert_close(text_self_attention_mask(am, None), am.bool())
    q, k, v = (torch.randn(2, 4, 7, 8) for _ in range(3))
    torch.testing.assert_close(attention(q, k, v, m, impl="eager"), attention(q, k, v, m, impl="sdpa"),
                               atol=1e-5, rtol=1e-5)

    torch.manual_seed(0)
    cfg = model_preset("tiny", vocab_size=64, vision_depth=1, queue_size=8, text_attn_radius=1)
    model = SoftMaskALBEF(cfg).eval()
    ids = torch.randint(5, 64, (1, 12))
    ids[0, 0] = 2
    mask = torch.ones_like(ids)
    far = ids.clone()
    far[0, 9:] = torch.randint(5, 64, (3,))  # more than 2 layers * radius 1 = 2 positions from position 5
    with torch.no_grad():
        h1, h2 = model.text_encoder(ids, mask), model.text_encoder(far, mask)
    torch.testing.assert_close(h1[0, 1:7], h2[0, 1:7])
    assert not torch.allclose(h1[0, 0], h2[0, 0])  # [CLS] sees everything
    glob = SoftMaskALBEF(cfg.replace(text_attn_radius=None)).eval()
    glob.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(glob.text_encoder(ids, mask)[0, 5], glob.text_encoder(far, mask)[0, 5])
    with pytest.raises(ValueError, match="text_attn_radius: expected None or an int >= 0, got -1"):
        model_preset("tiny", text_attn_radius=-1)


@pytest.mark.parametrize("radius", [None, 1])
def test_frozen_vit_blocks_match_the_unfrozen_model_and_train_nothing_frozen(tok, batch, radius):
    """vision_frozen_blocks k: the same losses as k = 0 on the same weights (the momentum ViT starts equal to the
    online one, so going on from the online's frozen part changes nothing), the same gradients for every part
    that still trains, none for the frozen part, and a momentum update that leaves the frozen copies equal. With
    local attention [CLS] and the registers still train (their rows through the frozen blocks apart)."""
    torch.manual_seed(0)
    ref = SoftMaskALBEF(small(tok, vision_attn_radius=radius))
    frozen = SoftMaskALBEF(small(tok, vision_attn_radius=radius, vision_frozen_blocks=1))
    frozen.load_state_dict(ref.state_dict())
    out_ref, out = run(ref, batch), run(frozen, batch)
    for k in TERMS:
        torch.testing.assert_close(out[k], out_ref[k], rtol=1e-5, atol=1e-6)
    out_ref["loss"].backward()
    out["loss"].backward()
    vit = frozen.visual_encoder
    fz = {id(p) for p in frozen._frozen_vit_parameters()}
    tokens = [t for t in (("pos_embed",) if radius is not None else ("cls_token", "reg_token", "pos_embed"))
              if getattr(vit, t, None) is not None]
    assert vit.cls_token.requires_grad == (radius is not None)
    assert len(fz) == len(tokens) + len(list(vit.patch_embed.parameters())) + len(list(vit.blocks[0].parameters()))
    ref_params = dict(ref.named_parameters())
    for n, p in frozen.named_parameters():
        if id(p) in fz:
            assert not p.requires_grad and p.grad is None, n
        elif p.requires_grad:
            assert p.grad is not None, n
            torch.testing.assert_close(p.grad, ref_params[n].grad, rtol=1e-4, atol=1e-6, msg=n)
    assert frozen.visual_encoder.blocks[1].attn.qkv.weight.requires_grad
    assert not frozen.visual_encoder.blocks[0].attn.qkv.weight.requires_grad
    with torch.no_grad():
        for p in frozen.parameters():
            if p.requires_grad:
                p.add_(1.0)
    frozen.momentum_update()
    for (n, p), pm in zip(frozen.visual_encoder.named_parameters(), frozen.visual_encoder_m.parameters()):
        if id(p) in fz:
            assert torch.equal(p, pm), n
        else:
            assert not torch.equal(p, pm), n
    with pytest.raises(ValueError, match=r"vision_frozen_blocks: expected an int in \[0, vision_depth = 2\], got 3"):
        small(tok, vision_frozen_blocks=3)


def test_split_local_block_equals_the_timm_block():
    """The frozen blocks' split computation (patch rows alone, then the prefix rows reading the patches' keys and
    values) gives the rows of the timm block's own forward, with local attention."""
    from softmask.model.albef import _patch_block, _prefix_block, build_vision_encoder

    torch.manual_seed(0)
    vit = build_vision_encoder(model_preset("tiny", vision_attn_radius=1)).eval()
    n = vit.num_prefix_tokens
    x = torch.randn(3, n + vit.patch_embed.num_patches, vit.embed_dim)
    for blk in vit.blocks:
        full = blk(x)
        k, v, patches = _patch_block(blk, x[:, n:], n)
        prefix = _prefix_block(blk, x[:, :n], k, v)
        torch.testing.assert_close(patches, full[:, n:], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(prefix, full[:, :n], rtol=1e-5, atol=1e-5)
        x = full
