"""Tests of the word-conditional Grad-CAM soft mask (issue 3).

Ground truth: an eager float64 cross-attention ``ctx = softmax(q k^T * scale) @ v``
whose attention-probability gradients come from autograd (``probs.retain_grad()``,
backward of the random linear function ``sum(ctx * R)``, so ``grad_context = R``):
exactly what hook-based code sees. Every backend (triton through the interpreter on
CPU) is compared with it, with tolerances scaled to the dtype (``tests.helpers``).
Kernel outputs are allocated NaN-filled so that an unwritten element fails.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import softmask
from softmask import reference as ref
from softmask.kernels import soft_mask as kernels
from tests.helpers import assert_close, ptxas_available

BACKENDS = ["triton", "torch", "reference"]
DTYPES = [torch.float16, torch.float32, torch.float64]
CUDA = torch.cuda.is_available()


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every tensor the Triton launchers allocate starts as NaN."""

    def alloc(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(kernels, "_alloc", alloc)


# --------------------------------------------------------------------------- inputs and truth


def make_case(B, H, T, N, dh, D, dtype, *, padded=False, layout="bhtd", seed=0, device="cpu"):
    """Random inputs in ``dtype``. ``layout="bthd"``: attention tensors are transposed
    views of (B, T, H, dh) / (B, N, H, dh) storage, as a fused QKV projection gives them."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype).to(device)

    def attn(B_, H_, L, dh_, std=1.0):
        if layout == "bthd":
            return rnd(B_, L, H_, dh_, std=std).transpose(1, 2)  # (B, H, L, dh) view
        return rnd(B_, H_, L, dh_, std=std)

    case = dict(
        query=attn(B, H, T, dh, std=1.5),
        key=attn(B, H, N, dh),
        value=attn(B, H, N, dh),
        grad_context=attn(B, H, T, dh),
        image_embeds=rnd(B, N, D),
        word_index=torch.randint(0, T, (B,), generator=gen).to(device),
        key_padding_mask=None,
    )
    if padded:
        kpm = torch.rand(B, N, generator=gen) > 0.3
        kpm[:, 0] = True
        kpm[:, 1] = True  # at least one patch key per sample
        kpm[:, -1] = False  # the last key (the tail of the last block) padded
        case["key_padding_mask"] = kpm.to(device)
    return case


def truth_mask(cam, kpm, floor):
    """Per-sample min-max mask written out plainly (float64)."""
    B, N = cam.shape
    mask = torch.ones(B, N, dtype=torch.float64)
    for b in range(B):
        idx = [n for n in range(1, N) if kpm is None or bool(kpm[b, n])]
        if not idx:
            continue
        vals = cam[b, idx].double()
        lo, hi = float(vals.min()), float(vals.max())
        if hi > lo:
            mask[b, idx] = 1.0 - (1.0 - floor) * (vals - lo) / (hi - lo)
    return mask


def eager_truth(case, scale=None, floor=0.0):
    """Float64 eager cross-attention with autograd attention gradients."""
    q, k, v, r = (case[n].detach().double().cpu() for n in ("query", "key", "value", "grad_context"))
    q.requires_grad_(True)
    k.requires_grad_(True)
    kpm = case["key_padding_mask"]
    kpm = None if kpm is None else kpm.cpu()
    B, H, T, dh = q.shape
    scale = dh ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, H, T, N)
    if kpm is not None:
        scores = scores.masked_fill(~kpm[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs.retain_grad()
    ctx = probs @ v  # (B, H, T, dh)
    (ctx * r).sum().backward()
    A, dA = probs.detach(), probs.grad
    w = case["word_index"].cpu()
    cam = torch.stack([(A[b, :, w[b]] * dA[b, :, w[b]].clamp_min(0)).mean(0) for b in range(B)])  # (B, N)
    mask = truth_mask(cam, kpm, floor)
    out = case["image_embeds"].detach().double().cpu() * mask[..., None]
    return dict(probs=A, grads=dA, cam=cam, mask=mask, out=out)


# --------------------------------------------------------------------------- main comparison

SHAPES = [  # (B, H, T, N, dh, D)
    pytest.param((2, 1, 5, 17, 16, 8), id="H1-N17"),  # one key block
    pytest.param((2, 12, 4, 65, 32, 8), id="H12-N65"),
    pytest.param((2, 12, 3, 257, 64, 16), id="H12-N257"),  # ALBEF-like: 5 key blocks of 64
    pytest.param((1, 2, 3, 1100, 24, 8), id="H2-N1100-dh24"),  # more keys than one min-max block; dh not a power of 2
]
VARIANTS = [  # (padded, floor, layout)
    pytest.param((False, 0.0, "bhtd"), id="dense-floor0"),
    pytest.param((True, 0.3, "bthd"), id="padded-floor0.3-strided"),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("backend", BACKENDS)
def test_soft_mask_matches_eager_autograd(backend, dtype, shape, variant):
    padded, floor, layout = variant
    B, H, T, N, dh, D = shape
    case = make_case(B, H, T, N, dh, D, dtype, padded=padded, layout=layout, seed=N + H)
    truth = eager_truth(case, floor=floor)
    kpm = case["key_padding_mask"]
    ad = acc(dtype)

    # The plain-PyTorch reference on the same dtype sets the error scale of the other
    # backends. The reference itself is held to the dtype's normwise bound alone: with
    # the same-dtype term it would be compared with itself and could not fail.
    if backend == "reference":
        ref_cam = ref_mask = ref_out = ref_grad = None
    else:
        with torch.no_grad():
            ref_cam = ref.word_gradcam_reference(case["query"], case["key"], case["value"], case["grad_context"],
                                                 case["word_index"], key_padding_mask=kpm)
            ref_mask = ref.soft_mask_from_cam_reference(ref_cam, key_padding_mask=kpm, floor=floor)
            ref_out = case["image_embeds"] * ref_mask.to(dtype)[..., None]

    cam = softmask.word_gradcam(case["query"], case["key"], case["value"], case["grad_context"], case["word_index"],
                                key_padding_mask=kpm, backend=backend)
    assert cam.dtype == ad and not cam.requires_grad
    assert_close(cam, truth["cam"], dtype=ad, same_dtype_ref=ref_cam, name="cam")

    inputs = {n: case[n].detach().requires_grad_(True)
              for n in ("image_embeds", "query", "key", "value", "grad_context")}
    out, mask = softmask.text_driven_soft_mask(
        inputs["image_embeds"], inputs["query"], inputs["key"], inputs["value"], inputs["grad_context"],
        case["word_index"], key_padding_mask=kpm, floor=floor, backend=backend)
    assert out.dtype == dtype and out.shape == (B, N, D)
    assert mask.dtype == ad and mask.shape == (B, N) and not mask.requires_grad
    assert_close(mask, truth["mask"], dtype=ad, same_dtype_ref=ref_mask, name="mask")
    assert_close(out, truth["out"], dtype=dtype, same_dtype_ref=ref_out, name="masked_embeds")
    assert torch.all(mask[:, 0] == 1)
    if kpm is not None:
        assert torch.all(mask[~kpm] == 1) and torch.all(cam[~kpm] == 0)

    grad_out = torch.randn(B, N, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    out.backward(grad_out)
    truth_grad = grad_out.double() * truth["mask"][..., None]
    if ref_mask is not None:
        ref_grad = grad_out * ref_mask.to(dtype)[..., None]
    assert_close(inputs["image_embeds"].grad, truth_grad, dtype=dtype, same_dtype_ref=ref_grad, name="d image_embeds")
    for n in ("query", "key", "value", "grad_context"):  # the mask is a constant
        assert inputs[n].grad is None, f"{n} received a gradient"


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2]])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcam_from_probs(backend, dtype, shape):
    B, H, T, N, dh, D = shape
    case = make_case(B, H, T, N, dh, D, torch.float64, padded=True, seed=3)
    truth = eager_truth(case)
    probs, grads = truth["probs"].to(dtype), truth["grads"].to(dtype)  # (B, H, T, N), as hooks capture them
    w = case["word_index"]
    # truth of the rounded maps; the reference upcasts after the gather
    exact = torch.stack([(probs[b, :, w[b]].double() * grads[b, :, w[b]].double().clamp_min(0)).mean(0)
                         for b in range(B)])
    cam = softmask.word_gradcam_from_probs(probs, grads, w, backend=backend)
    assert cam.dtype == acc(dtype) and not cam.requires_grad
    assert_close(cam, exact, dtype=acc(dtype), same_dtype_ref=ref.word_gradcam_from_probs_reference(probs, grads, w),
                 name="cam from probs")
    # a non-contiguous (B, T, H, N)-stored map gives the same
    cam_t = softmask.word_gradcam_from_probs(probs.transpose(1, 2).contiguous().transpose(1, 2),
                                             grads.transpose(1, 2).contiguous().transpose(1, 2), w, backend=backend)
    torch.testing.assert_close(cam_t, cam, rtol=0, atol=0)
    if dtype == torch.float64:  # the maps came from the same eager attention as word_gradcam's inputs
        assert_close(cam, truth["cam"], dtype=torch.float64, name="cam from probs vs eager")


# --------------------------------------------------------------------------- the reference itself


class _ALBEFCrossAttention(torch.nn.Module):
    """ALBEF's BertSelfAttention in cross-attention mode (float64): projections of the text
    hidden states and the image embeddings, heads split from the hidden size, an additive
    -10000 key mask, and the attention map and its gradient kept by a hook, exactly as
    ALBEF's ``save_attention_map`` / ``save_attn_gradients`` keep them for Grad-CAM."""

    def __init__(self, hidden, width, heads):
        super().__init__()
        self.h, self.dh = heads, hidden // heads
        self.query = torch.nn.Linear(hidden, hidden, dtype=torch.float64)
        self.key = torch.nn.Linear(width, hidden, dtype=torch.float64)
        self.value = torch.nn.Linear(width, hidden, dtype=torch.float64)

    def split(self, x):  # (B, L, hidden) -> (B, H, L, dh)
        return x.view(x.shape[0], x.shape[1], self.h, self.dh).permute(0, 2, 1, 3)

    def forward(self, text, image, kpm):
        q, k, v = self.split(self.query(text)), self.split(self.key(image)), self.split(self.value(image))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.dh)  # (B, H, T, N)
        if kpm is not None:
            scores = scores + (1.0 - kpm[:, None, None, :].double()) * -10000.0
        probs = torch.softmax(scores, dim=-1)
        self.attention_map = probs
        probs.register_hook(lambda g: setattr(self, "attn_gradients", g))
        context = probs @ v  # (B, H, T, dh)
        context.retain_grad()
        self.qkv, self.context = (q.detach(), k.detach(), v.detach()), context
        return context.permute(0, 2, 1, 3).reshape(text.shape[0], text.shape[1], -1)


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("H,T,N", [(1, 4, 10), (4, 5, 17), (3, 3, 70)])
def test_word_gradcam_reference_against_albef_hooks(H, T, N, padded):
    """``word_gradcam_reference`` against ALBEF's own recipe in float64, compared directly
    (no same-dtype term): an eager cross-attention keeps its map and the map's gradient of a
    nonlinear score of the whole output (every text row gets a gradient), and the Grad-CAM
    is ``(map * grad.clamp(0)).mean(heads)`` at the chosen word's row. The reference gets the
    layer's projected q, k, v and the gradient of the score with respect to its output."""
    B, dh, width = 3, 8, 12
    gen = torch.Generator().manual_seed(100 * H + N + padded)
    torch.manual_seed(100 * H + N + padded)
    layer = _ALBEFCrossAttention(H * dh, width, H)
    text = torch.randn(B, T, H * dh, generator=gen, dtype=torch.float64)
    image = torch.randn(B, N, width, generator=gen, dtype=torch.float64)
    kpm = None
    if padded:
        kpm = torch.rand(B, N, generator=gen) > 0.4
        kpm[:, :2] = True
    w1 = torch.randn(H * dh, 16, generator=gen, dtype=torch.float64)
    w2 = torch.randn(16, generator=gen, dtype=torch.float64)
    out = layer(text, image, kpm)
    score = (torch.tanh(out @ w1) @ w2).sum()  # a stand-in for the summed ITM match logits
    score.backward()
    word = torch.randint(0, T, (B,), generator=gen)
    A, dA = layer.attention_map.detach(), layer.attn_gradients
    truth = torch.stack([(A[b, :, word[b]] * dA[b, :, word[b]].clamp(min=0)).mean(0) for b in range(B)])  # (B, N)
    assert (dA > 0).any() and (dA < 0).any() and (truth > 0).any()  # the clamp matters in this case
    q, k, v = layer.qkv
    cam = ref.word_gradcam_reference(q, k, v, layer.context.grad, word, key_padding_mask=kpm)
    assert cam.dtype == torch.float64
    assert_close(cam, truth, dtype=torch.float64, name="word_gradcam_reference vs ALBEF hooks")
    assert_close(ref.word_gradcam_from_probs_reference(A, dA, word), truth, dtype=torch.float64,
                 name="word_gradcam_from_probs_reference vs ALBEF hooks")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_reference_against_eager_truth_without_same_dtype_term(dtype):
    """The reference's cam and mask from inputs of each dtype against the float64 eager truth
    of those same (rounded) inputs, held to the accumulation dtype's normwise bound only."""
    for i, (B, H, T, N, dh, D) in enumerate([(2, 12, 4, 65, 32, 8), (1, 2, 3, 1100, 24, 8)]):
        case = make_case(B, H, T, N, dh, D, dtype, padded=i == 1, layout="bthd", seed=40 + i)
        truth = eager_truth(case, floor=0.3)
        kpm = case["key_padding_mask"]
        cam = ref.word_gradcam_reference(case["query"], case["key"], case["value"], case["grad_context"],
                                         case["word_index"], key_padding_mask=kpm)
        mask = ref.soft_mask_from_cam_reference(cam, key_padding_mask=kpm, floor=0.3)
        assert_close(cam, truth["cam"], dtype=acc(dtype), name="reference cam")
        assert_close(mask, truth["mask"], dtype=acc(dtype), name="reference mask")


