"""open_clip's own trainer with the focal loss: ``python -m softmask.open_clip_train``
runs ``open_clip_train.main`` on a small CSV data set of images and distinct captions
that the test writes, with a small model, on the CPU in one process (open_clip wraps DDP
with ``device_ids``, which fails on a CPU; the multi-process check is the loss-level one of
tests/test_focal_clip.py). At ``--focal-gamma 0`` it logs the losses of the same run with
open_clip's ClipLoss; at ``--focal-gamma 2`` it trains and logs other, finite losses."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("open_clip_train.main")
from PIL import Image  # noqa: E402  (open_clip's trainer needs PIL, checked above)

STEPS = 3
BATCH = 4
# A model small enough for seconds on a CPU: one layer per tower, width 32, 32x32 images.
MODEL_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
LOSS_RE = re.compile(r"Contrastive_loss: ([-+0-9.eE]+) ")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("open_clip_data")
    g = torch.Generator().manual_seed(0)
    colours = ["red", "green", "blue", "yellow"]
    shapes = ["square", "circle", "triangle"]
    rows = []
    for i in range(STEPS * BATCH):
        pixels = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
        path = root / f"img{i}.png"
        Image.fromarray(pixels).save(path)
        rows.append(f"{path}\ta {colours[i % 4]} {shapes[i % 3]} number {i}")
    csv = root / "train.csv"
    csv.write_text("filepath\ttitle\n" + "\n".join(rows) + "\n")
    model_dir = root / "tiny_clip"
    model_dir.mkdir()
    (model_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": MODEL_CFG}))
    return csv, model_dir


def _train(tmp_path, data, name, module, extra=(), launcher=()):
    csv, model_dir = data
    logs = tmp_path / "logs"
    cmd = [sys.executable, *launcher, "-m", module, *(["--"] if launcher else []), "--train-data", str(csv), "--dataset-type", "csv", "--model",
           f"local-dir:{model_dir}", "--batch-size", str(BATCH), "--epochs", "1", "--workers", "0", "--device", "cpu",
           "--precision", "fp32", "--lr", "1e-3", "--warmup", "1", "--seed", "0", "--log-every-n-steps", "1",
           "--save-frequency", "0", "--logs", str(logs), "--name", name, *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    log = (logs / name / "out.log").read_text()
    losses = [float(x) for x in LOSS_RE.findall(log)]
    assert len(losses) == STEPS, f"expected {STEPS} logged losses, got {losses}\n{log[-2000:]}"
    return losses


def test_open_clip_trainer_with_focal_loss(tmp_path, data):
    base = _train(tmp_path, data, "clip_loss", "open_clip_train.main")
    same = _train(tmp_path, data, "focal_0", "softmask.open_clip_train", ["--focal-gamma", "0"])
    focal = _train(tmp_path, data, "focal_2", "softmask.open_clip_train", ["--focal-gamma", "2"])
    assert all(math.isfinite(x) for x in base + focal)
    # The log prints 5 significant digits (#.5g): equal to its rounding.
    for a, b in zip(base, same):
        assert abs(a - b) <= 1e-4 * abs(a), f"gamma 0: {same} logged, ClipLoss {base}"
    assert all(abs(a - b) > 1e-3 * abs(a) for a, b in zip(base, focal)), f"gamma 2 logged {focal}, ClipLoss {base}"
    # a batch of 4 with random weights: the plain loss is near ln 4, the focal one below it
    assert all(0 < f < b for f, b in zip(focal, base)), (focal, base)


def test_under_torchrun(tmp_path, data):
    """``torchrun ... -m softmask.open_clip_train -- <flags>`` (one process on the CPU): the
    ``--`` keeps torchrun's parser off the trainer's flags (``--logs`` is ambiguous to it
    under Python 3.11), and the run logs the losses of the same run without torchrun."""
    base = _train(tmp_path, data, "plain", "softmask.open_clip_train", ["--focal-gamma", "2"])
    run = _train(tmp_path, data, "torchrun", "softmask.open_clip_train", ["--focal-gamma", "2"],
                 launcher=["-m", "torch.distributed.run", "--nproc_per_node", "1"])
    assert run == base, (run, base)


def test_launcher_refuses_other_losses(tmp_path, data):
    csv, model_dir = data
    cmd = [sys.executable, "-m", "softmask.open_clip_train", "--", "--train-data", str(csv), "--dataset-type", "csv",
           "--model", f"local-dir:{model_dir}", "--batch-size", str(BATCH), "--epochs", "1", "--workers", "0",
           "--device", "cpu", "--precision", "fp32", "--siglip", "--logs", str(tmp_path / "logs"), "--name", "siglip",
           "--focal-gamma", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "--focal-gamma: expected a run that trains with open_clip's ClipLoss, got SigLipLoss" in proc.stderr


def test_launcher_needs_gamma():
    proc = subprocess.run([sys.executable, "-m", "softmask.open_clip_train", "--epochs", "1"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "--focal-gamma" in proc.stderr
