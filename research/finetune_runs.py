"""Retrieval fine-tuning of the pretrained tiny shapes runs, with and without positive ids.

    python -m research.finetune_runs [--jobs 2] [--variants ids no_ids] [--out-root DIR]
    python -m research.finetune_runs --render     # the table from the committed rows only

For every pretrained run (``--pretrained DIR:SEED``, default: the three pretrained default-config runs of
seeds 0, 1 and 2) it re-evaluates the pretrained model with the current evaluation code (variant
``pretrained``), then runs ``softmask-finetune --checkpoint DIR --seed SEED --threads 1`` per variant
(``ids``: the default, ``no_ids``: ``--no-ids``) and appends one row per finished run to the results file
(default ``bench_results/finetune/finetune.json``), with the fine-tuned ``eval.json`` metrics and, as
``pre_*``, those of the pretrained run's own ``eval.json``. Rows already there are skipped, so an
interrupted measurement resumes where it stopped. ``--jobs 2`` runs two at a time. The table (each run,
and the mean over seeds) is rendered into ``bench_results/finetune/README.md``.

The fine-tuning seed is the pretraining seed, so that the 256 held-out shapes pairs (a function of the
seed) are the ones the pretrained run was evaluated on.

The learning-rate check of the defaults (``lr_sweep.json``) fine-tunes the seed-0 run with seed 3, so
that it trains on the seed-3 training split and is scored on the seed-3 held-out pairs, none of the three
sets the table reports::

    python -m research.finetune_runs --pretrained /work/exp/default_seed0:3 \
        --variants pretrained ids --extra '--lr 5e-5' '' '--lr 2e-4' --out-root /work/exp/finetune_sweep \
        --results bench_results/finetune/lr_sweep.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join("bench_results", "finetune")
PRETRAINED = ("/work/exp/default_seed0:0", "/work/exp/s_reg4_1:1", "/work/exp/s_reg4_2:2")
VARIANTS = {"ids": [], "no_ids": ["--no-ids"]}
METRICS = ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "r_mean", "itc_tr_r1", "itc_ir_r1")


def _load(path: str) -> list:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)


def _save(path: str, rows: list) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(rows, f, indent=1)
    os.replace(tmp, path)


def _commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return r.stdout.strip()


def _run(cmd: list, log: str) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    t0 = time.time()
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with status {r.returncode}; see {log}")
    return time.time() - t0


def run_one(pre: str, seed: int, variant: str, out_root: str, extra: list) -> dict:
    name = f"{os.path.basename(pre)}__{variant}" + "".join(f"_{x.lstrip('-')}" for x in extra)
    out = os.path.join(out_root, name)
    with open(os.path.join(pre, "eval.json")) as f:
        pre_ev = json.load(f)
    row = {"pretrained": pre, "seed": seed, "variant": variant, "extra": extra,
           **{f"pre_{k}": pre_ev[k] for k in METRICS}}
    if variant == "pretrained":  # the pretrained model, evaluated again with this code
        os.makedirs(out, exist_ok=True)
        wall = _run([sys.executable, "-m", "softmask.eval", "--checkpoint", pre, "--seed", str(seed), "--out", out,
                     "--no-plots"], os.path.join(out_root, name + ".log"))
    else:
        cmd = [sys.executable, "-m", "softmask.train.finetune", "--checkpoint", pre, "--seed", str(seed), "--out",
               out, "--threads", "1", "--no-progress", *VARIANTS[variant], *extra]
        wall = _run(cmd, os.path.join(out_root, name + ".log"))
        with open(os.path.join(out, "config.json")) as f:
            t = json.load(f)["train"]
        row.update(steps=t["steps"], lr=t["lr"], batch_size=t["batch_size"], use_ids=t["use_ids"])
    with open(os.path.join(out, "eval.json")) as f:
        ev = json.load(f)
    row.update({k: ev[k] for k in METRICS}, wall_s=round(wall, 1), out=out, commit=_commit())
    return row


def _key(row: dict) -> tuple:
    return row["pretrained"], row["seed"], row["variant"], tuple(row.get("extra", []))


def render_sweep(rows: list) -> list:
    """Lines of the learning-rate check (``lr_sweep.json``)."""
    if not rows:
        return []
    cols = ("tr_r1", "tr_r5", "ir_r1", "ir_r5", "r_mean")
    lines = ["", "## Learning-rate check of the defaults", "",
             "`lr_sweep.json`: the seed-0 run fine-tuned with `--seed 3` (trained on the seed-3 training split,",
             "scored on the seed-3 held-out pairs, none of the sets above), with ids, 300 steps; `pretrained`: the",
             "seed-0 run scored on the same pairs (`softmask-eval --seed 3`).", "",
             "| variant | lr | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    def lr_of(r):
        return r.get("lr", "-")
    for r in sorted(rows, key=lambda r: (r["variant"] != "pretrained", r.get("lr", 0))):
        lines.append(f"| {r['variant']} | {lr_of(r)} | " + " | ".join(f"{r[c]:.1f}" for c in cols) + " |")
    return lines


def render(rows: list, path: str) -> str:
    order = ("pretrained", "ids", "no_ids")
    cols = ("tr_r1", "tr_r5", "ir_r1", "ir_r5", "r_mean")
    lines = ["# Retrieval fine-tuning of the tiny shapes model", "",
             "Written by `python -m research.finetune_runs --render` from `finetune.json`. Recall in % on",
             "the 256 held-out shapes pairs of each seed (ITC ranking, ITM rerank of the top 16). `pretrained`: the",
             "pretrained run evaluated again with this code (its own `eval.json` gives the `pre_*` fields of every row);",
             "`ids` / `no_ids`: `softmask-finetune --checkpoint RUN --seed SEED --threads 1` with its defaults, with and",
             "without `--no-ids`.", "",
             "| run | seed | variant | " + " | ".join(cols) + " | wall s |",
             "|---|---|---|" + "---|" * len(cols) + "---|"]
    main = [r for r in rows if not r.get("extra")]
    for r in sorted(main, key=lambda r: (r["seed"], order.index(r["variant"]) if r["variant"] in order else 9)):
        lines.append(f"| {os.path.basename(r['pretrained'])} | {r['seed']} | {r['variant']} | "
                     + " | ".join(f"{r[c]:.1f}" for c in cols) + f" | {r['wall_s']:.0f} |")
    lines += ["", "Mean over seeds (n = number of seeds):", "",
              "| variant | n | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for v in order:
        sel = [r for r in main if r["variant"] == v]
        if sel:
            lines.append(f"| {v} | {len(sel)} | " + " | ".join(f"{sum(r[c] for r in sel) / len(sel):.1f}" for c in cols)
                         + " |")
    pre_own = {r["seed"]: r for r in main}
    if pre_own:
        lines += ["", "The pretrained runs' own `eval.json` (`pre_*`), mean over seeds: "
                  + ", ".join(f"{c} {sum(r['pre_' + c] for r in pre_own.values()) / len(pre_own):.1f}" for c in cols)
                  + "."]
    lines += render_sweep(_load(os.path.join(os.path.dirname(path), "lr_sweep.json")))
    text = "\n".join(lines) + "\n"
    with open(path, "w") as f:
        f.write(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pretrained", nargs="+", default=list(PRETRAINED), help="DIR:SEED of each pretrained run")
    p.add_argument("--variants", nargs="+", default=["pretrained", "ids", "no_ids"])
    p.add_argument("--extra", nargs="+", default=[""],
                   help="more softmask-finetune flags, one string per setting to run (rows keep them), e.g. "
                   "--extra '--lr 5e-5' '--lr 2e-4'")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out-root", default="/work/exp/finetune")
    p.add_argument("--results", default=os.path.join(HERE, "finetune.json"))
    p.add_argument("--render", action="store_true")
    a = p.parse_args(argv)
    os.chdir(ROOT)
    rows = _load(a.results)
    if a.render:
        print(render(rows, os.path.join(HERE, "README.md")))
        return 0
    os.makedirs(a.out_root, exist_ok=True)
    todo = []
    for spec in a.pretrained:
        pre, seed = spec.rsplit(":", 1)
        for v in a.variants:
            if v != "pretrained" and v not in VARIANTS:
                raise SystemExit(f"--variants: unknown {v!r}")
            for extra in ([""] if v == "pretrained" else a.extra):
                job = (pre, int(seed), v, extra.split())
                if any(_key(r) == (pre, int(seed), v, tuple(job[3])) for r in rows) or job in todo:
                    print(f"skip {job} (in {a.results})")
                    continue
                todo.append(job)

    def work(job):
        pre, seed, v, ex = job
        return run_one(pre, seed, v, a.out_root, ex)

    if not todo:
        print("nothing to run")

    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        for row in pool.map(work, todo):
            rows = _load(a.results) + [row]
            _save(a.results, rows)
            print(f"done {row['pretrained']} seed {row['seed']} {row['variant']}: "
                  + ", ".join(f"{k} {row[k]:.1f}" for k in ("tr_r1", "ir_r1", "r_mean")), flush=True)
    if a.results == os.path.join(HERE, "finetune.json"):
        render(_load(a.results), os.path.join(HERE, "README.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
