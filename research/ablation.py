"""Ablation of the paper's three parts on the embedded shapes data, at the default job's budget.

    python -m research.ablation [--seeds 0 1 2] [--configs full no_softmask ...] [--jobs 2]
    python -m research.ablation --render          # table and figure from the committed rows only
    python -m research.ablation --suite recipe_800     # the recipe's first version (800 steps)
    python -m research.ablation --suite from_scratch   # the earlier default's ablation (random-init ViT)
    python -m research.ablation --suite partial        # the default's ablation on shapes-partial (partial captions)
    python -m research.ablation --suite longtail       # ... on shapes-longtail (long-tailed training combinations)

Each (config, seed) trains the default job (``TrainConfig()``: tiny preset, 1,200 steps of 33 pairs, the
shapes recipe: the shipped ViT with its first three blocks frozen and local attention on both sides, ITM on the
clean caption, soft masks at floor 0.75) with the config's overrides, evaluates
it on the 256 held-out pairs, and appends one row to ``bench_results/ablation/SUITE/ablation.json`` (a list of
rows with ``config``, ``seed``, ``tr_r1``, ``tr_r5``, ``ir_r1``, ``ir_r5``, ``itc_tr_r1``, ``itc_ir_r1``,
``pointing_game``, ``pointing_game_color``, the ITM probe and the wall time). The file is rewritten
atomically after every finished run and rows already there are skipped, so an interrupted ablation
resumes where it stopped. ``--jobs 2`` trains two runs at once with one intra-op thread each (on the
2-core machine, two one-thread runs finish more steps per second than one two-thread run). The rendered
table (mean +- std over seeds, and ``full`` minus each configuration paired by seed) goes to ``README.md`` and the
figure (the suite's metrics, :data:`KEY_METRICS`, each seed drawn) to ``ablation.png`` beside the rows.

Configurations (``SUITES["recipe"]``, the default job): the full method; without soft
masks; without focal ITC (gamma 0); without multi-modal augmentation (no masked-caption view, no
RandAugment); and the ALBEF baseline with none of the three. ``SUITES["recipe_800"]`` is the same ablation of
the recipe's first version (800 steps, ITM on the masked caption, floor 0.5), rows in
``bench_results/ablation/recipe_800/``. ``SUITES["from_scratch"]`` is the ablation of
the earlier default job, whose ViT started from random weights (``vit_checkpoint="none"``), rows in
``bench_results/ablation/from_scratch/``: there ``full`` and the configurations with soft masks other than
``full_one_pair`` pin ``softmask_pairs="all"``, the default when their rows ran, so that the command
reproduces every row.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

# the default job's ablation: the shapes recipe (TrainConfig's defaults) with one part removed at a time
RECIPE_CONFIGS: dict[str, dict] = {
    "full": {},
    "no_softmask": {"softmask": False},
    "no_focal": {"gamma": 0.0},
    "no_aug": {"text_aug": False, "image_aug": False},
    "albef": {"softmask": False, "gamma": 0.0, "text_aug": False, "image_aug": False},
}
# the earlier default job (random-init ViT, global attention). The configurations with soft masks pin
# softmask_pairs="all" (three soft-masked pairs per row), the default when their rows were run; "full_one_pair" was
# the default job from 2026-12-01 (one pair per row; docs/TRAINING_NOTES.md H12)
_SCRATCH = {"vit_checkpoint": "none"}
FROM_SCRATCH_CONFIGS: dict[str, dict] = {
    "full": {**_SCRATCH, "softmask_pairs": "all"},
    "full_one_pair": {**_SCRATCH, "softmask_pairs": "one"},
    "no_softmask": {**_SCRATCH, "softmask": False},
    "no_focal": {**_SCRATCH, "gamma": 0.0, "softmask_pairs": "all"},
    "no_aug": {**_SCRATCH, "text_aug": False, "image_aug": False, "softmask_pairs": "all"},
    "albef": {**_SCRATCH, "softmask": False, "gamma": 0.0, "text_aug": False, "image_aug": False},
}
# the shapes recipe as it was from 2026-12-02 to 2026-12-02 (third session): 800 steps, ITM on the masked caption,
# soft masks at floor 0.5 (docs/TRAINING_NOTES.md H32-H40); pinned so that the command reproduces its rows
# the recipe at full compute, the default job from 2026-12-02 (third session) to 2026-12-07: every ViT block trained,
# batches of 48 (docs/TRAINING_NOTES.md H40, H45); pinned so that the command reproduces its rows
_RECIPE_1200 = {"vision_frozen_blocks": 0, "batch_size": 48}
RECIPE_1200_CONFIGS: dict[str, dict] = {name: {**_RECIPE_1200, **over} for name, over in RECIPE_CONFIGS.items()}
_RECIPE_800 = {"steps": 800, "itm_text_aug": True, "mask_floor": 0.5, **_RECIPE_1200}
RECIPE_800_CONFIGS: dict[str, dict] = {name: {**_RECIPE_800, **over} for name, over in RECIPE_CONFIGS.items()}
# the default job's ablation on the variants where the paper's parts should show (docs/method.md; issue 29): captions
# that name part of the image, and a long-tailed training set (the default job's settings, another --data)
PARTIAL_CONFIGS: dict[str, dict] = {name: {"data": "shapes-partial", **over} for name, over in RECIPE_CONFIGS.items()}
LONGTAIL_CONFIGS: dict[str, dict] = {name: {"data": "shapes-longtail", **over} for name, over in RECIPE_CONFIGS.items()}
# the first seed of the partial-caption suite, run on the full-compute default before the switch
PARTIAL_1200_CONFIGS: dict[str, dict] = {name: {**_RECIPE_1200, **over} for name, over in PARTIAL_CONFIGS.items()}
SUITES = {"recipe": RECIPE_CONFIGS, "recipe_1200": RECIPE_1200_CONFIGS, "recipe_800": RECIPE_800_CONFIGS,
          "from_scratch": FROM_SCRATCH_CONFIGS, "partial": PARTIAL_CONFIGS, "longtail": LONGTAIL_CONFIGS,
          "partial_1200": PARTIAL_1200_CONFIGS}
METRICS = ("tr_r1", "tr_r5", "ir_r1", "ir_r5", "itc_tr_r1", "itc_ir_r1", "pointing_game", "pointing_game_color")
PROBE = ("itm_pos", "itm_neg", "itm_pos_masked", "itm_neg_masked")
# ALBEF-protocol grounding, the occlusion evaluation (occ_*: eval.json's "occlusion") and the long tail's head / tail
# split (lt_*: "long_tail"), where a run's evaluation has them
GROUNDING = ("tr_r1_true", "ir_r1_true", "grounding_acc", "occ_itm_clean", "occ_itm_occluded", "occ_tr_r1_clean", "occ_tr_r1_occluded",
             "occ_pointing_clean", "occ_pointing_occluded", "occh_itm_occluded", "occh_tr_r1_occluded",
             "occh_pointing_occluded", "lt_tr_r1_head", "lt_tr_r1_tail", "lt_ir_r1_head",
             "lt_ir_r1_tail", "lt_pointing_head", "lt_pointing_tail")
# what each suite is for: the metrics its figure draws and its paired table compares, in % and as probabilities
_DEFAULT_KEYS = (("tr_r1", "ir_r1", "itc_tr_r1", "itc_ir_r1", "pointing_game", "pointing_game_color"),
                 ("itm_pos", "itm_neg"))
KEY_METRICS = {suite: _DEFAULT_KEYS for suite in SUITES}
KEY_METRICS["partial"] = KEY_METRICS["partial_1200"] = (
    ("tr_r1_true", "ir_r1_true", "pointing_game", "pointing_game_color"),
    ("occ_itm_clean", "occh_itm_occluded", "itm_neg"))
KEY_METRICS["longtail"] = (
    ("lt_tr_r1_head", "lt_tr_r1_tail", "lt_ir_r1_head", "lt_ir_r1_tail", "lt_pointing_head", "lt_pointing_tail",
     "grounding_acc"),
    ("itm_pos", "itm_neg", "occh_itm_occluded"))
RESULTS = os.path.join("bench_results", "ablation")
SUITE_RESULTS = {suite: os.path.join(RESULTS, suite) for suite in SUITES}


def flat_metrics(ev: dict) -> dict:
    """The row's values of :data:`GROUNDING` from an ``eval.json`` (absent ones left out)."""
    out = {k: ev[k] for k in ("tr_r1_true", "ir_r1_true", "grounding_acc") if k in ev}
    out.update({f"occ_{k}": v for k, v in ev.get("occlusion", {}).items()})
    out.update({f"occh_{k}": v for k, v in ev.get("occlusion_half", {}).items() if k.endswith("_occluded")})
    out.update({f"lt_{k}": v for k, v in ev.get("long_tail", {}).items()})
    return out


