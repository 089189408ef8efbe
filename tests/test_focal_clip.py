"""FocalClipLoss against open_clip's own ClipLoss (gamma 0) and a float64 materialized focal
ClipLoss (gamma > 0): loss and every rank's gradients (features, logit_scale) for the four
local_loss / gather_with_grad combinations at world sizes 1, 2 and 4 (gloo processes on
the CPU), DDP's averaged parameter gradients, the memory claim (no [B_local, B_global]
tensor, which ClipLoss allocates), and bad input, including mismatches across ranks that
must raise on every rank instead of hanging in a collective."""

from __future__ import annotations

import itertools
import os
import re
import socket
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import softmask
from softmask.ops import focal_itc as focal_ops

open_clip_loss = pytest.importorskip("open_clip.loss")

COMBOS = list(itertools.product([False, True], [False, True]))  # (local_loss, gather_with_grad)
# Relative error allowed against the truth (issue 27): max|got - truth| / max|truth|.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


class MaterializedFocalClipLoss(open_clip_loss.ClipLoss):
    """open_clip's ClipLoss with each cross-entropy replaced by the focal one,
    ``-(1 - p_label)^gamma * log p_label`` averaged over the rows, on exactly the logits
    and labels ClipLoss forms (its own gather, its own get_logits)."""

    def __init__(self, gamma, **kw):
        super().__init__(**kw)
        self.gamma = gamma

    def _focal(self, logits, labels):
        logp = torch.log_softmax(logits, dim=1).gather(1, labels[:, None])[:, 0]
        return (-(-torch.expm1(logp)).pow(self.gamma) * logp).mean()

    def forward(self, image_features, text_features, logit_scale, output_dict=False):
        logits_per_image, logits_per_text = self.get_logits(image_features, text_features, logit_scale)
        labels = self.get_ground_truth(image_features.device, logits_per_image.shape[0])
        return (self._focal(logits_per_image, labels) + self._focal(logits_per_text, labels)) / 2


def _features(W, b, D, seed):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(W * b, D, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(img + 0.8 * torch.randn(W * b, D, generator=g, dtype=torch.float64), dim=-1)
    return img, txt


def _step(loss_fn, img, txt, scale, dtype, upstream=0.7):
    """Loss and gradients (local image, local text, logit_scale) of one call."""
    i = img.detach().to(dtype).clone().requires_grad_()
    t = txt.detach().to(dtype).clone().requires_grad_()
    s = torch.tensor(scale, dtype=dtype, requires_grad=True)
    loss = loss_fn(i, t, s)
    (loss * upstream).backward()
    return [loss.detach(), i.grad, t.grad, s.grad]


def _compare(got, truth, rtol, what):
    for name, g, t in zip(("loss", "d image_features", "d text_features", "d logit_scale"), got, truth):
        assert g is not None and t is not None, f"{what}: {name} missing"
        g, t = g.double(), t.double()
        assert torch.isfinite(g).all(), f"{what}: {name} not finite"
        err = float((g - t).abs().max()) / max(float(t.abs().max()), 1e-300)
        assert err <= rtol, f"{what}: {name} relative error {err:.3g} > {rtol:g}"


def _check_cases(rank, W, backends, b=5, D=7, scale=14.0):
    """Every combination, dtype, gamma and backend on this rank (all ranks run the same
    sequence of collectives)."""
    img, txt = _features(W, b, D, seed=W)
    mine = slice(rank * b, (rank + 1) * b)
    for (local_loss, gwg), backend in itertools.product(COMBOS, backends):
        kw = dict(local_loss=local_loss, gather_with_grad=gwg, rank=rank, world_size=W)
        for dtype in (torch.float64, torch.float32):
            what = f"W={W} rank {rank} local_loss={local_loss} gather_with_grad={gwg} {dtype} {backend}"
            # gamma 0: open_clip's own ClipLoss, in the same dtype and in float64
            got = _step(softmask.FocalClipLoss(gamma=0.0, backend=backend, **kw), img[mine], txt[mine], scale, dtype)
            truth = _step(open_clip_loss.ClipLoss(**kw), img[mine], txt[mine], scale, torch.float64)
            _compare(got, truth, RTOL[dtype], f"{what} gamma 0 vs ClipLoss")
            # gamma > 0: the float64 materialized focal ClipLoss
            for gamma in (0.5, 2.0):
                got = _step(softmask.FocalClipLoss(gamma=gamma, backend=backend, **kw), img[mine], txt[mine], scale,
                            dtype)
                truth = _step(MaterializedFocalClipLoss(gamma, **kw), img[mine], txt[mine], scale, torch.float64)
                _compare(got, truth, RTOL[dtype], f"{what} gamma {gamma}")
                if gamma == 2.0 and dtype == torch.float64:
                    # the truth is not ClipLoss: the check can fail
                    plain = _step(open_clip_loss.ClipLoss(**kw), img[mine], txt[mine], scale, torch.float64)
                    with pytest.raises(AssertionError):
                        _compare(got, plain, RTOL[dtype], "focal vs plain")


class _Towers(torch.nn.Module):
    def __init__(self, d_in, D):
        super().__init__()
        self.image = torch.nn.Linear(d_in, D)
        self.text = torch.nn.Linear(d_in, D)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.5))

    def forward(self, x, y):
        return F.normalize(self.image(x), dim=-1), F.normalize(self.text(y), dim=-1), self.logit_scale.exp()


