"""Evaluation: retrieval recall@k on hand-made rankings, pointing game, pictures."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from softmask.eval.metrics import (
    image_retrieval_ranks,
    pointing_game,
    pointing_game_hits,
    retrieval_metrics,
    text_retrieval_ranks,
)
from softmask.eval.plots import plot_gradcam_overlays, plot_loss_curves


def _rotated_scores(ranks):
    """[N, N] scores whose row i ranks column i at exactly ranks[i] (0-based), no ties."""
    n = len(ranks)
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    return -((j - i + torch.tensor(ranks)[:, None]) % n).double()


def _albef_itm_eval(scores_i2t, img2txt, txt2img):
    """ALBEF's itm_eval (numpy argsort loops), valid when no scores tie."""
    s = scores_i2t.numpy()
    tr = []
    for i, row in enumerate(s):
        inds = np.argsort(row)[::-1]
        tr.append(min(np.where(inds == t)[0][0] for t in img2txt[i]))
    ir = []
    for t, col in enumerate(s.T):
        inds = np.argsort(col)[::-1]
        ir.append(np.where(inds == txt2img[t])[0][0])
    tr, ir = np.array(tr), np.array(ir)
    return {f"{n}_r{k}": 100.0 * (r < k).mean() for n, r in (("tr", tr), ("ir", ir)) for k in (1, 5, 10)}


def test_identity_scores_give_100():
    n = 7
    m = retrieval_metrics(torch.eye(n), [[i] for i in range(n)], list(range(n)))
    for k in ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "tr_mean", "ir_mean", "r_mean"):
        assert m[k] == 100.0 and isinstance(m[k], float)


def test_text_retrieval_known_ranks():
    ranks = [0, 0, 0, 1, 2, 4, 5, 9, 11, 3, 10, 6]
    s = _rotated_scores(ranks)
    n = len(ranks)
    assert text_retrieval_ranks(s, [[i] for i in range(n)]).tolist() == ranks
    m = retrieval_metrics(s, [[i] for i in range(n)], list(range(n)))
    assert m["tr_r1"] == pytest.approx(100 * 3 / 12)
    assert m["tr_r5"] == pytest.approx(100 * 7 / 12)  # ranks 0,0,0,1,2,4,3
    assert m["tr_r10"] == pytest.approx(100 * 10 / 12)  # all but 11 and 10
    assert m["tr_mean"] == pytest.approx((3 + 7 + 10) / 3 / 12 * 100)


def test_image_retrieval_known_ranks():
    ranks = [1, 0, 7, 3, 12, 5, 0, 2, 9, 10, 4, 6, 8]
    s = _rotated_scores(ranks).t()  # scores_i2t; its transpose ranks image t at ranks[t]
    n = len(ranks)
    assert image_retrieval_ranks(s, list(range(n))).tolist() == ranks
    m = retrieval_metrics(s, [[i] for i in range(n)], list(range(n)))
    assert m["ir_r1"] == pytest.approx(100 * 2 / 13)
    assert m["ir_r5"] == pytest.approx(100 * 6 / 13)
    assert m["ir_r10"] == pytest.approx(100 * 11 / 13)  # all but 12 and 10
    assert m["r_mean"] == pytest.approx((m["tr_mean"] + m["ir_mean"]) / 2)


def test_several_texts_per_image_best_gt_counts():
    # 3 images, 2 captions each; image 0's gts rank 3rd and 1st -> rank 0,
    # image 1's gts rank 2nd and 5th -> rank 1, image 2's rank 6th and 4th -> rank 3.
    img2txt = [[0, 1], [2, 3], [4, 5]]
    txt2img = [0, 0, 1, 1, 2, 2]
    order = {0: [1, 4, 0, 2, 3, 5], 1: [5, 2, 0, 1, 3, 4], 2: [0, 1, 3, 5, 2, 4]}
    s = torch.zeros(3, 6)
    for i, o in order.items():
        for pos, t in enumerate(o):
            s[i, t] = 10.0 - pos
    assert text_retrieval_ranks(s, img2txt).tolist() == [0, 1, 3]
    m = retrieval_metrics(s, img2txt, txt2img)
    assert m["tr_r1"] == pytest.approx(100 / 3) and m["tr_r5"] == 100.0
    # image retrieval from the same matrix, by hand: column t's gt image rank, with
    # ties counted against the gt (columns 0, 3 and 4 hold ties)
    expect_ir = [2, 0, 0, 2, 2, 1]
    assert image_retrieval_ranks(s, txt2img).tolist() == expect_ir
    assert m["ir_r1"] == pytest.approx(100 * sum(r == 0 for r in expect_ir) / 6)


