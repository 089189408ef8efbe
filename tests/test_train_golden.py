"""The training loop gives the same losses, bit for bit, as it did before it was split into modules
(``tests/data/golden_losses.json``, written at commit b38eace by this file's ``--write``): pretraining with the
shapes recipe (as it was, every ViT block trained, and as it is, three frozen), pretraining from scratch with
focal ITC and distillation, retrieval fine-tuning with positive ids.

The logged figures are exact on the machine kind they were recorded on (the same torch build and CPU
capability); elsewhere the kernels' instruction choice may round differently, and the check is to 1e-5
relative.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile

import pytest
import torch

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "golden_losses.json")
TINY = dict(batch_size=4, train_size=24, log_every=1, save_every=2, progress=False, run_eval=False, warmup_steps=2,
            queue_size=16, num_workers=0)
CASES = {
    "pretrain_recipe": dict(TINY, steps=4, vision_frozen_blocks=0),  # the recipe before its ViT blocks froze
    "pretrain_recipe_frozen": dict(TINY, steps=4),  # today's recipe: three ViT blocks frozen (recorded at its switch)
    "pretrain_scratch": dict(TINY, steps=3, vit_checkpoint="none", gamma=0.5, alpha=0.4),
    "retrieval_ids": dict(TINY, steps=3, task="retrieval", use_ids=True),
}


def run_case(name: str, out: str) -> dict:
    """``{step: [loss, *LOSS_TERMS, temperature]}`` of case ``name`` trained into ``out``."""
    from softmask.train.loop import LOSS_TERMS, task_config, train

    kw = dict(CASES[name])
    task = kw.pop("task", "pretrain")
    train(task_config(task, out=out, **kw))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {str(r["step"]): [r[k] for k in ("loss",) + LOSS_TERMS] + [r["temperature"]] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def golden():
    with open(GOLDEN) as f:
        return json.load(f)


@pytest.mark.parametrize("name", list(CASES))
def test_losses_match_the_golden_run(name, golden, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the golden run's thread count (reduction order)
    try:
        got = run_case(name, str(tmp_path / name))
    finally:
        torch.set_num_threads(threads)
    want = golden["cases"][name]
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    same_machine = golden["torch"] == torch.__version__ and golden["cpu"] == torch.backends.cpu.get_cpu_capability()
    for step in want:
        for g, w in zip(got[step], want[step]):
            if same_machine:
                assert g == w, (name, step, got[step], want[step])
            else:
                assert math.isclose(g, w, rel_tol=1e-5, abs_tol=1e-7), (name, step, got[step], want[step])


def _write(names) -> None:
    """Record the cases ``names`` (every case when empty); the others keep their recorded losses."""
    torch.set_num_threads(1)
    with open(GOLDEN) as f:
        old = json.load(f)
    cases = dict(old["cases"]) if names else {}
    for name in names or CASES:
        with tempfile.TemporaryDirectory() as d:
            cases[name] = run_case(name, d)
    with open(GOLDEN, "w") as f:
        json.dump({"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(), "cases": cases,
                   "_about": old.get("_about")}, f, indent=1)


if __name__ == "__main__":
    if sys.argv[1:2] != ["--write"] or any(n not in CASES for n in sys.argv[2:]):
        sys.exit(f"usage: python -m tests.test_train_golden --write [CASE ...] (cases: {', '.join(CASES)})")
    _write(sys.argv[2:])