def _check_ddp(rank, W, b=6, d_in=9, D=5):
    """Parameters' gradients after DDP's averaging: FocalClipLoss (gamma 0) as ClipLoss."""
    g = torch.Generator().manual_seed(123)
    x = torch.randn(W * b, d_in, generator=g, dtype=torch.float64)[rank * b:(rank + 1) * b]
    y = torch.randn(W * b, d_in, generator=g, dtype=torch.float64)[rank * b:(rank + 1) * b]
    for local_loss, gwg in COMBOS:
        grads = []
        for loss_fn in (open_clip_loss.ClipLoss, lambda **kw: softmask.FocalClipLoss(gamma=0.0, backend="torch", **kw)):
            torch.manual_seed(0)
            model = torch.nn.parallel.DistributedDataParallel(_Towers(d_in, D).double())
            loss = loss_fn(local_loss=local_loss, gather_with_grad=gwg, rank=rank, world_size=W)(*model(x, y))
            loss.backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for gc, gf in zip(*grads):
            err = float((gc - gf).abs().max()) / float(gc.abs().max())
            assert err <= 1e-10, f"DDP rank {rank} local_loss={local_loss} gwg={gwg}: parameter gradient {err:.3g}"


def _max_tensor_bytes(fn):
    """Largest single allocation (bytes) of any op, nested ones included, while ``fn`` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.self_cpu_memory_usage for e in prof.events())


def _check_memory(rank, W, b=64, D=16):
    """No [b, W b] tensor in the fused forward + backward of any combination (tiles shrunk to
    the problem: at most 1/4 of the [b, W b] logits), while ClipLoss allocates one."""
    img, txt = _features(W, b, D, seed=5)
    mine = slice(rank * b, (rank + 1) * b)
    logits_bytes = b * W * b * 4
    focal_ops.TORCH_TILE_ELEMS = 256
    focal_ops.TORCH_TILED_BLOCK_ELEMS = b * W * b // 4
    for local_loss, gwg in COMBOS:
        kw = dict(local_loss=local_loss, gather_with_grad=gwg, rank=rank, world_size=W)
        for name, loss_fn in (("fused", softmask.FocalClipLoss(gamma=2.0, backend="torch", **kw)),
                              ("ClipLoss", open_clip_loss.ClipLoss(**kw))):
            softmask.release_workspace()
            peak = _max_tensor_bytes(lambda: _step(loss_fn, img[mine], txt[mine], 14.0, torch.float32))
            if name == "fused":
                assert peak < logits_bytes, f"fused local_loss={local_loss} gwg={gwg}: a {peak}-byte tensor"
            else:  # the check would catch ClipLoss
                assert peak >= logits_bytes, f"ClipLoss allocated at most {peak} bytes"


def _check_bad_input(rank, W):
    """Mismatches across ranks raise on every rank (no hang); the group is checked."""
    b = 3 + rank  # a different batch size on every rank
    x = torch.randn(b, 4, dtype=torch.float64)
    loss = softmask.FocalClipLoss(rank=rank, world_size=W, backend="torch")
    with pytest.raises(ValueError, match=r"image_features: expected the same \[B, D\] on every rank, got rank 0: "):
        loss(x, x, 10.0)
    with pytest.raises(ValueError, match=re.escape(f"world_size: expected {W} (the size of the torch.distributed "
                                                   f"process group), got {W + 1}")):
        softmask.FocalClipLoss(rank=rank, world_size=W + 1)(x, x, 10.0)
    other = (rank + 1) % W
    with pytest.raises(ValueError, match=re.escape(f"rank: expected {rank} (this process's rank in the "
                                                   f"torch.distributed process group), got {other}")):
        softmask.FocalClipLoss(rank=other, world_size=W)(x, x, 10.0)
    # the group still works after the errors
    y = torch.randn(4, 4, dtype=torch.float64)
    assert torch.isfinite(softmask.FocalClipLoss(rank=rank, world_size=W, backend="torch")(y, y, 10.0))


def _worker(rank, W, port, out_dir, checks):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=W)
    status = "ok"
    try:
        for check, kw in checks:
            globals()[check](rank, W, **kw)
    except BaseException:  # reported to the parent process
        status = traceback.format_exc()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(status)
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(W, checks):
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(W, _free_port(), out_dir, checks), nprocs=W, join=True)
        for r in range(W):
            with open(os.path.join(out_dir, f"rank{r}.txt")) as f:
                status = f.read()
            assert status == "ok", f"rank {r} of {W}:\n{status}"


# --------------------------------------------------------------------------- one process


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
@pytest.mark.parametrize("local_loss,gather_with_grad", COMBOS)
def test_world_size_1(backend, local_loss, gather_with_grad):
    """One process (no process group): CLIP mode of the op; odd batch."""
    img, txt = _features(1, 13, 7, seed=1)
    kw = dict(local_loss=local_loss, gather_with_grad=gather_with_grad)
    for dtype in (torch.float64, torch.float32):
        got = _step(softmask.FocalClipLoss(gamma=0.0, backend=backend, **kw), img, txt, 14.0, dtype)
        _compare(got, _step(open_clip_loss.ClipLoss(**kw), img, txt, 14.0, torch.float64), RTOL[dtype],
                 f"{backend} {dtype} gamma 0")
        for gamma in (0.5, 2.0):
            got = _step(softmask.FocalClipLoss(gamma=gamma, backend=backend, **kw), img, txt, 14.0, dtype)
            _compare(got, _step(MaterializedFocalClipLoss(gamma, **kw), img, txt, 14.0, torch.float64), RTOL[dtype],
                     f"{backend} {dtype} gamma {gamma}")


def test_output_dict_and_logit_bias():
    img, txt = _features(1, 6, 5, seed=2)
    loss = softmask.FocalClipLoss(gamma=1.0, backend="torch")
    plain = loss(img, txt, 10.0)
    out = loss(img, txt, 10.0, logit_bias=torch.tensor(-3.0, dtype=torch.float64), output_dict=True)
    assert list(out) == ["contrastive_loss"]
    assert torch.equal(out["contrastive_loss"], plain)
    ref = open_clip_loss.ClipLoss()(img, txt, torch.tensor(10.0, dtype=torch.float64),
                                    torch.tensor(-3.0, dtype=torch.float64))
    assert torch.allclose(softmask.FocalClipLoss(gamma=0.0)(img, txt, 10.0), ref, rtol=1e-12)


BAD = [
    (dict(gamma=-0.5), ValueError, "gamma: expected a finite value >= 0, got -0.5"),
    (dict(gamma="2"), TypeError, "gamma: expected a Python float, got str"),
    (dict(use_horovod=True), ValueError, "use_horovod: expected False (FocalClipLoss gathers with torch.distributed"),
    (dict(world_size=0), ValueError, "world_size: expected an int >= 1, got 0"),
    (dict(rank=2, world_size=2), ValueError, "rank: expected an int in [0, world_size = 2), got 2"),
    (dict(rank=1.0), TypeError, "rank: expected a Python int, got float"),
    (dict(local_loss=1), TypeError, "local_loss: expected a bool, got int"),
    (dict(backend="cuda"), ValueError, "backend: expected one of"),
]


@pytest.mark.parametrize("kw,exc,msg", BAD, ids=[m.split(":")[0] + str(i) for i, (_, _, m) in enumerate(BAD)])
def test_bad_constructor(kw, exc, msg):
    with pytest.raises(exc, match=re.escape(msg)):
        softmask.FocalClipLoss(**kw)


@pytest.mark.parametrize("scale,exc,msg", [
    (0.0, ValueError, "logit_scale: expected a finite value > 0 (the exponentiated scale), got 0.0"),
    (-2.0, ValueError, "logit_scale: expected a finite value > 0 (the exponentiated scale), got -2.0"),
    (float("inf"), ValueError, "logit_scale: expected a finite value > 0 (the exponentiated scale), got inf"),
    (torch.tensor(float("nan")), ValueError, "logit_scale: expected a finite value > 0 (the exponentiated scale), got nan"),
    (torch.tensor([1.0, 2.0]), ValueError, "logit_scale: expected one value (a 0-dim tensor), got shape (2,)"),
    ("10", TypeError, "logit_scale: expected a 0-dim tensor or a Python float, got str"),
])
def test_bad_logit_scale(scale, exc, msg):
    x = torch.randn(4, 3)
    with pytest.raises(exc, match=re.escape(msg)):
        softmask.FocalClipLoss()(x, x, scale)


def test_bad_features_and_group():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=re.escape("text_features: expected shape (4, 3) (as image_features), got (5, 3)")):
        softmask.FocalClipLoss()(x, torch.randn(5, 3), 10.0)
    with pytest.raises(TypeError, match=re.escape("text_features: expected dtype float32 (as image_features), got float64")):
        softmask.FocalClipLoss()(x, x.double(), 10.0)
    with pytest.raises(ValueError, match=re.escape("world_size: expected 1 without an initialized torch.distributed "
                                                   "process group, got 2")):
        softmask.FocalClipLoss(rank=0, world_size=2)(x, x, 10.0)


# --------------------------------------------------------------------------- several processes


def test_world_size_2():
    """Every combination, both dtypes, gamma 0 / 0.5 / 2, torch and triton backends; DDP;
    the memory claim; errors across ranks."""
    _spawn(2, [("_check_cases", dict(backends=("torch", "triton"))), ("_check_ddp", {}), ("_check_memory", {}),
               ("_check_bad_input", {})])


def test_world_size_4():
    _spawn(4, [("_check_cases", dict(backends=("torch",))), ("_check_ddp", {})])