# --------------------------------------------------------------------------- degenerate rows


@pytest.mark.parametrize("floor", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("backend", BACKENDS)
def test_flat_and_padded_rows(backend, dtype, floor):
    B, H, T, N, dh, D = 4, 3, 4, 70, 16, 8
    case = make_case(B, H, T, N, dh, D, torch.float64, padded=False, seed=11)
    w = case["word_index"]
    # sample 0: every gradient g.v negative, so cam == 0 everywhere (a flat map)
    case["value"][0] = case["value"][0].abs()
    case["grad_context"][0] = -case["grad_context"][0].abs()
    kpm = torch.ones(B, N, dtype=torch.bool)
    kpm[1] = False  # sample 1: every key padded
    kpm[2, 1:] = False  # sample 2: only the image [CLS] key
    kpm[3, 5:40] = False  # sample 3: a padded span
    case["key_padding_mask"] = kpm
    case = {n: (t.to(dtype) if t is not None and t.is_floating_point() else t) for n, t in case.items()}
    truth = eager_truth(case, floor=floor)
    truth["cam"] = truth["cam"].nan_to_num(0.0)  # the fully padded row of the eager softmax is NaN

    cam = softmask.word_gradcam(case["query"], case["key"], case["value"], case["grad_context"], w,
                                key_padding_mask=kpm, backend=backend)
    out, mask = softmask.text_driven_soft_mask(case["image_embeds"], case["query"], case["key"], case["value"],
                                               case["grad_context"], w, key_padding_mask=kpm, floor=floor,
                                               backend=backend)
    assert torch.isfinite(cam).all() and torch.isfinite(mask).all() and torch.isfinite(out).all()
    assert torch.all(cam[0] == 0) and torch.all(cam[1] == 0) and torch.all(cam[~kpm] == 0)
    assert torch.all(mask[:3] == 1), "flat / fully padded / patch-less rows must keep mask 1"
    assert torch.equal(out[:3], case["image_embeds"][:3])
    assert torch.all(mask[3, ~kpm[3]] == 1) and mask[3, 0] == 1
    valid = kpm[3].clone()
    valid[0] = False
    tol = 1e-6 if dtype != torch.float64 else 1e-13
    assert abs(float(mask[3, valid].min()) - floor) <= tol and abs(float(mask[3, valid].max()) - 1.0) <= tol
    assert_close(mask, truth["mask"], dtype=acc(dtype), name="mask")


# --------------------------------------------------------------------------- soft_mask_from_cam


@pytest.mark.parametrize("cam_dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_soft_mask_from_cam_by_hand(cam_dtype):
    cam = torch.tensor([[7.0, 1.0, 3.0, 5.0], [2.0, 2.0, 2.0, 2.0], [0.0, 4.0, 2.0, 0.0]], dtype=cam_dtype)
    mask = softmask.soft_mask_from_cam(cam, floor=0.3)
    assert mask.dtype == acc(cam_dtype)
    expected = torch.tensor([[1.0, 1.0, 0.65, 0.3], [1.0, 1.0, 1.0, 1.0], [1.0, 0.3, 0.65, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(mask.double(), expected, rtol=0, atol=1e-6)
    kpm = torch.tensor([[True, True, True, False], [True] * 4, [True, False, True, True]])
    mask = softmask.soft_mask_from_cam(cam, key_padding_mask=kpm, floor=0.0)
    expected = torch.tensor([[1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(mask.double(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("floor", [0.0, 0.3])
def test_soft_mask_from_cam_random(floor):
    case = make_case(3, 2, 4, 50, 8, 4, torch.float64, padded=True, seed=5)
    cam = eager_truth(case)["cam"]
    kpm = case["key_padding_mask"]
    mask = softmask.soft_mask_from_cam(cam, key_padding_mask=kpm, floor=floor)
    assert_close(mask, truth_mask(cam, kpm, floor), dtype=torch.float64, name="mask")
    assert_close(ref.soft_mask_from_cam_reference(cam, key_padding_mask=kpm, floor=floor), truth_mask(cam, kpm, floor),
                 dtype=torch.float64, name="reference mask")


# --------------------------------------------------------------------------- bad input


def _base():
    return make_case(2, 3, 4, 9, 8, 5, torch.float32, padded=True, seed=7)


def _call(**over):
    c = _base()
    c.update(over)
    kw = {k: c.pop(k) for k in list(c) if k in ("key_padding_mask", "scale", "floor", "backend")}
    return softmask.text_driven_soft_mask(c["image_embeds"], c["query"], c["key"], c["value"], c["grad_context"],
                                          c["word_index"], **kw)


BAD = [
    (dict(query=torch.randn(2, 3, 4)), ValueError, r"query: expected a 4-D tensor"),
    (dict(key=torch.randn(2, 3, 9, 8, 1)), ValueError, r"key: expected a 4-D tensor"),
    (dict(image_embeds=torch.randn(2, 9)), ValueError, r"image_embeds: expected a 3-D tensor"),
    (dict(key=torch.randn(3, 3, 9, 8)), ValueError, r"key: expected size 2 at dim 0 \(B"),
    (dict(value=torch.randn(2, 2, 9, 8)), ValueError, r"value: expected size 3 at dim 1 \(H"),
    (dict(value=torch.randn(2, 3, 8, 8)), ValueError, r"value: expected size 9 at dim 2 \(N"),
    (dict(key=torch.randn(2, 3, 9, 6)), ValueError, r"key: expected size 8 at dim 3 \(dh"),
    (dict(grad_context=torch.randn(2, 3, 5, 8)), ValueError, r"grad_context: expected the shape of query"),
    (dict(image_embeds=torch.randn(2, 10, 5)), ValueError, r"image_embeds: expected size 9 at dim 1 \(N"),
    (dict(image_embeds=torch.randn(3, 9, 5)), ValueError, r"image_embeds: expected size 2 at dim 0 \(B"),
    (dict(query=torch.randn(2, 3, 4, 8, dtype=torch.float64)), TypeError, r"key: expected dtype float64"),
    (dict(value=torch.randn(2, 3, 9, 8, dtype=torch.float16)), TypeError, r"value: expected dtype float32"),
    (dict(query=torch.ones(2, 3, 4, 8, dtype=torch.int32)), TypeError, r"query: expected dtype in"),
    (dict(key=[[1.0]]), TypeError, r"key: expected a torch.Tensor"),
    (dict(word_index=torch.tensor([0.0, 1.0])), TypeError, r"word_index: expected an integer dtype"),
    (dict(word_index=[0, 1]), TypeError, r"word_index: expected an integer torch.Tensor"),
    (dict(word_index=torch.tensor([0, 1, 2])), ValueError, r"word_index: expected shape \(2,\)"),
    (dict(word_index=torch.tensor([0, 4])), IndexError, r"word_index: values must lie in \[0, 4\).*got 4"),
    (dict(word_index=torch.tensor([-1, 0])), IndexError, r"word_index: .*got -1"),
    (dict(key_padding_mask=torch.ones(2, 9)), TypeError, r"key_padding_mask: expected dtype in \(bool\)"),
    (dict(key_padding_mask=torch.ones(2, 8, dtype=torch.bool)), ValueError, r"key_padding_mask: expected shape \(2, 9\)"),
    (dict(floor=1.5), ValueError, r"floor: expected a value in \[0.0, 1.0\], got 1.5"),
    (dict(floor=-0.1), ValueError, r"floor: expected a value in"),
    (dict(floor="0.3"), TypeError, r"floor: expected a Python float"),
    (dict(scale=float("nan")), ValueError, r"scale: expected a finite number"),
    (dict(scale=torch.tensor(0.1)), TypeError, r"scale: expected a Python float or None"),
    (dict(backend="cuda"), ValueError, r"backend: expected one of"),
    (dict(query=torch.randn(2, 0, 4, 8), key=torch.randn(2, 0, 9, 8), value=torch.randn(2, 0, 9, 8),
          grad_context=torch.randn(2, 0, 4, 8)), ValueError, r"H must be positive"),
]


@pytest.mark.parametrize("over,exc,match", BAD, ids=[f"{i}-{e.__name__}" for i, (_, e, _m) in enumerate(BAD)])
def test_bad_input(over, exc, match):
    with pytest.raises(exc, match=match):
        _call(**over)


def test_bad_input_other_entry_points():
    c = _base()
    with pytest.raises(IndexError, match=r"word_index"):
        softmask.word_gradcam(c["query"], c["key"], c["value"], c["grad_context"], torch.tensor([1, 7]))
    with pytest.raises(ValueError, match=r"attn_grads: expected the shape of attn_probs"):
        softmask.word_gradcam_from_probs(torch.rand(2, 3, 4, 9), torch.rand(2, 3, 4, 8), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match=r"attn_grads: expected dtype float32"):
        softmask.word_gradcam_from_probs(torch.rand(2, 3, 4, 9), torch.rand(2, 3, 4, 9).double(), torch.tensor([0, 1]))
    with pytest.raises(IndexError, match=r"word_index: values must lie in \[0, 4\)"):
        softmask.word_gradcam_from_probs(torch.rand(2, 3, 4, 9), torch.rand(2, 3, 4, 9), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"cam: expected a 2-D tensor"):
        softmask.soft_mask_from_cam(torch.rand(2, 3, 4))
    with pytest.raises(ValueError, match=r"floor: expected a value in"):
        softmask.soft_mask_from_cam(torch.rand(2, 3), floor=2.0)
    with pytest.raises(ValueError, match=r"backend: expected one of"):
        softmask.word_gradcam(c["query"], c["key"], c["value"], c["grad_context"], c["word_index"], backend="fast")
    if not CUDA:
        meta = c["image_embeds"].to("meta")
        with pytest.raises(ValueError, match=r"image_embeds: expected device cpu"):
            _call(image_embeds=meta)


def test_triton_kernel_never_reads_a_bad_index(monkeypatch):
    """Under torch.compile the host range check is skipped; the kernel then poisons the
    sample (NaN) instead of reading out of bounds, and the other samples stay exact.
    Outputs start finite here (not NaN-poisoned), so the NaN must come from the kernel."""
    monkeypatch.setattr(kernels, "_alloc", lambda shape, dtype, device: torch.full(shape, 7.0, dtype=dtype,
                                                                                   device=device))
    c = _base()
    w = torch.tensor([1, 99])
    cam, mask = kernels.word_gradcam_forward(c["query"], c["key"], c["value"], c["grad_context"], w,
                                             c["key_padding_mask"], 8 ** -0.5, 0.25)
    assert torch.isnan(cam[1]).all() and torch.isnan(mask[1]).all()
    good = {**c, "word_index": torch.tensor([1, 0])}
    truth = eager_truth(good, floor=0.25)
    assert_close(cam[0], truth["cam"][0], dtype=torch.float32, name="cam of the good sample")
    assert_close(mask[0], truth["mask"][0], dtype=torch.float32, name="mask of the good sample")
    probs = truth["probs"].float()
    cam_p = kernels.word_gradcam_from_probs_forward(probs, truth["grads"].float(), w)
    assert torch.isnan(cam_p[1]).all()
    assert_close(cam_p[0], truth["cam"][0], dtype=torch.float32, name="cam from probs of the good sample")


# --------------------------------------------------------------------------- other dtypes / registration


def test_image_embeds_dtype_may_differ():
    """float32 embeddings next to float16 attention: the output stays float32 and equals
    the embeddings times the float64 truth's mask (float32 accuracy), and its gradient
    is the upstream gradient times that mask."""
    c = make_case(2, 2, 3, 20, 8, 6, torch.float16, padded=True, seed=9)
    truth = eager_truth(c, floor=0.2)
    x32 = c["image_embeds"].float()
    g = torch.randn(x32.shape, generator=torch.Generator().manual_seed(3))
    for backend in BACKENDS:
        x = x32.clone().requires_grad_(True)
        out, mask = softmask.text_driven_soft_mask(x, c["query"], c["key"], c["value"], c["grad_context"],
                                                   c["word_index"], key_padding_mask=c["key_padding_mask"],
                                                   floor=0.2, backend=backend)
        assert out.dtype == torch.float32 and mask.dtype == torch.float32, backend
        assert_close(mask, truth["mask"], dtype=torch.float32, name=f"{backend} mask")
        assert_close(out, x32.double() * truth["mask"][..., None], dtype=torch.float32, name=f"{backend} out")
        out.backward(g)
        assert_close(x.grad, g.double() * truth["mask"][..., None], dtype=torch.float32, name=f"{backend} d x")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend):
    from softmask.ops import soft_mask as ops

    c = make_case(2, 2, 3, 12, 8, 4, torch.float32, padded=True, seed=4)
    args = (c["query"], c["key"], c["value"], c["grad_context"], c["word_index"], c["key_padding_mask"], 0.3, 0.2,
            backend)
    torch.library.opcheck(ops._word_gradcam_mask_op, args)
    _, mask = ops._word_gradcam_mask_op(*args)
    torch.library.opcheck(ops._apply_soft_mask_op, (c["image_embeds"].requires_grad_(True), mask, backend))
    torch.library.opcheck(ops._word_gradcam_from_probs_op, (torch.rand(2, 2, 3, 12), torch.randn(2, 2, 3, 12),
                                                            c["word_index"], backend))


def test_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) through text_driven_soft_mask and its backward (auto:
    the torch backend on CPU, triton on CUDA)."""
    device = "cuda" if CUDA else "cpu"
    c = make_case(2, 3, 4, 33, 16, 8, torch.float32, padded=True, seed=2, device=device)

    def step(x, q, k, v, g, w, kpm):
        out, mask = softmask.text_driven_soft_mask(x, q, k, v, g, w, key_padding_mask=kpm, floor=0.25)
        return out.square().sum(), mask

    x = c["image_embeds"].clone().requires_grad_(True)
    args = (c["query"], c["key"], c["value"], c["grad_context"], c["word_index"], c["key_padding_mask"])
    torch._dynamo.reset()
    loss, mask = torch.compile(step, fullgraph=True)(x, *args)
    loss.backward()
    x_eager = c["image_embeds"].clone().requires_grad_(True)
    loss_e, mask_e = step(x_eager, *args)
    loss_e.backward()
    torch.testing.assert_close(mask, mask_e)
    torch.testing.assert_close(loss, loss_e)
    torch.testing.assert_close(x.grad, x_eager.grad)


@pytest.mark.skipif(not ptxas_available(), reason="needs Triton's bundled ptxas")
def test_kernels_compile_for_sm90():
    """The kernels the interpreter checks also lower to sm_90 code (bf16 and fp64, both
    branches of the head kernel). Run in a subprocess: compiling needs the interpreter off."""
    script = textwrap.dedent("""
        from tests.helpers import compile_for_gpu
        from softmask.kernels import soft_mask as K
        strides = lambda names: {n: "i32" for n in names}
        for ty in ("bf16", "fp64"):
            acc = "fp64" if ty == "fp64" else "fp32"
            head = dict(q_ptr="*" + ty, k_ptr="*" + ty, v_ptr="*" + ty, g_ptr="*" + ty, w_ptr="*i64",
                        kpm_ptr="*i8", contrib_ptr="*" + acc, H="i32", T="i32", N="i32", DH="i32",
                        scale_hi="fp32", scale_lo="fp32",
                        **strides(["stride_qb", "stride_qh", "stride_qt", "stride_gb", "stride_gh", "stride_gt",
                                   "stride_kb", "stride_kh", "stride_kn", "stride_vb", "stride_vh", "stride_vn",
                                   "stride_mb"]))
            for single in (True, False):
                compile_for_gpu(K._head_cam_kernel, head, dict(stride_qd=1, stride_gd=1, stride_kd=1, stride_vd=1,
                                stride_mn=1, HAS_KPM=True, SINGLE=single, BLOCK_N=64, BLOCK_D=64), num_warps=8)
                compile_for_gpu(K._cam_mask_kernel, dict(contrib_ptr="*" + acc, kpm_ptr="*i8", cam_ptr="*" + acc,
                                mask_ptr="*" + acc, H="i32", N="i32", omf_hi="fp32", omf_lo="fp32",
                                stride_mb="i32"), dict(stride_mn=1, HAS_KPM=True, SINGLE=single, BLOCK_N=1024))
            compile_for_gpu(K._scale_rows_kernel, dict(x_ptr="*" + ty, mask_ptr="*" + acc, out_ptr="*" + ty,
                            N="i32", D="i32", stride_xb="i32", stride_xn="i32", stride_ob="i32", stride_on="i32"),
                            dict(stride_xd=1, BLOCK_R=16, BLOCK_D=256))
            compile_for_gpu(K._probs_cam_kernel, dict(p_ptr="*" + ty, g_ptr="*" + ty, w_ptr="*i64",
                            cam_ptr="*" + acc, H="i32", T="i32", N="i32",
                            **strides(["stride_pb", "stride_ph", "stride_pt", "stride_gb", "stride_gh",
                                       "stride_gt"])), dict(stride_pn=1, stride_gn=1, BLOCK_N=1024))
        print("compiled")
    """)
    env = dict(os.environ, TRITON_INTERPRET="0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]


# --------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="compiled Triton kernels need a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", [(8, 12, 30, 257, 64, 768), (4, 12, 40, 577, 64, 768), (3, 5, 7, 1100, 24, 40)],
                         ids=["albef", "large", "odd"])
def test_compiled_triton_on_gpu(dtype, shape):
    B, H, T, N, dh, D = shape
    case = make_case(B, H, T, N, dh, D, dtype, padded=True, layout="bthd", seed=N, device="cuda")
    kpm = case["key_padding_mask"]
    truth = eager_truth(case, floor=0.3)
    ad = acc(dtype)
    with torch.no_grad():
        ref_cam = ref.word_gradcam_reference(case["query"], case["key"], case["value"], case["grad_context"],
                                             case["word_index"], key_padding_mask=kpm)
        ref_mask = ref.soft_mask_from_cam_reference(ref_cam, key_padding_mask=kpm, floor=0.3)
    x = case["image_embeds"].detach().requires_grad_(True)
    out, mask = softmask.text_driven_soft_mask(x, case["query"], case["key"], case["value"], case["grad_context"],
                                               case["word_index"], key_padding_mask=kpm, floor=0.3, backend="triton")
    assert_close(mask, truth["mask"], dtype=ad, same_dtype_ref=ref_mask, name="mask")
    assert_close(out, truth["out"], dtype=dtype, same_dtype_ref=case["image_embeds"] * ref_mask.to(dtype)[..., None],
                 name="masked_embeds")
    g = torch.randn_like(out)
    out.backward(g)
    assert_close(x.grad, g.double().cpu() * truth["mask"][..., None], dtype=dtype,
                 same_dtype_ref=g * ref_mask.to(dtype)[..., None], name="d image_embeds")