def _load(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)


def _save(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(rows, f, indent=1)
    os.replace(tmp, path)


def run_one(config: str, seed: int, out: str, threads: int, extra: dict, suite: str = "recipe") -> dict:
    """Train and evaluate one (config, seed) of ``suite`` in this process; returns the row."""
    from softmask.train.loop import TrainConfig, train

    cfg = TrainConfig(seed=seed, out=out, progress=False, threads=threads, **{**SUITES[suite][config], **extra})
    t0 = time.time()
    summary = train(cfg)
    row = _row(config, seed, summary["eval"], wall_s=time.time() - t0, threads=threads)
    if extra:
        row["overrides"] = extra
    return row


def _row(config: str, seed: int, ev: dict, **more) -> dict:
    """One row of ablation.json from a run's evaluation (``eval.json``)."""
    return {"config": config, "seed": seed, **{k: ev[k] for k in METRICS}, **{k: ev[k] for k in PROBE if k in ev},
            **flat_metrics(ev), **more}


def import_run(config: str, seed: int, run_dir: str, suite: str = "recipe") -> dict:
    """The row of a run trained outside the driver (e.g. the default job's timing run), after checking that its
    saved settings are the suite config's for ``seed``: every field that changes what a run computes
    (``config_differences``) must agree. Raises ValueError naming the differing fields."""
    from softmask.train.config import config_differences
    from softmask.train.loop import TrainConfig

    with open(os.path.join(run_dir, "config.json")) as f:
        saved = json.load(f)["train"]
    want = TrainConfig(seed=seed, out=run_dir, **SUITES[suite][config]).resolved()
    diffs = config_differences(want, saved)
    if diffs:
        raise ValueError(f"--import-run {run_dir}: not {suite}/{config} seed {seed}: "
                         + "; ".join(f"{k}: {old!r} in the run, {new!r} in the suite" for k, old, new in diffs))
    with open(os.path.join(run_dir, "eval.json")) as f:
        ev = json.load(f)
    return _row(config, seed, ev, wall_s=None, threads=saved.get("threads"), imported_from=run_dir)


def _child(args) -> int:
    row = run_one(args.child_config, args.child_seed, args.child_out, args.threads, json.loads(args.extra),
                  args.suite)
    with open(args.child_result, "w") as f:
        json.dump(row, f)
    return 0


def run(args) -> None:
    path = os.path.join(args.results, "ablation.json")
    rows = _load(path)
    done = {(r["config"], r["seed"]) for r in rows}
    todo = [(c, s) for s in args.seeds for c in args.configs if (c, s) not in done]
    print(f"ablation: {len(done)} rows already in {path}; {len(todo)} to run", file=sys.stderr)
    running: list[tuple[subprocess.Popen, str, str, float]] = []
    tmpdir = tempfile.mkdtemp(prefix="softmask-ablation-")
    while todo or running:
        while todo and len(running) < args.jobs:
            config, seed = todo.pop(0)
            result = os.path.join(tmpdir, f"{config}-{seed}.json")
            out = os.path.join(args.runs, f"{config}-seed{seed}")
            cmd = [sys.executable, "-m", "research.ablation", "--child-config", config, "--child-seed", str(seed),
                   "--child-out", out, "--child-result", result, "--threads", str(args.threads),
                   "--extra", args.extra, "--suite", args.suite]
            os.makedirs(args.runs, exist_ok=True)
            log = open(out + ".log", "w")
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), result, f"{config}/{seed}",
                            time.time()))
            print(f"ablation: started {config} seed {seed} -> {out}", file=sys.stderr)
        time.sleep(2)
        for item in list(running):
            proc, result, name, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode != 0 or not os.path.exists(result):
                print(f"ablation: {name} failed (exit {proc.returncode}); see its log under {args.runs}",
                      file=sys.stderr)
                continue
            with open(result) as f:
                row = json.load(f)
            rows = _load(path) + [row]  # re-read: another driver may have added rows meanwhile
            _save(path, rows)
            print(f"ablation: {name} done in {time.time() - t0:.0f} s: "
                  + ", ".join(f"{k} {row[k]:.1f}" for k in METRICS), file=sys.stderr)
    render(args.results, args.suite)


