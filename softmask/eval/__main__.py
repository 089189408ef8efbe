"""``softmask-eval --checkpoint DIR`` / ``python -m softmask.eval``: evaluate a pretrained run.

Writes ``eval.json`` (retrieval Recall@{1,5,10} in percent as ``tr_r*`` / ``ir_r*``,
the pointing game on the shapes data) and ``plots/`` into the run directory.
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="softmask-eval", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run directory (uses checkpoints/latest) or checkpoint directory")
    p.add_argument("--data", default=None, help="data set to evaluate on (default: the run's; shapes: its test split)")
    p.add_argument("--image-root", default=None)
    p.add_argument("--test-size", type=int, default=None, help="shapes held-out items (default: 256)")
    p.add_argument("--k", type=int, default=16, help="top-k of the ITC ranking rescored by the ITM head")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="where eval.json and plots/ go (default: the run directory)")
    p.add_argument("--no-plots", action="store_true")
    a = p.parse_args(argv)
    from softmask.eval.evaluate import evaluate_run

    try:
        res = evaluate_run(a.checkpoint, device=a.device, k=a.k, test_size=a.test_size, image_root=a.image_root,
                           data=a.data, plots=not a.no_plots, out_dir=a.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"softmask-eval: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
