"""The pretraining loop and CLI: exact resume, fused vs reference per-step parity, the
non-finite-loss stop, a 2-process gloo run, and evaluation of a tiny run."""

import json
import os
import socket
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from softmask.train.__main__ import main
from softmask.runs.checkpoint import latest_checkpoint
from softmask.train.loop import LOSS_TERMS, NonFiniteLossError, TrainConfig, train

TINY = dict(batch_size=4, train_size=24, log_every=1, save_every=2, progress=False, run_eval=False, warmup_steps=2,
            queue_size=16)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """CPU kernels with 2+ intra-op threads are not bitwise reproducible run to run here (two
    identical uninterrupted runs differ by ~1e-7 relative): exactness is checked on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: [r[k] for k in ("loss",) + LOSS_TERMS] for r in rows}


@pytest.fixture(scope="module")
def run4(tmp_path_factory):
    """An uninterrupted 4-step run (checkpoints at steps 2 and 4)."""
    out = str(tmp_path_factory.mktemp("run4"))
    train(TrainConfig(steps=4, out=out, **TINY))
    return out


def test_outputs(run4):
    assert {"config.json", "metrics.jsonl", "checkpoints", "tokenizer"} <= set(os.listdir(run4))
    rows = [json.loads(line) for line in open(os.path.join(run4, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("step", "loss", "loss_itc", "loss_itm", "loss_softmask", "loss_mlm", "lr", "temperature",
                "samples_per_s"):
        assert all(key in r for r in rows), key
    assert all(torch.isfinite(torch.tensor(losses(run4)[s])).all() for s in range(1, 5))
    ckpts = sorted(os.listdir(os.path.join(run4, "checkpoints")))
    assert ckpts == ["latest", "step_000002", "step_000004"]
    assert latest_checkpoint(run4).endswith("step_000004")
    ck = os.path.join(run4, "checkpoints", "step_000002")
    assert {"model.safetensors", "train_state.pt", "config.json"} <= set(os.listdir(ck))
    weights = load_file(os.path.join(ck, "model.safetensors"))
    assert "image_queue" in weights and "visual_encoder_m.pos_embed" in weights
    state = torch.load(os.path.join(ck, "train_state.pt"), weights_only=False)
    assert state["step"] == 2 and {"optimizer", "scheduler", "rng", "cursor"} <= set(state)


def _interrupted_copy(run4, dst):
    """A run directory as if training had been killed right after the step-2 checkpoint."""
    os.makedirs(os.path.join(dst, "checkpoints"))
    shutil.copytree(os.path.join(run4, "checkpoints", "step_000002"), os.path.join(dst, "checkpoints", "step_000002"))
    with open(os.path.join(dst, "checkpoints", "latest"), "w") as f:
        f.write("step_000002\n")
    with open(os.path.join(run4, "metrics.jsonl")) as f, open(os.path.join(dst, "metrics.jsonl"), "w") as g:
        g.writelines(f.readlines()[:3])  # step 3 was logged, then the process died


def test_resume_is_exact(run4, tmp_path):
    out = str(tmp_path / "resumed")
    _interrupted_copy(run4, out)
    train(TrainConfig(steps=4, out=out, resume=True, **TINY))
    full, res = losses(run4), losses(out)
    assert sorted(res) == [1, 2, 3, 4]
    assert res[3] == full[3] and res[4] == full[4]  # bit-exact
    a = load_file(os.path.join(run4, "checkpoints", "step_000004", "model.safetensors"))
    b = load_file(os.path.join(out, "checkpoints", "step_000004", "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_more_steps_extends_the_run(run4, tmp_path, capsys):
    """--resume with a larger --steps goes on from the finished run's last checkpoint to the new end, the
    learning-rate schedule recomputed over the new total and the log saying so; steps 1-4 stay those of the run."""
    from softmask.train.loop import _lr_lambda

    out = str(tmp_path / "extended")
    shutil.copytree(run4, out)
    summary = train(TrainConfig(steps=7, out=out, resume=True, **TINY))
    err = capsys.readouterr().err
    assert summary["steps"] == 7
    assert "resumed from" in err and "step 4" in err
    assert "--resume with steps 7 (the run had steps 4): training goes on to step 7" in err, err
    assert "recomputed over 7 steps" in err
    rows = {r["step"]: r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl")))}
    assert sorted(rows) == list(range(1, 8))
    assert {s: losses(out)[s] for s in range(1, 5)} == losses(run4)
    cfg = TrainConfig(**TINY).resolved()
    lam = _lr_lambda(cfg.warmup_steps, 7, cfg.min_lr_ratio)
    for step in range(5, 8):  # the lr logged after step s is the one step s + 1 uses
        assert rows[step]["lr"] == pytest.approx(cfg.lr * lam(step), rel=1e-12), (step, rows[step]["lr"])
    assert rows[4]["lr"] != pytest.approx(cfg.lr * lam(4), rel=1e-6)  # the old schedule's, over 4 steps
    saved = json.load(open(os.path.join(out, "config.json")))
    assert saved["train"]["steps"] == 7 and saved["total_steps"] == 7


def test_resume_refuses_fewer_steps_and_other_settings(run4, tmp_path):
    out = str(tmp_path / "shorter")
    shutil.copytree(run4, out)
    with pytest.raises(ValueError, match=r"steps: 4 in the checkpoint, 3 now.*a larger --steps or --epochs alone "
                                         r"extends the run"):
        train(TrainConfig(steps=3, out=out, resume=True, **TINY))
    with pytest.raises(ValueError, match=r"lr: 0.0005 in the checkpoint, 0.001 now"):
        train(TrainConfig(steps=8, lr=1e-3, out=out, resume=True, **TINY))


def test_eval_says_once_that_it_falls_back(run4, tmp_path, capsys):
    """A run whose ``latest`` pointer is gone: softmask-eval uses the newest complete checkpoint and says so once."""
    from softmask.eval.__main__ import main as eval_main

    out = str(tmp_path / "nopointer")
    shutil.copytree(run4, out)
    os.remove(os.path.join(out, "checkpoints", "latest"))
    capsys.readouterr()
    assert eval_main(["--checkpoint", out, "--test-size", "8", "--k", "2", "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert err.count("using the newest complete checkpoint") == 1, err


def test_data_seed_sets_the_data_alone(tmp_path):
    """``data_seed`` gives the data (training items, batch order, distortions, held-out split) its own seed:
    (seed 1, data seed 0) trains on exactly the batches of seed 0, from seed 1's initial weights; the run's
    evaluation and pointing watch read data seed 0's held-out split."""
    from softmask.data import Collator, get_tokenizer
    from softmask.eval.evaluate import data_seed_of
    from softmask.train.data import batch_stream, prepare_data
    from softmask.train.loop import build_model

    crossed, plain, other = (TrainConfig(seed=1, data_seed=0, **TINY).resolved(), TrainConfig(seed=0, **TINY).resolved(),
                             TrainConfig(seed=0, data_seed=1, **TINY).resolved())
    tok = get_tokenizer(None)

    def first_batch(cfg):
        ds = prepare_data(cfg, 64, str(tmp_path), write=False).train
        stream = batch_stream(ds, Collator(tok, cfg.max_len), batch_size=cfg.batch_size, seed=cfg.data_rng_seed,
                              cursor=0, num_workers=0)
        try:
            return next(stream)[1]
        finally:
            stream.close()

    a, b, c = first_batch(crossed), first_batch(plain), first_batch(other)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["input_ids"], b["input_ids"])
    assert not torch.equal(a["image"], c["image"])
    wa = build_model(crossed, tok).state_dict()["itm_head.weight"]
    wb = build_model(plain, tok).state_dict()["itm_head.weight"]
    assert not torch.equal(wa, wb)  # the model's init follows seed
    assert [data_seed_of(c.to_dict()) for c in (crossed, plain, other)] == [0, 0, 1]
    with pytest.raises(ValueError, match="data_seed = -1: expected a non-negative integer"):
        TrainConfig(data_seed=-1)