def _stats(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")
    return m, sd


def _decimals(key: str) -> int:
    """Decimals a metric is written with: 2 for ITM match probabilities, 1 for percentages."""
    return 2 if key in PROBE or "_itm_" in key else 1


def _describe(config: str, rows: list, configs: dict) -> str:
    """The config's overrides of the default job: its entry in ``configs`` plus the overrides its rows ran with."""
    extra = {}
    for r in rows:
        extra.update(r.get("overrides", {}))
    base = configs.get(config, {})
    return json.dumps({**base, **extra}) + ("" if config in configs else " (not one of the suite's configs)")


def render(results: str, suite: str = "recipe") -> str:
    """Markdown table (mean +- std over seeds, the number of seeds) and a bar figure from ablation.json, the
    configurations described as overrides of TrainConfig's defaults by ``SUITES[suite]``."""
    configs = SUITES[suite]
    rows = _load(os.path.join(results, "ablation.json"))
    by = {}
    for r in rows:
        by.setdefault(r["config"], []).append(r)
    order = [c for c in configs if c in by] + sorted(c for c in by if c not in configs)

    def table_of(cols):
        lines = ["| config | seeds | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
        for c in order:
            cells = []
            for k in cols:
                xs = [r[k] for r in by[c] if r.get(k) is not None]
                if not xs:
                    cells.append("")
                    continue
                m, sd = _stats(xs)
                prec = _decimals(k)
                cells.append(f"{m:.{prec}f} ± {sd:.{prec}f}" if len(xs) > 1 else f"{m:.{prec}f}")
            lines.append(f"| {c} | {len(by[c])} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    table = table_of(METRICS + PROBE)
    more = [k for k in GROUNDING if any(r.get(k) is not None for r in rows)]
    if more:
        table += ("\n\nALBEF-protocol grounding (% of objects whose box the Grad-CAM picks), the occlusion evaluation "
                  "(`occ_*`: ITM match probability, text R@1 and pointing of the other named objects' shape words, each "
                  "on the images as they are and with one named object painted over; `occh_*`: only its left half "
                  "painted over) and the long tail's head / tail "
                  "(`lt_*`), as `eval.json` has them:\n\n" + table_of(more))
    paired = _paired(by, order, [k for group in KEY_METRICS[suite] for k in group])
    if paired:
        table += ("\n\nPaired by seed: `full` minus each configuration, mean over the seeds both have (smallest to "
                  "largest difference; in how many of them `full` is higher). A positive number is what the parts "
                  "the configuration leaves out add (for `itm_neg`, hard negatives' match probability, lower is "
                  "better):\n\n" + paired)
    md = ("# Ablation on the embedded shapes data\n\n"
          "Written by `python -m research.ablation` from `ablation.json` (one row per config and seed). "
          "Retrieval in % on the 256 held-out pairs (ITM rerank of the ITC top 16; `itc_*`: ITC alone); "
          "pointing game in % (shape words, colour words); ITM probe: mean match probability of held-out "
          "positives and hard negatives, clean and soft-masked. Mean ± sample std over seeds.\n\n"
          + f"Suite `{suite}` (`python -m research.ablation --suite {suite}`); each configuration as overrides of "
            "the default job (`TrainConfig()`):\n\n"
          + "\n".join(f"- `{c}`: {_describe(c, by[c], configs)}" for c in order)
          + "\n\n" + table + "\n")
    with open(os.path.join(results, "README.md"), "w") as f:
        f.write(md)
    if rows:
        _figure(by, order, os.path.join(results, "ablation.png"), KEY_METRICS[suite], suite)
    return table


def _paired(by: dict, order: list, keys: list) -> str:
    """Markdown table of ``full`` minus each other configuration, paired by seed, for ``keys``."""
    if "full" not in by:
        return ""
    full = {r["seed"]: r for r in by["full"]}
    lines = []
    for c in order:
        if c == "full":
            continue
        cells = []
        for k in keys:
            diffs = [full[r["seed"]][k] - r[k] for r in by[c]
                     if r["seed"] in full and r.get(k) is not None and full[r["seed"]].get(k) is not None]
            if not diffs:
                cells.append("")
                continue
            prec = _decimals(k)
            up = sum(d > 0 for d in diffs)
            mean = f"{sum(diffs) / len(diffs):+.{prec}f}"
            cells.append(f"{mean} (1 seed)" if len(diffs) == 1 else
                         f"{mean} ({min(diffs):+.{prec}f} to {max(diffs):+.{prec}f}; {up}/{len(diffs)})")
        if any(cells):
            lines.append(f"| full - {c} | " + " | ".join(cells) + " |")
    if not lines:
        return ""
    return "\n".join(["| | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)] + lines)


def _figure(by, order, png, keys=_DEFAULT_KEYS, suite="recipe"):
    """Bars of the mean over seeds with each seed's value as a dot: the suite's metrics in % (left) and its ITM
    match probabilities (right), the metrics a run lacks left out."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    panels = [[k for k in group if any(r.get(k) is not None for c in order for r in by[c])] for group in keys]
    panels = [(ks, lim, label) for ks, lim, label in zip(panels, (100, 1), ("%", "ITM match probability")) if ks]
    if not panels:
        return
    widths = [max(2, len(ks)) for ks, _, _ in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(11, 3.8), gridspec_kw={"width_ratios": widths}, squeeze=False)
    width = 0.8 / max(1, len(order))
    for p, (ax, (ks, lim, label)) in enumerate(zip(axes[0], panels)):
        for j, c in enumerate(order):
            color = f"C{j}"
            for i, k in enumerate(ks):
                xs = [r[k] for r in by[c] if r.get(k) is not None]
                if not xs:
                    continue
                x = i + (j - (len(order) - 1) / 2) * width
                ax.bar(x, _stats(xs)[0], width, color=color, alpha=0.55,
                       label=f"{c} (n={len(by[c])})" if p == 0 and i == 0 else None)
                ax.plot([x] * len(xs), xs, "o", color=color, markersize=2.5, markeredgecolor="black",
                        markeredgewidth=0.3)
        ax.set_xticks(range(len(ks)))
        ax.set_xticklabels(ks, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.set_ylim(0, lim)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"suite {suite}: mean over seeds (bars), each seed (dots)", fontsize=9)
    fig.legend(loc="upper center", bbox_to_anchor=(0.5, 0.95), ncol=len(order), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m research.ablation", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--suite", choices=list(SUITES), default="recipe",
                   help="recipe: the default job's ablation; recipe_1200: the default before 2026-12-07 (every ViT "
                   "block trained, batches of 48: twice the compute); recipe_800: the recipe before 2026-12-02's "
                   "third session (800 steps, ITM on the masked caption, floor 0.5); from_scratch: the default before "
                   "it (random-init ViT); partial / longtail: the default job's ablation on --data shapes-partial / "
                   "shapes-longtail; partial_1200: partial on the default before 2026-12-07")
    p.add_argument("--configs", nargs="+", default=None, choices=sorted(set().union(*SUITES.values())),
                   help="default: every configuration of the suite")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at once")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per run")
    p.add_argument("--runs", default=None, help="run directories (default: runs/ablation, or "
                   "runs/ablation_SUITE for another suite)")
    p.add_argument("--results", default=None, help="default: the suite's folder under bench_results/ablation")
    p.add_argument("--extra", default="{}", help="JSON of TrainConfig overrides applied to every config")
    p.add_argument("--render", action="store_true", help="only render the table and figure")
    p.add_argument("--import-run", nargs=3, metavar=("CONFIG", "SEED", "RUN_DIR"), default=None,
                   help="add the row of a run trained outside the driver (its settings must be the suite config's)")
    for name in ("child-config", "child-seed", "child-out", "child-result"):
        p.add_argument(f"--{name}", help=argparse.SUPPRESS, type=int if name == "child-seed" else str)
    args = p.parse_args(argv)
    if args.child_config:
        return _child(args)
    if args.results is None:
        args.results = SUITE_RESULTS[args.suite]
    if args.runs is None:
        args.runs = "runs/ablation" if args.suite == "recipe" else f"runs/ablation_{args.suite}"
    if args.configs is None:
        args.configs = list(SUITES[args.suite])
    bad = [c for c in args.configs if c not in SUITES[args.suite]]
    if bad:
        p.error(f"--configs: {', '.join(bad)} not in suite {args.suite!r} (its configs: {', '.join(SUITES[args.suite])})")
    if args.import_run:
        config, seed, run_dir = args.import_run[0], int(args.import_run[1]), args.import_run[2]
        if config not in SUITES[args.suite]:
            p.error(f"--import-run: {config} not in suite {args.suite!r}")
        path = os.path.join(args.results, "ablation.json")
        rows = _load(path)
        if any((r["config"], r["seed"]) == (config, seed) for r in rows):
            p.error(f"--import-run: {path} already has {config} seed {seed}")
        try:
            row = import_run(config, seed, run_dir, args.suite)
        except (ValueError, OSError) as e:
            print(f"python -m research.ablation: {e}", file=sys.stderr)
            return 2
        _save(path, rows + [row])
        render(args.results, args.suite)
        return 0
    if args.render:
        print(render(args.results, args.suite))
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
