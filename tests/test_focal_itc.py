"""focal_itc_loss: every backend against a float64 ground truth from softmask.reference,
gradcheck, the cross-entropy special case, edges (temperature 0.001, p -> 1), layouts,
reductions, bad inputs and torch.compile."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import softmask
from softmask import reference
from softmask.ops import focal_itc as focal_ops
from tests.helpers import assert_close

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
BACKENDS = ["torch", "triton"]
CPU_DTYPES = [torch.float16, torch.float32, torch.float64]


def _feats(*shape, dtype, seed, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)
    return x.to(device=device, dtype=dtype)


def _problem(B, N, D, dtype, *, clip, momentum, seed=0):
    inputs = dict(image_feat=_feats(B, D, dtype=dtype, seed=seed), text_feat=_feats(B, D, dtype=dtype, seed=seed + 1))
    if not clip:
        # The batch's positives near their queries, as momentum features are.
        tk = _feats(N, D, dtype=torch.float64, seed=seed + 2)
        ik = _feats(N, D, dtype=torch.float64, seed=seed + 3)
        tk[:B] = F.normalize(inputs["text_feat"].double().cpu() + 0.3 * tk[:B].cpu(), dim=-1).to(tk.device)
        ik[:B] = F.normalize(inputs["image_feat"].double().cpu() + 0.3 * ik[:B].cpu(), dim=-1).to(ik.device)
        inputs.update(text_keys=tk.to(dtype), image_keys=ik.to(dtype))
        if momentum:
            inputs.update(image_feat_m=_feats(B, D, dtype=dtype, seed=seed + 4),
                          text_feat_m=_feats(B, D, dtype=dtype, seed=seed + 5))
    return inputs


def _run(fn, inputs, tau, tau_dtype, **kw):
    """Loss and gradients (image_feat, text_feat, temperature) of ``fn``."""
    t = torch.tensor(tau, dtype=tau_dtype, device=inputs["image_feat"].device, requires_grad=True)
    img = inputs["image_feat"].detach().clone().requires_grad_()
    txt = inputs["text_feat"].detach().clone().requires_grad_()
    rest = {k: v for k, v in inputs.items() if k not in ("image_feat", "text_feat")}
    loss = fn(img, txt, t, **rest, **kw)
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).view(loss.shape)
    (loss * upstream).sum().backward()
    return loss.detach(), img.grad, txt.grad, t.grad


def _truth(inputs, tau, **kw):
    inputs64 = {k: v.double() for k, v in inputs.items()}
    return _run(reference.focal_itc_loss_reference, inputs64, tau, torch.float64, **kw)


def _check_all(inputs, tau, dtype, backend, **kw):
    tau_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    got = _run(softmask.focal_itc_loss, inputs, tau, tau_dtype, backend=backend, **kw)
    same = _run(reference.focal_itc_loss_reference, inputs, tau, tau_dtype, **kw)
    truth = _truth(inputs, tau, **kw)
    for name, g, s, t in zip(("loss", "d image_feat", "d text_feat", "d temperature"), got, same, truth):
        assert g.dtype == s.dtype, name
        # Logits reach 1/tau for unit features: their rounding scales the error by that.
        assert_close(g, t, dtype=dtype, same_dtype_ref=s, cond=max(1.0, 0.07 / tau), name=f"{backend} {name}")


# --------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma,alpha,tau", list(itertools.product([0.0, 0.5, 1.0, 2.0, 5.0], [0.0, 0.4, 1.0],
                                                                   [0.001, 0.07, 0.5])))
def test_albef_mode_grid(backend, dtype, gamma, alpha, tau):
    inputs = _problem(7, 83, 24, dtype, clip=False, momentum=alpha > 0, seed=int(gamma * 10 + alpha * 100))
    _check_all(inputs, tau, dtype, backend, gamma=gamma, alpha=alpha)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gamma,alpha,tau", [(0.0, 0.0, 0.07), (2.0, 0.4, 0.07), (0.5, 0.4, 0.001), (5.0, 1.0, 0.5)])
def test_albef_mode_float16(backend, gamma, alpha, tau):
    inputs = _problem(7, 83, 24, torch.float16, clip=False, momentum=alpha > 0)
    _check_all(inputs, tau, torch.float16, backend, gamma=gamma, alpha=alpha)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("gamma,tau", [(0.0, 0.07), (0.5, 0.001), (2.0, 0.07), (5.0, 0.5)])
def test_clip_mode(backend, dtype, gamma, tau):
    inputs = _problem(23, 0, 40, dtype, clip=True, momentum=False)
    _check_all(inputs, tau, dtype, backend, gamma=gamma)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,N", [(1, 1), (1, 70), (7, 7), (123, 301)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_batch_sizes_and_reductions(backend, B, N, reduction):
    inputs = _problem(B, N, 40, torch.float32, clip=False, momentum=True, seed=B)
    _check_all(inputs, 0.07, torch.float32, backend, gamma=2.0, alpha=0.4, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B", [1, 123])
def test_clip_mode_batch_sizes(backend, B):
    inputs = _problem(B, 0, 33, torch.float64, clip=True, momentum=False, seed=B)
    _check_all(inputs, 0.05, torch.float64, backend, gamma=1.0, reduction="none")


def test_torch_backend_row_blocks(monkeypatch):
    """Several row blocks of the torch backend (tiny block budget) give the same result."""
    monkeypatch.setattr(focal_ops, "TORCH_BLOCK_ELEMS", 3 * 101)
    for clip in (False, True):
        inputs = _problem(11, 101, 16, torch.float64, clip=clip, momentum=not clip)
        kw = dict(gamma=2.0, alpha=0.0 if clip else 0.4)
        _check_all(inputs, 0.07, torch.float64, "torch", **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    for clip in (False, True):
        inputs = _problem(3, 5, 4, torch.float64, clip=clip, momentum=not clip, seed=3)
        rest = {k: v for k, v in inputs.items() if k not in ("image_feat", "text_feat")}
        img = inputs["image_feat"].clone().requires_grad_()
        txt = inputs["text_feat"].clone().requires_grad_()
        for alpha in ((0.0,) if clip else (0.0, 0.4)):
            # The distillation targets depend on the temperature but are constants for
            # autograd (stop-gradient), so the temperature is checked at alpha = 0 only.
            tau = torch.tensor(0.2, dtype=torch.float64, requires_grad=alpha == 0)

            def fn(i, t, temp):
                return softmask.focal_itc_loss(i, t, temp, gamma=0.5, alpha=alpha, reduction="none",
                                               backend=backend, **(rest if alpha else {k: v for k, v in rest.items()
                                                                                       if k.endswith("keys")}))

            assert torch.autograd.gradcheck(fn, (img, txt, tau), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("clip", [False, True])
def test_gamma_alpha_zero_is_cross_entropy(backend, clip):
    inputs = _problem(9, 9 if clip else 50, 16, torch.float64, clip=clip, momentum=False)
    tau = 0.07
    i, t = inputs["image_feat"], inputs["text_feat"]
    tk = t if clip else inputs["text_keys"]
    ik = i if clip else inputs["image_keys"]
    labels = torch.arange(9)
    expected = 0.5 * (F.cross_entropy(i @ tk.t() / tau, labels) + F.cross_entropy(t @ ik.t() / tau, labels))
    got = softmask.focal_itc_loss(i, t, tau, gamma=0.0, alpha=0.0, backend=backend,
                                  **{k: v for k, v in inputs.items() if k not in ("image_feat", "text_feat")})
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- edges and layouts


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_saturated_probabilities_are_finite(backend, gamma, dtype):
    """Temperature 0.001 and positives equal to their queries: p_ii rounds to exactly 1,
    log p_ii to 0, and (1-p)^(gamma-1) would be inf for gamma < 1."""
    B, N, D = 6, 40, 8
    img = _feats(B, D, dtype=dtype, seed=1)
    txt = img.clone()
    keys_t = torch.cat([txt, _feats(N - B, D, dtype=dtype, seed=2)])
    keys_i = torch.cat([img, _feats(N - B, D, dtype=dtype, seed=3)])
    inputs = dict(image_feat=img, text_feat=txt, text_keys=keys_t, image_keys=keys_i,
                  image_feat_m=img.clone(), text_feat_m=txt.clone())
    tau_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for alpha in (0.0, 0.4):
        got = _run(softmask.focal_itc_loss, inputs, 0.001, tau_dtype, gamma=gamma, alpha=alpha, backend=backend)
        truth = _truth(inputs, 0.001, gamma=gamma, alpha=alpha)
        same = _run(reference.focal_itc_loss_reference, inputs, 0.001, tau_dtype, gamma=gamma, alpha=alpha)
        for name, g, s, t in zip(("loss", "d image", "d text", "d tau"), got, same, truth):
            assert_close(g, t, dtype=dtype, same_dtype_ref=s, cond=70.0, name=f"{name} alpha={alpha}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_do_not_overflow(backend):
    """Logits of magnitude 1000 (temperature 0.001, unit features) in float16 inputs."""
    inputs = _problem(8, 64, 32, torch.float16, clip=False, momentum=True)
    got = _run(softmask.focal_itc_loss, inputs, 0.001, torch.float32, gamma=0.5, alpha=0.4, backend=backend)
    for g in got:
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    B, N, D = 10, 70, 24
    base = _problem(B, N, D, torch.float64, clip=False, momentum=True, seed=5)
    strided = {}
    for k, v in base.items():
        wide = torch.zeros(v.shape[0], 2 * D, dtype=v.dtype, device=v.device)
        wide[:, ::2] = v
        strided[k] = wide[:, ::2]  # last-dim stride 2
    strided["text_keys"] = base["text_keys"].t().contiguous().t()  # column-major
    assert not strided["image_feat"].is_contiguous() and not strided["text_keys"].is_contiguous()
    _check_all(strided, 0.07, torch.float64, backend, gamma=2.0, alpha=0.4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_not_modified(backend):
    inputs = _problem(5, 30, 16, torch.float32, clip=False, momentum=True)
    before = {k: v.clone() for k, v in inputs.items()}
    _run(softmask.focal_itc_loss, inputs, 0.07, torch.float32, gamma=2.0, alpha=0.4, backend=backend)
    for k in inputs:
        assert torch.equal(inputs[k], before[k]), k


def test_python_float_temperature_and_parameter():
    inputs = _problem(5, 30, 16, torch.float64, clip=False, momentum=True)
    a = softmask.focal_itc_loss(**inputs, temperature=0.07, gamma=2.0, alpha=0.4)
    temp = torch.nn.Parameter(torch.tensor(0.07, dtype=torch.float64))
    b = softmask.focal_itc_loss(**inputs, temperature=temp, gamma=2.0, alpha=0.4)
    torch.testing.assert_close(a, b)
    b.backward()
    assert temp.grad is not None and torch.isfinite(temp.grad)


def test_module_matches_function():
    inputs = _problem(5, 30, 16, torch.float64, clip=False, momentum=True)
    mod = softmask.FocalITCLoss(gamma=1.0, alpha=0.4, reduction="sum", backend="torch")
    assert "gamma=1.0" in repr(mod)
    keys = {k: v for k, v in inputs.items() if k not in ("image_feat", "text_feat")}
    torch.testing.assert_close(
        mod(inputs["image_feat"], inputs["text_feat"], 0.07, **keys),
        softmask.focal_itc_loss(inputs["image_feat"], inputs["text_feat"], 0.07, gamma=1.0, alpha=0.4,
                                reduction="sum", **keys),
    )


def test_keys_receive_no_gradient():
    inputs = _problem(5, 30, 16, torch.float64, clip=False, momentum=True)
    tk = inputs["text_keys"].clone().requires_grad_()
    loss = softmask.focal_itc_loss(inputs["image_feat"].clone().requires_grad_(), inputs["text_feat"], 0.07,
                                   text_keys=tk, image_keys=inputs["image_keys"], alpha=0.4,
                                   image_feat_m=inputs["image_feat_m"], text_feat_m=inputs["text_feat_m"],
                                   backend="torch")
    loss.backward()
    assert tk.grad is None


# --------------------------------------------------------------------------- bad input


def _good():
    return _problem(4, 10, 8, torch.float32, clip=False, momentum=True)


BAD_CASES = [
    ("image_feat 3-D", lambda a: a.update(image_feat=a["image_feat"][None]), ValueError, "image_feat: expected a 2-D"),
    ("text_feat shape", lambda a: a.update(text_feat=a["text_feat"][:3]), ValueError, "text_feat: expected shape"),
    ("integer feats", lambda a: a.update(image_feat=torch.ones(4, 8, dtype=torch.int64)), TypeError, "image_feat: expected dtype"),
    ("dtype mismatch", lambda a: a.update(text_feat=a["text_feat"].double()), TypeError, "text_feat: expected dtype float32"),
    ("not a tensor", lambda a: a.update(image_feat=[[1.0]]), TypeError, "image_feat: expected a torch.Tensor"),
    ("keys N < B", lambda a: a.update(text_keys=a["text_keys"][:3]), ValueError, "text_keys: expected N >= B = 4"),
    ("keys D", lambda a: a.update(image_keys=a["image_keys"][:, :5]), ValueError, "image_keys: expected size 8"),
    ("one key bank", lambda a: a.update(image_keys=None), ValueError, "image_keys: expected a [N, D] key bank"),
    ("keys dtype", lambda a: a.update(text_keys=a["text_keys"].half()), TypeError, "text_keys: expected dtype float32"),
    ("temperature 0", lambda a: a.update(temperature=0.0), ValueError, "temperature: expected a finite value > 0"),
    ("temperature < 0 tensor", lambda a: a.update(temperature=torch.tensor(-0.1)), ValueError, "temperature: expected a finite value > 0, got -0.1"),
    ("temperature 1-D", lambda a: a.update(temperature=torch.tensor([0.1])), ValueError, "temperature: expected a 0-D"),
    ("temperature str", lambda a: a.update(temperature="0.1"), TypeError, "temperature: expected a Python float"),
    ("gamma < 0", lambda a: a.update(gamma=-1.0), ValueError, "gamma: expected a finite value >= 0, got -1.0"),
    ("alpha > 1", lambda a: a.update(alpha=1.5), ValueError, "alpha: expected a value in [0.0, 1.0], got 1.5"),
    ("alpha without momentum", lambda a: a.update(image_feat_m=None), ValueError, "image_feat_m: expected momentum features"),
    ("alpha in CLIP mode", lambda a: a.update(image_keys=None, text_keys=None), ValueError, "text_keys: momentum distillation"),
    ("momentum shape", lambda a: a.update(text_feat_m=a["text_feat_m"][:2]), ValueError, "text_feat_m: expected shape"),
    ("reduction", lambda a: a.update(reduction="avg"), ValueError, "reduction: expected one of"),
    ("backend", lambda a: a.update(backend="cuda"), ValueError, "backend: expected one of"),
    ("empty batch", lambda a: a.update(image_feat=a["image_feat"][:0], text_feat=a["text_feat"][:0]), ValueError, "image_feat: expected a non-empty"),
]


@pytest.mark.parametrize("case", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input(case):
    _, mutate, exc, msg = case
    args = dict(_good(), temperature=0.07, gamma=2.0, alpha=0.4)
    mutate(args)
    with pytest.raises(exc, match=msg.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        softmask.focal_itc_loss(**args)


@pytest.mark.skipif(CUDA, reason="checks the CPU-only triton error")
def test_triton_backend_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton': needs CUDA tensors"):
        softmask.focal_itc_loss(**_good(), temperature=0.07, alpha=0.4, backend="triton")


# --------------------------------------------------------------------------- torch.compile


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    inputs = _problem(6, 20, 16, torch.float32, clip=False, momentum=True)
    rest = {k: v for k, v in inputs.items() if k not in ("image_feat", "text_feat")}

    def step(img, txt, temp):
        return softmask.focal_itc_loss(img, txt, temp, gamma=2.0, alpha=0.4, backend="torch", **rest) * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    outs = []
    for f in (step, compiled):
        img = inputs["image_feat"].clone().requires_grad_()
        txt = inputs["text_feat"].clone().requires_grad_()
        temp = torch.tensor(0.07, requires_grad=True)
        loss = f(img, txt, temp)
        loss.backward()
        outs.append((loss.detach(), img.grad, txt.grad, temp.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- GPU (compiled kernels)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("gamma,tau", [(2.0, 0.07), (0.5, 0.001)])
def test_gpu_compiled_kernels(dtype, clip, gamma, tau):
    B, N, D = (257, 0, 256) if clip else (129, 4097, 256)
    inputs = _problem(B, N, D, dtype, clip=clip, momentum=not clip)
    _check_all(inputs, tau, dtype, "triton", gamma=gamma, alpha=0.0 if clip else 0.4)
