"""One pretraining step (forward of every objective, backward, AdamW step): fused vs reference.

Providers: ``fused`` (default op backends, SDPA attention) and ``reference``
(``backend="reference"`` ops, eager attention), as ``--impl`` selects them in
``softmask-pretrain``. Shapes: ``tiny`` on CPU (batch 32), ``base`` on CUDA
(batch 32, bf16 autocast, skipped without CUDA). A third measurement per shape,
``mode="softmask_branch"``, times the step with the soft-mask branch switched
off (``softmask=False``) so that the branch's share of a step can be read off
as ``1 - t(no softmask) / t(step)``.

Run: ``python -m pytest benchmarks/bench_train_step.py``.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from benchmarks.common import record, synced
from softmask.data import candidate_word_mask, get_tokenizer, mask_tokens
from softmask.model import SoftMaskALBEF, model_preset

CASES = [
    pytest.param("tiny", "cpu", 32, id="tiny-cpu"),
    pytest.param("base", "cuda", 32, id="base-cuda",
                 marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]),
]


def _batch(tok, preset_cfg, B, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    S, L = preset_cfg.image_size, 16
    image = torch.randn(B, 3, S, S, generator=g)
    # captions of random non-special words, lengths 6..L
    ids = torch.randint(5, len(tok), (B, L), generator=g)
    lengths = torch.randint(6, L + 1, (B,), generator=g)
    mask = (torch.arange(L)[None, :] < lengths[:, None]).long()
    ids[:, 0] = tok.cls_token_id
    ids[torch.arange(B), lengths - 1] = tok.sep_token_id
    ids = ids.masked_fill(mask == 0, tok.pad_token_id)
    mids, labels = mask_tokens(ids, tok, generator=g)
    cand = candidate_word_mask(mids, mask, tok)
    return [t.to(device) for t in (image, ids, mask, mids, labels, cand)]


def _step_fn(preset, device, B, impl, softmask=True):
    tok = get_tokenizer(None)
    ref = impl == "reference"
    cfg = model_preset(preset, vocab_size=len(tok), attn_impl="eager" if ref else "auto",
                       op_backend="reference" if ref else "auto", softmask=softmask, hidden_dropout=0.0,
                       attn_dropout=0.0, vision_drop_path=0.0)
    torch.manual_seed(0)
    model = SoftMaskALBEF(cfg).to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    image, ids, mask, mids, labels, cand = _batch(tok, cfg, B, device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def step():
        with amp:
            out = model(image, ids, mask, mlm_input_ids=mids, mlm_labels=labels, word_candidates=cand, alpha=0.4)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        return out["loss"].detach()

    return synced(step, device), cfg


@pytest.mark.parametrize("provider", ["fused", "reference"])
@pytest.mark.parametrize("preset,dev,B", CASES)
def test_train_step(benchmark, preset, dev, B, provider):
    device = torch.device(dev)
    fn, cfg = _step_fn(preset, device, B, provider)
    record(benchmark, fn, op="train_step", provider=provider, mode="full", shape=f"{preset}-B{B}",
           dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, device=device,
           sizes=dict(preset=preset, batch=B, image_size=cfg.image_size, queue=cfg.queue_size),
           rounds=5 if device.type == "cpu" else 20, warmup_rounds=1 if device.type == "cpu" else 3)


@pytest.mark.parametrize("preset,dev,B", CASES)
def test_train_step_without_softmask(benchmark, preset, dev, B):
    """The fused step with the soft-mask branch off: its time against ``test_train_step[fused]``
    gives the branch's share of a step."""
    device = torch.device(dev)
    fn, cfg = _step_fn(preset, device, B, "fused", softmask=False)
    record(benchmark, fn, op="train_step", provider="fused", mode="softmask_branch_off", shape=f"{preset}-B{B}",
           dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, device=device,
           sizes=dict(preset=preset, batch=B, image_size=cfg.image_size, queue=cfg.queue_size),
           rounds=5 if device.type == "cpu" else 20, warmup_rounds=1 if device.type == "cpu" else 3)