@pytest.mark.parametrize("ni, per_image", [(37, 1), (23, 5)])
def test_matches_albef_itm_eval_on_random_scores(ni, per_image):
    g = torch.Generator().manual_seed(ni)
    nt = ni * per_image
    s = torch.randn(ni, nt, generator=g, dtype=torch.float64)
    txt2img = torch.randperm(nt, generator=g).remainder(ni).tolist()
    img2txt = [[t for t in range(nt) if txt2img[t] == i] for i in range(ni)]
    # make the task non-trivial but not random: boost the ground-truth pairs
    s[torch.tensor(txt2img), torch.arange(nt)] += 1.5
    ours = retrieval_metrics(s, img2txt, txt2img)
    ref = _albef_itm_eval(s, img2txt, txt2img)
    for k, v in ref.items():
        assert ours[k] == pytest.approx(v), k
    assert 0 < ours["tr_r1"] < 100 and 0 < ours["ir_r1"] < 100


def test_ties_count_against_ground_truth():
    n = 8
    m = retrieval_metrics(torch.zeros(n, n), [[i] for i in range(n)], list(range(n)))
    # every gt ties with 7 others -> rank 7: outside top 1 and top 5, inside top 10
    assert m["tr_r1"] == 0.0 and m["tr_r5"] == 0.0 and m["tr_r10"] == 100.0
    assert m["ir_r1"] == 0.0 and m["ir_r5"] == 0.0 and m["ir_r10"] == 100.0


def test_retrieval_bad_inputs():
    s = torch.eye(3)
    with pytest.raises(ValueError, match="img2txt"):
        retrieval_metrics(s, [[0], [1]], [0, 1, 2])
    with pytest.raises(ValueError, match=r"img2txt\[1\]"):
        retrieval_metrics(s, [[0], [], [2]], [0, 1, 2])
    with pytest.raises(ValueError, match="txt2img"):
        retrieval_metrics(s, [[0], [1], [2]], [0, 1, 3])
    with pytest.raises(ValueError, match="scores_i2t"):
        retrieval_metrics(torch.ones(3), [[0]], [0])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.full((2, 2), float("nan")), [[0], [1]], [0, 1])
    with pytest.raises(TypeError, match="scores_i2t"):
        retrieval_metrics(np.eye(2), [[0], [1]], [0, 1])


# ---------------------------------------------------------------- pointing game


def _peak(g, r, c, n_other=0.5):
    h = torch.rand(g, g) * n_other
    h[r, c] = 1.0
    return h


def test_pointing_game_hand_made():
    torch.manual_seed(0)
    g, size = 4, 64  # 16-px patches: patch (r, c) centre = (16c + 8, 16r + 8)
    heat = torch.stack([
        _peak(g, 1, 2),  # centre (40, 24)
        _peak(g, 1, 2),
        _peak(g, 3, 0),  # centre (8, 56)
        _peak(g, 0, 3),  # centre (56, 8)
        _peak(g, 2, 2),  # centre (40, 40)
    ])
    boxes = torch.tensor([
        [32.0, 16.0, 48.0, 32.0],  # hit
        [0.0, 0.0, 30.0, 30.0],  # miss (x = 40 > 30)
        [0.0, 50.0, 20.0, 64.0],  # hit
        [56.0, 8.0, 60.0, 12.0],  # hit on the boundary (inclusive)
        [41.0, 30.0, 64.0, 64.0],  # miss by one pixel
    ])
    assert pointing_game_hits(heat, boxes, size).tolist() == [True, False, True, True, False]
    assert pointing_game(heat, boxes, size) == pytest.approx(60.0)
    # the same maps on a different image size scale the centres
    assert pointing_game_hits(heat, boxes * 2, 128).tolist() == [True, False, True, True, False]