def test_different_seed_differs(run4, tmp_path):
    out = str(tmp_path / "seed1")
    train(TrainConfig(steps=1, out=out, seed=1, **TINY))
    assert losses(out)[1] != losses(run4)[1]


def test_fused_and_reference_losses_agree(tmp_path):
    per = {}
    for impl in ("fused", "reference"):
        out = str(tmp_path / impl)
        train(TrainConfig(steps=3, out=out, impl=impl, **TINY))
        per[impl] = losses(out)
    cfg = json.load(open(tmp_path / "reference" / "config.json"))["model"]
    assert cfg["op_backend"] == "reference" and cfg["attn_impl"] == "eager"
    for step in (1, 2, 3):
        f, r = torch.tensor(per["fused"][step]), torch.tensor(per["reference"][step])
        assert torch.allclose(f, r, rtol=1e-4, atol=0), (step, f, r)


def test_non_finite_loss_stops_and_keeps_checkpoint(run4, tmp_path, capsys):
    out = str(tmp_path / "poisoned")
    _interrupted_copy(run4, out)
    path = os.path.join(out, "checkpoints", "step_000002", "model.safetensors")
    w = load_file(path)
    w["itm_head.weight"][0, 0] = float("nan")
    save_file(w, path)
    before = open(path, "rb").read()
    with pytest.raises(NonFiniteLossError, match=r"step 3: .*loss_itm = nan") as e:
        train(TrainConfig(steps=4, out=out, resume=True, **TINY))
    assert "step_000002" in str(e.value)
    assert latest_checkpoint(out).endswith("step_000002")
    assert open(path, "rb").read() == before
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["latest", "step_000002"]
    # the command line reports it and exits with status 1
    rc = main(["--steps", "4", "--out", out, "--resume", "--batch-size", "4", "--train-size", "24", "--no-eval",
               "--no-progress", "--queue-size", "16"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "non-finite loss at step 3" in err and "loss_itm" in err


def _recall_bounds(scores, gt, ks=(1, 5, 10), margin=1e-4):
    """Recall@k in percent of each row of ``scores [n, m]`` whose ground truth is the bool
    ``gt [n, m]`` (the best-scored ground truth counts; non-ground-truth ties count against
    it), as a (low, high) pair: scores within ``margin`` of the best ground truth count as
    ties for ``low`` and, unless exactly equal, as losers for ``high``, so float noise of the order of ``margin``
    between this computation and the evaluator cannot flip a rank."""
    lo, hi = {}, {}
    n = scores.shape[0]
    best = torch.where(gt, scores, torch.full_like(scores, float("-inf"))).amax(1, keepdim=True)
    rank_hi = ((scores >= best - margin) & ~gt).sum(1)  # pessimistic
    rank_lo = (((scores > best + margin) | (scores == best)) & ~gt).sum(1)  # optimistic; exact ties still count
    for k in ks:
        lo[k] = 100.0 * float((rank_hi < k).sum()) / n
        hi[k] = 100.0 * float((rank_lo < k).sum()) / n
    return lo, hi


def test_eval_of_tiny_run(run4, tmp_path):
    """softmask-eval on a 4-step run: every recall and the pointing game recomputed here from the
    model's encoders and heads (all n x n ITM pairs, ALBEF's top-k rerank, the reference Grad-CAM
    of every object word), and the plots written."""
    from softmask import reference as ref
    from softmask.data import Collator, build_dataset, word_positions
    from softmask.eval.__main__ import main as eval_main
    from softmask.eval.evaluate import load_model

    n, k = 12, 4
    dst = str(tmp_path / "ev")
    rc = eval_main(["--checkpoint", run4, "--test-size", str(n), "--k", str(k), "--out", dst])
    assert rc == 0
    res = json.load(open(os.path.join(dst, "eval.json")))
    assert res["num_images"] == n and res["rerank_k"] == k

    model, tok, run_cfg, _ = load_model(run4)
    ds = build_dataset("shapes", "test", model.cfg.image_size, train=False, seed=run_cfg["train"]["seed"], size=n)
    items = [ds[i] for i in range(n)]
    b = Collator(tok, 32)(items)
    ids, am = b["input_ids"], b["attention_mask"]
    with torch.no_grad():
        img_embeds, img_feat = model.encode_image(b["image"])
        txt_embeds, txt_feat = model.encode_text(ids, am)
        sims = (img_feat @ txt_feat.t()).double()  # (image, text)
        ii, tt = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        ii, tt = ii.reshape(-1), tt.reshape(-1)
        itm = model.itm_logits(txt_embeds[tt], am[tt], img_embeds[ii])[0][:, 1].double().view(n, n)
    captions = [it["caption"] for it in items]
    same = torch.tensor([[a == c for c in captions] for a in captions])  # text j is a ground truth of image i
    top_i2t = torch.zeros(n, n, dtype=torch.bool).scatter_(1, sims.topk(k, dim=1).indices, True)
    top_t2i = torch.zeros(n, n, dtype=torch.bool).scatter_(1, sims.t().topk(k, dim=1).indices, True)
    i2t = torch.where(top_i2t, itm, torch.full_like(itm, -100.0))  # ALBEF: only the top k are rescored
    t2i = torch.where(top_t2i, itm.t(), torch.full_like(itm, -100.0))
    checks = [("tr", i2t, same), ("ir", t2i, torch.eye(n, dtype=torch.bool)),
              ("itc_tr", sims, same), ("itc_ir", sims.t(), torch.eye(n, dtype=torch.bool))]
    for name, scores, gt in checks:
        lo, hi = _recall_bounds(scores, gt)
        for kk in (1, 5, 10):
            got = res[f"{name}_r{kk}"]
            assert lo[kk] <= got <= hi[kk], f"{name}_r{kk} = {got}, recomputed [{lo[kk]}, {hi[kk]}]"
        assert any(lo[kk] < 100.0 for kk in (1, 5, 10)) or name.startswith("itc"), name  # not a trivial 100 %

    S, g = model.cfg.image_size, model.cfg.grid
    for key, field in (("pointing_game", "word"), ("pointing_game_color", "color")):
        pi, pw, boxes = [], [], []
        for i, it in enumerate(items):
            pos = word_positions(ids[i], tok, [o[field] for o in it["objects"]])
            for o, p in zip(it["objects"], pos):
                if p >= 0:
                    pi.append(i)
                    pw.append(p)
                    boxes.append(o["box"])
        idx = torch.tensor(pi)
        _, _, q, kk_, v, gc = model.word_gradcam_inputs(txt_embeds[idx], am[idx], img_embeds[idx])
        cam = ref.word_gradcam_reference(q, kk_, v, gc, torch.tensor(pw))[:, 1:]  # (m, g * g), [CLS] dropped
        centres = (torch.arange(g, dtype=torch.float64) + 0.5) * S / g
        sure, maybe = 0, 0
        for c, (x0, y0, x1, y1) in zip(cam, boxes):
            near = (c >= c.max() - 1e-5 * c.abs().max()).nonzero().flatten()  # the peak, and anything tying it
            inside = [bool(x0 <= centres[p % g] <= x1 and y0 <= centres[p // g] <= y1) for p in near.tolist()]
            sure += all(inside)
            maybe += any(inside) and not all(inside)
        m = len(pi)
        assert res[f"{key}_n"] == m, (key, res[f"{key}_n"], m)
        assert 100.0 * sure / m <= res[key] <= 100.0 * (sure + maybe) / m, (key, res[key], sure, maybe, m)

    assert os.path.getsize(os.path.join(dst, "plots", "gradcam_overlays.png")) > 0
    assert os.path.getsize(os.path.join(dst, "plots", "loss_curves.png")) > 0
    assert eval_main(["--checkpoint", str(tmp_path / "nothing")]) == 2


def test_cli_help():
    r = subprocess.run([sys.executable, "-m", "softmask.train", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0
    for flag in ("--preset", "--data", "--image-root", "--tokenizer", "--steps", "--batch-size", "--lr", "--seed",
                 "--out", "--impl", "--device", "--gamma", "--alpha", "--no-softmask", "--log-every",
                 "--save-every", "--resume", "--no-eval"):
        assert flag in r.stdout, flag


@pytest.mark.slow
def test_two_process_gloo(tmp_path):
    out = str(tmp_path / "ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:  # a free port: a fixed one collides with any other run on the machine
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           "-m", "softmask.train", "--steps", "3", "--batch-size", "3", "--train-size", "24", "--queue-size", "64",
           "--out", out, "--no-eval", "--no-progress", "--log-every", "1", "--save-every", "3"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [x["step"] for x in rows] == [1, 2, 3]  # rank 0 logs only
    assert all(torch.isfinite(torch.tensor([x[k] for k in LOSS_TERMS])).all() for x in rows)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["world_size"] == 2
    w = load_file(os.path.join(latest_checkpoint(out), "model.safetensors"))
    assert int(w["queue_ptr"]) == 3 * 3 * 2  # the queue took the features of both ranks


def test_thread_guard_switches_to_the_faster_count():
    from softmask.train.loop import _ThreadGuard

    n0 = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = _ThreadGuard(True, period=100)
        seq = []
        for i in range(50):
            n = torch.get_num_threads()
            seq.append(n)
            busy = 20 <= i < 50  # another job takes a core from step 20 on
            g.observe((11.0 if n == 2 else 0.9) if busy else (0.5 if n == 2 else 0.7))
        assert seq[:4] == [2, 2, 2, 2] and seq[4:7] == [1, 1, 1]  # first probe: 1 thread is slower, back to 2
        assert seq[7:20] == [2] * 13
        assert seq[-10:] == [1] * 10  # the slowdown was noticed and 1 thread kept
    finally:
        torch.set_num_threads(n0)


_FAULTS = """
import resource, sys, torch
from softmask.train.loop import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
counts = []
for _ in range(4):  # a training step's pattern: activations pile up (30 x 7 MB), then all are freed
    f0 = faults()
    acts = [torch.ones(48, 69, 512) for _ in range(30)]
    del acts
    counts.append(faults() - f0)
print(" ".join(map(str, counts)))
"""


def test_keep_freed_memory_stops_refaulting():
    """A step's freed activations stay in the heap for the next step: without the setting the second round
    faults in every page again (30 x 6.8 MB = 50k pages), with it almost none."""
    def faults(mode):
        r = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return [int(x) for x in r.stdout.split()]

    # glibc's own thresholds adapt after a few rounds at times: the second round refaults in every run measured
    default, kept = faults("default"), faults("keep")
    assert default[1] > 30_000, default
    assert sum(kept[1:]) < 10_000, kept


_LOSSES = """
import json, sys, torch
import softmask.train.loop as loop
torch.set_num_threads(1)
if sys.argv[2] == "default":
    loop.keep_freed_memory = lambda: False
loop.train(loop.TrainConfig(steps=3, out=sys.argv[1], num_workers=0, **json.loads(sys.argv[3])))
"""


def test_keep_freed_memory_keeps_the_results(tmp_path):
    """Where the allocator puts the tensors does not change a bit of the training."""
    got = {}
    for mode in ("default", "keep"):
        out = str(tmp_path / mode)
        r = subprocess.run([sys.executable, "-c", _LOSSES, out, mode, json.dumps(TINY)], capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        got[mode] = losses(out)
    assert got["default"] == got["keep"] and len(got["keep"]) == 3
