"""ALBEF's released checkpoints: key names and shapes at the ``base`` preset, built here with random
or tagged values (nothing is downloaded), loaded into the model, every tensor checked in place."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from softmask.model import SoftMaskALBEF, model_preset
from softmask.model.albef_checkpoint import load_albef_checkpoint, read_checkpoint_file

TEXT_LAYERS = 6  # ALBEF: BERT-base, cross-attention from layer 6 on
BERT_LAYERS = 12
QUEUE, DIM = 65536, 256


def _empty_model(**over):
    with torch.device("meta"):
        m = SoftMaskALBEF(model_preset("base", **over))
    return m.to_empty(device="cpu")


def _albef_name(own_key: str, retrieval: bool) -> str:
    """ALBEF's name for this model's key, written from ALBEF's layout (model_pretrain.py / model_retrieval.py)."""
    bert = "" if retrieval else "bert."
    m = re.match(r"^(text_encoder(?:_m)?)\.embeddings\.(.*)$", own_key)
    if m:
        return f"{m.group(1)}.{bert}embeddings.{m.group(2)}"
    m = re.match(r"^(text_encoder(?:_m)?)\.layer\.(\d+)\.(.*)$", own_key)
    if m:
        return f"{m.group(1)}.{bert}encoder.layer.{m.group(2)}.{m.group(3)}"
    m = re.match(r"^fusion_encoder\.layer\.(\d+)\.(.*)$", own_key)
    if m:
        return f"text_encoder.{bert}encoder.layer.{int(m.group(1)) + TEXT_LAYERS}.{m.group(2)}"
    if own_key == "mlm_head.decoder.bias":
        return "text_encoder.cls.predictions.bias"
    if own_key.startswith("mlm_head."):
        return "text_encoder.cls.predictions." + own_key[len("mlm_head."):]
    return own_key