def test_pointing_game_flat_map_points_at_first_patch():
    heat = torch.zeros(2, 8, 8)
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0], [10.0, 10.0, 60.0, 60.0]])
    assert pointing_game_hits(heat, boxes, 64).tolist() == [True, False]


def test_pointing_game_bad_inputs():
    with pytest.raises(ValueError, match="heatmaps"):
        pointing_game(torch.rand(2, 4, 5), torch.rand(2, 4), 64)
    with pytest.raises(ValueError, match="boxes"):
        pointing_game(torch.rand(2, 4, 4), torch.rand(3, 4), 64)
    with pytest.raises(ValueError, match="n = 0"):
        pointing_game(torch.rand(0, 4, 4), torch.rand(0, 4), 64)
    with pytest.raises(ValueError, match="image_size"):
        pointing_game(torch.rand(1, 4, 4), torch.rand(1, 4), 0)


# ---------------------------------------------------------------- plots


def _png_size(path):
    assert path.stat().st_size > 1000
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def test_plot_loss_curves(tmp_path):
    p = tmp_path / "metrics.jsonl"
    lines = []
    for step in range(1, 21):
        rec = {"step": step, "loss": 5 / step, "loss_itc": 2 / step, "loss_itm": 0.7, "lr": 1e-4 * step / 20,
               "temperature": 0.07}
        if step % 2:
            rec["loss_mlm"] = 3 / step  # logged on some steps only
        lines.append(json.dumps(rec))
    lines.append('{"step": 21, "loss": ')  # cut by an interrupted run
    p.write_text("\n".join(lines) + "\n")
    out = tmp_path / "plots" / "loss.png"
    assert plot_loss_curves(str(p), str(out)) == str(out)
    w, h = _png_size(out)
    # 6 panels present (loss, itc, itm, mlm, temperature, lr): 4 columns, 2 rows
    assert (w, h) == (4 * 360, 2 * 280)
    # fewer keys -> fewer panels
    q = tmp_path / "m2.jsonl"
    q.write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n" + json.dumps({"step": 2, "loss": 0.5}) + "\n")
    assert _png_size(Path(plot_loss_curves(str(q), str(tmp_path / "l2.png")))) == (360, 280)
    with pytest.raises(FileNotFoundError, match="metrics_jsonl_path"):
        plot_loss_curves(str(tmp_path / "none.jsonl"), str(tmp_path / "x.png"))


def test_plot_gradcam_overlays(tmp_path):
    torch.manual_seed(0)
    n, s, g = 3, 64, 8
    images = torch.rand(n, 3, s, s)
    words = [["circle", "square"], ["triangle"], ["cross", "diamond", "circle"]]
    cams = [torch.rand(len(w), g, g) for w in words]
    boxes = [[[4, 4, 20, 20], None], [[10, 30, 40, 60]], [None, None, [0, 0, 63, 63]]]
    out = tmp_path / "cams.png"
    plot_gradcam_overlays(images, ["a red circle left of a blue square", "a green triangle", "three"], words, cams,
                          str(out), boxes=boxes)
    assert _png_size(out) == (4 * 220, 3 * 250)  # 1 + 3 columns, 3 rows
    # without boxes, and a flat cam, also works
    cams[1] = torch.zeros(1, g, g)
    out2 = tmp_path / "cams2.png"
    plot_gradcam_overlays(images, ["a", "b", "c"], words, cams, str(out2))
    assert _png_size(out2) == (4 * 220, 3 * 250)
    with pytest.raises(ValueError, match=r"cams\[0\]"):
        plot_gradcam_overlays(images, ["a", "b", "c"], words, [torch.rand(1, g, g)] * 3, str(out2))
    with pytest.raises(ValueError, match="images"):
        plot_gradcam_overlays(torch.rand(3, 64, 64), ["a"], [[]], [torch.rand(0, g, g)], str(out2))
