"""Positive ids in the model (retrieval fine-tuning): the id queue, ITC with ids, ITM hard negatives
that never share an id, and old checkpoints without an id queue."""

import pytest
import torch

from softmask.model import SoftMaskALBEF
from tests.test_model import B, TERMS, batch, run, small, tok  # noqa: F401 (fixtures)


def run_ids(model, batch, ids, alpha=0.4, seed=0):
    torch.manual_seed(seed)
    return model(batch["image"], batch["input_ids"], batch["attention_mask"], mlm_input_ids=batch["mlm_input_ids"],
                 mlm_labels=batch["mlm_labels"], word_candidates=batch["word_candidates"], alpha=alpha, ids=ids)


def _pair(tok):
    torch.manual_seed(0)
    a = SoftMaskALBEF(small(tok, op_backend="torch"))
    b = SoftMaskALBEF(small(tok, op_backend="torch"))
    b.load_state_dict(a.state_dict())
    return a, b


def test_arange_ids_with_an_empty_id_queue_equal_no_ids(tok, batch):
    a, b = _pair(tok)
    out_a = run(a, batch)
    out_b = run_ids(b, batch, torch.arange(B))
    for k in TERMS:
        torch.testing.assert_close(out_a[k], out_b[k], rtol=0, atol=0, msg=k)
    out_a["loss"].backward()
    out_b["loss"].backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        if pa.grad is not None:
            torch.testing.assert_close(pa.grad, pb.grad, rtol=0, atol=0, msg=n)
    # the ids went into the id queue, beside the features; without ids the slots say -100 (unknown)
    assert b.idx_queue[:B].tolist() == list(range(B)) and (b.idx_queue[B:] == -100).all()
    assert (a.idx_queue == -100).all()


def test_ids_change_itc_and_reach_the_queue_positives(tok, batch, monkeypatch):
    import softmask

    a, b = _pair(tok)
    ids = torch.tensor([0, 0, 1, 2, 2, 2])
    out_a, out_b = run_ids(a, batch, torch.arange(B)), run_ids(b, batch, ids)
    assert not torch.allclose(out_a["loss_itc"], out_b["loss_itc"])  # shared ids are positives
    # second step: the loss sees the batch ids and the id queue as it was before this step's enqueue
    seen = []
    real = softmask.focal_itc_loss

    def spy(*args, **kw):
        seen.append((kw["ids"].clone(), kw["key_ids"][0].clone(), kw["key_ids"][1].clone()))
        return real(*args, **kw)

    monkeypatch.setattr(softmask, "focal_itc_loss", spy)
    out_b2 = run_ids(b, batch, ids + 10)
    assert torch.isfinite(out_b2["loss"])
    (row_ids, batch_key_ids, queue_ids), = seen
    assert row_ids.tolist() == batch_key_ids.tolist() == (ids + 10).tolist()
    assert queue_ids[:B].tolist() == ids.tolist() and (queue_ids[B:] == -100).all()
    assert b.idx_queue[B:2 * B].tolist() == (ids + 10).tolist()  # then enqueued behind the first batch


def test_hard_negatives_never_share_an_id(tok):
    torch.manual_seed(0)
    model = SoftMaskALBEF(small(tok))
    n = 12
    f = torch.nn.functional.normalize(torch.randn(4, n, model.cfg.embed_dim), dim=-1)
    input_ids = torch.arange(n)[:, None].repeat(1, 5)  # distinct captions
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4, 5])
    for seed in range(20):
        torch.manual_seed(seed)
        nt, ni = model.hard_negatives(f[0], f[1], f[2], f[3], input_ids, ids)
        assert (ids[nt] != ids).all() and (ids[ni] != ids).all()
    # every pair shares one id: no allowed negative, the documented fallback (any other pair), no NaN
    nt, ni = model.hard_negatives(f[0], f[1], f[2], f[3], input_ids, torch.zeros(n, dtype=torch.long))
    assert (nt != torch.arange(n)).all() and (ni != torch.arange(n)).all()


def test_every_item_sharing_one_id_trains_without_nan(tok, batch):
    torch.manual_seed(0)
    model = SoftMaskALBEF(small(tok))
    out = run_ids(model, batch, torch.zeros(B, dtype=torch.long))
    out["loss"].backward()
    assert all(torch.isfinite(out[k]) for k in TERMS)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bad_ids_and_batches(tok, batch):
    model = SoftMaskALBEF(small(tok))
    with pytest.raises(ValueError, match=r"ids: expected an int64 tensor of shape \(6,\), got torch.float32"):
        run_ids(model, batch, torch.zeros(B))
    with pytest.raises(ValueError, match=r"ids: expected .* got torch.int64 \(5,\)"):
        run_ids(model, batch, torch.arange(5))
    one = {k: v[:1] for k, v in batch.items()}
    with pytest.raises(ValueError, match="at least 2 pairs"):
        run(model, one)


def test_checkpoint_without_id_queue_loads_with_unknown_ids(tok):
    model = SoftMaskALBEF(small(tok))
    state = {k: v for k, v in model.state_dict().items() if k != "idx_queue"}
    model.idx_queue.fill_(7)
    model.load_state_dict(state)  # strict: the missing id queue is filled, not an error
    assert (model.idx_queue == -100).all()