def _albef_state(model, *, retrieval: bool, image_res: int = 256):
    """A state dict in ALBEF's layout: every tensor a distinct constant (``tag``), ALBEF's shapes."""
    state, tags = {}, {}
    for i, (k, v) in enumerate(model.state_dict().items()):
        if retrieval and k.startswith("mlm_head."):
            continue  # ALBEF's retrieval model has no MLM head
        name = _albef_name(k, retrieval)
        shape = tuple(v.shape)
        if k in ("image_queue", "text_queue"):
            shape = (DIM, QUEUE)
        elif k == "queue_ptr":
            shape = (1,)
        elif k.endswith("pos_embed"):
            shape = (1, 1 + (image_res // 16) ** 2, 768)
        tag = float(i + 1)
        state[name] = torch.tensor(tag).expand(shape)
        tags[k] = (name, tag)
    bert = "" if retrieval else "bert."
    # ALBEF keys with no counterpart here: the momentum BERT's fusion layers (and MLM head), position ids
    for layer in range(TEXT_LAYERS, BERT_LAYERS):
        state[f"text_encoder_m.{bert}encoder.layer.{layer}.crossattention.self.query.weight"] = torch.zeros(768, 768)
        state[f"text_encoder_m.{bert}encoder.layer.{layer}.output.dense.weight"] = torch.zeros(768, 3072)
    state[f"text_encoder.{bert}embeddings.position_ids"] = torch.arange(512)[None]
    if not retrieval:
        state["text_encoder_m.cls.predictions.bias"] = torch.zeros(30522)
        state["text_encoder.cls.predictions.decoder.bias"] = state["text_encoder.cls.predictions.bias"]
    else:
        state["idx_queue"] = torch.full((1, QUEUE), -100)
    return state, tags


@pytest.fixture(scope="module")
def base_model():
    return _empty_model()


def test_albef_pretraining_checkpoint_every_tensor_in_place(base_model, tmp_path):
    model = base_model
    state, tags = _albef_state(model, retrieval=False)
    # the real file format: a dict with "model" (plus config entries), read with weights_only=True; the
    # tagged tensors are stride-0 views, so the file stays small
    path = tmp_path / "ALBEF_4M.pth"
    torch.save({"model": state, "config": {"queue_size": QUEUE}, "epoch": 29}, path)
    for p in model.parameters():
        p.data.fill_(-1.0)
    report = load_albef_checkpoint(model, str(path))
    own = model.state_dict()
    for k, (name, tag) in tags.items():
        v = own[k]
        if k in ("image_queue", "text_queue", "queue_ptr"):
            assert torch.all(v == tag), k
            continue
        assert torch.all(v == tag), f"{k} did not receive {name}"
    assert report["missing"] == []
    assert report["unexpected"] == []
    assert report["pos_embed"] == "kept"
    assert report["queues"] == "loaded"
    assert report["momentum_from_online"] is False
    # the momentum BERT's fusion layers and MLM head are listed as ignored, not silently dropped
    assert any(".layer.11." in k and k.startswith("text_encoder_m.") for k in report["ignored"])
    assert "text_encoder_m.cls.predictions.bias" in report["ignored"]


def test_albef_queue_layout_is_transposed(base_model):
    model = base_model
    state, _ = _albef_state(model, retrieval=False)
    q = torch.randn(DIM, QUEUE)
    state["image_queue"], state["text_queue"], state["queue_ptr"] = q, -q, torch.tensor([1234])
    load_albef_checkpoint(model, state)
    assert torch.equal(model.image_queue, q.t())
    assert torch.equal(model.text_queue, -q.t())
    assert int(model.queue_ptr) == 1234


def test_albef_retrieval_checkpoint_needs_mlm_head_allowed_and_resamples_pos_embed(base_model):
    model = base_model
    state, tags = _albef_state(model, retrieval=True, image_res=384)
    pe = torch.randn(1, 1 + 24 * 24, 768)
    state["visual_encoder.pos_embed"] = pe
    with pytest.raises(ValueError, match=r"mlm_head\..*unloaded|unloaded.*mlm_head"):
        load_albef_checkpoint(model, state)
    report = load_albef_checkpoint(model, state, allow_missing=("mlm_head.",))
    assert report["missing"] and all(k.startswith("mlm_head.") for k in report["missing"])
    assert report["pos_embed"] == "resampled 576 -> 256 patches"
    # ALBEF's interpolate_pos_embed: bicubic on the patch grid, align_corners=False, [CLS] kept
    grid = pe[:, 1:].reshape(1, 24, 24, 768).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 256, 768)
    got = model.visual_encoder.pos_embed.detach()
    assert torch.equal(got[:, :1], pe[:, :1])
    torch.testing.assert_close(got[:, 1:], want, rtol=1e-5, atol=1e-5)
    # the retrieval layout (no "bert." prefix) lands in the same places
    own = model.state_dict()
    for k in ("text_encoder.layer.5.output.dense.weight", "fusion_encoder.layer.0.crossattention.self.key.bias",
              "text_encoder_m.embeddings.word_embeddings.weight", "itm_head.weight", "temp"):
        assert torch.all(own[k] == tags[k][1]), k


def test_partial_load_reports_what_stays_at_init(base_model):
    state, _ = _albef_state(base_model, retrieval=False)
    del state["itm_head.weight"], state["text_encoder.bert.encoder.layer.9.crossattention.self.value.bias"]
    with pytest.raises(ValueError, match="itm_head.weight"):
        load_albef_checkpoint(base_model, state)
    report = load_albef_checkpoint(base_model, state, partial=True)
    assert set(report["missing"]) == {"itm_head.weight", "fusion_encoder.layer.3.crossattention.self.value.bias"}


def test_checkpoint_without_momentum_copies_takes_them_from_online(base_model):
    state, tags = _albef_state(base_model, retrieval=False)
    state = {k: v for k, v in state.items() if "_m." not in k}
    report = load_albef_checkpoint(base_model, state)
    assert report["momentum_from_online"] is True
    assert torch.equal(base_model.visual_encoder_m.blocks[3].attn.qkv.weight, base_model.visual_encoder.blocks[3].attn.qkv.weight)


def test_wrong_preset_is_one_clear_error():
    with torch.device("meta"):
        tiny = SoftMaskALBEF(model_preset("tiny"))
    tiny = tiny.to_empty(device="cpu")
    state, _ = _albef_state(_empty_model(), retrieval=False)
    with pytest.raises(ValueError, match=r"shape .* expects .*preset"):
        load_albef_checkpoint(tiny, state)


def test_not_an_albef_state_dict(base_model):
    with pytest.raises(ValueError, match="no ALBEF text encoder keys"):
        load_albef_checkpoint(base_model, {"visual_encoder.cls_token": torch.zeros(1, 1, 768)})
    with pytest.raises(TypeError, match="source"):
        load_albef_checkpoint(base_model, 3)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_tampered_checkpoint_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "ALBEF.pth"
    torch.save({"model": {"temp": torch.tensor(0.07)}, "extra": _RunsCode(str(marker))}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        read_checkpoint_file(str(path))
    assert not marker.exists()


def test_truncated_checkpoint_is_one_clear_error(tmp_path):
    path = tmp_path / "mscoco.pth"
    torch.save({"model": {"temp": torch.tensor(0.07), "w": torch.randn(256, 256)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="mscoco.pth"):
        read_checkpoint_file(str(path))
    with pytest.raises(FileNotFoundError, match="not a file"):
        read_checkpoint_file(str(tmp_path / "missing.pth"))
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="safetensors"):
        read_checkpoint_file(str(bad))
