"""FLOPs of one training step of a job, counted with ``torch.utils.flop_counter.FlopCounterMode``.

    python -m research.step_flops [softmask-pretrain flags ...]     # e.g. --steps 600 --batch-size 32

Question: where does a step's work go, and how much does a change of the recipe save? Builds the job's
model and data exactly as ``train()`` does (the flags are ``softmask-pretrain``'s), draws the first batch,
and counts the forward and the backward of that step (matrix products, attention and convolutions: what
the counter sees; elementwise work is not counted). Prints the total, the forward alone, the run's total
over its steps, and the forward FLOPs per top-level module (the momentum copies' forward included). The
optimizer step is not counted (a few FLOPs per parameter). Nothing is written.
"""

from __future__ import annotations

import sys
import tempfile

import torch
from torch.utils.flop_counter import FlopCounterMode


def count(argv=None) -> dict:
    """``{"step", "forward", "total_steps", "run", "modules"}``: GFLOP of one step (forward + backward), of
    its forward, the step count, TFLOP of the whole run, and forward GFLOP per top-level module."""
    from softmask.train import loop as L
    from softmask.train.__main__ import config_from_argv

    with tempfile.TemporaryDirectory() as tmp:
        cfg, _ = config_from_argv(list(argv or []) + ["--out", tmp, "--no-progress", "--no-eval"])
        cfg = cfg.resolved()
        proc = L._start_process(cfg)
        init = L.init_source(cfg)
        mcfg, tokenizer = L._model_settings(cfg, None, init)
        prepared = L.prepare_data(cfg, mcfg.image_size, cfg.out, write=False)
        per_epoch, total_steps = L._run_length(cfg, len(prepared.train), proc.world)
        model, _, _ = L._build_model(cfg, tokenizer, mcfg, init, prepared.notes, proc.device)
        optimizer, scheduler = L._optimizer(cfg, model, total_steps)
        state = L.TrainState()
        log = L.MetricsLog(f"{tmp}/metrics.jsonl", False)
        loop = L._Loop(cfg, proc, model, tokenizer, optimizer, scheduler, state, total_steps, per_epoch,
                       prepared.train, log)
        model.train()
        batch = loop._next_batch()
        state.step = total_steps // 2  # distillation on (alpha > 0), as in most steps
        fwd = FlopCounterMode(display=False)
        with fwd:
            with torch.no_grad():
                loop._forward(batch)
        both = FlopCounterMode(display=False)
        with both:
            losses, _, _, _ = loop._forward(batch)
            losses["loss"].backward()
        loop.stream.close()
    modules = {}
    for name, counts in fwd.get_flop_counts().items():
        parts = name.split(".")
        if len(parts) == 2:  # "Global.<module>" (the counter's root is "Global")
            modules[parts[1]] = sum(counts.values()) / 1e9
    step = both.get_total_flops() / 1e9
    return {"step": step, "forward": fwd.get_total_flops() / 1e9, "total_steps": total_steps,
            "run": step * total_steps / 1e3, "modules": modules}


def main(argv=None) -> int:
    r = count(sys.argv[1:] if argv is None else argv)
    print(f"one step: {r['step']:.2f} GFLOP (forward {r['forward']:.2f}); {r['total_steps']} steps: "
          f"{r['run']:.1f} TFLOP")
    print("forward GFLOP by module (no_grad forward; the backward is about twice a trained module's forward):")
    for k, v in sorted(r["modules"].items(), key=lambda kv: -kv[1]):
        print(f"  {k:28s} {v:7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
