"""``softmask-eval --checkpoint DIR [--data PATH.json]`` / ``python -m softmask.eval``: evaluate a pretrained run.

Writes ``eval.json`` (retrieval Recall@{1,5,10} in percent as ``tr_r*`` / ``ir_r*``,
the pointing game on the shapes data) and ``plots/`` into the run directory.

The data set: ``--data`` (any caption JSON, image paths relative to ``--image-root``
or else to that JSON's folder; or ``shapes``), else the run's own held-out set: its
``--test-data``, else the images it held out of its training JSON
(``heldout.json``), else its training data (then ``eval.json`` says
``"eval_on_training_data": true``). ``eval.json`` names the set in ``eval_data`` and
``eval_split``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

__all__ = ["main"]

PROG = "softmask-eval"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _run_dir(checkpoint: str, ckpt: str) -> str:
    """The run directory of a checkpoint given as a run directory or as a checkpoint directory."""
    return checkpoint if os.path.normpath(ckpt) != os.path.normpath(checkpoint) else os.path.dirname(os.path.dirname(ckpt))


def main(argv=None) -> int:
    p = _Parser(prog=PROG, description=__doc__.splitlines()[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run directory (uses checkpoints/latest) or checkpoint directory")
    p.add_argument("--data", default=None,
                   help="caption JSON file (or 'shapes', 'shapes-partial', 'shapes-longtail') to evaluate on "
                   "(default: the run's test set, else the "
                   "images it held out, else its training data)")
    p.add_argument("--image-root", default=None,
                   help="directory the --data image paths are relative to (default: that JSON's folder)")
    p.add_argument("--test-size", type=int, default=None, help="shapes held-out items (default: 256)")
    p.add_argument("--seed", type=int, default=None,
                   help="shapes: the held-out split of this seed (default: the run's data seed, --data-seed, "
                   "else its --seed)")
    p.add_argument("--k", type=int, default=16, help="top-k of the ITC ranking rescored by the ITM head")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="where eval.json and plots/ go (default: the run directory)")
    p.add_argument("--no-plots", action="store_true")
    a = p.parse_args(argv)
    from softmask.data.shapes import VARIANTS, is_shapes
    from softmask.eval.evaluate import evaluate_run
    from softmask.runs.checkpoint import latest_checkpoint, load_checkpoint_config
    from softmask.runs.datasets import annotate_eval, check_test_json, eval_target
    from softmask.runs.device import check_device
    from softmask.runs.errors import ConfigError, print_notes

    flags = {"data": "--data", "test_data": "--data", "image_root": "--image-root", "test_image_root": "--image-root",
             "device": "--device"}
    try:
        device = check_device(a.device)
        if a.k < 1:
            raise ConfigError("k", a.k, "expected a positive integer")
        if a.test_size is not None and a.test_size < 1:
            raise ConfigError("test_size", a.test_size, "expected a positive integer")
        if a.seed is not None and a.seed < 0:
            raise ConfigError("seed", a.seed, "expected a non-negative integer")
        ckpt = latest_checkpoint(a.checkpoint, warn=False)  # evaluate_run says so when it falls back
        if ckpt is None:
            raise FileNotFoundError(
                f"--checkpoint {a.checkpoint}: no checkpoint there (expected a run directory with checkpoints/latest, "
                f"or a directory holding model.safetensors, train_state.pt and config.json)")
        run_train = load_checkpoint_config(ckpt)["train"]
        run_dir = _run_dir(a.checkpoint, ckpt)
        if a.data is not None:
            data = a.data
            if not is_shapes(data) and not data.lower().endswith(".json"):
                raise ConfigError("data", data, f"expected {', '.join(repr(v) for v in VARIANTS)} or a caption JSON "
                                                f"file (a path ending in .json)")
            root = a.image_root if a.image_root is not None or is_shapes(data) else \
                os.path.dirname(os.path.abspath(data))
            target, _, target_split = eval_target(run_train, run_dir)
            same = lambda x: x is not None and (x == data if is_shapes(x) or is_shapes(data)  # noqa: E731
                                                else os.path.abspath(x) == os.path.abspath(data))
            split = "train" if same(run_train.get("data")) else target_split if same(target) else "given"
        else:
            data, root, split = eval_target(run_train, run_dir)
        if not is_shapes(data):
            print_notes(check_test_json("data", data, root), prog=PROG)
        if split == "train":
            print_notes([f"evaluating on the run's training data ({data}), not on held-out data: the retrieval "
                         f"numbers measure fit (eval.json: \"eval_on_training_data\": true)"], prog=PROG)
        if a.out is not None:
            os.makedirs(a.out, exist_ok=True)  # evaluate_run creates it only when it draws plots
        res = evaluate_run(a.checkpoint, device=device, k=a.k, test_size=a.test_size, image_root=root, data=data,
                           plots=not a.no_plots, out_dir=a.out, seed=a.seed)
        res = annotate_eval(os.path.join(a.out or a.checkpoint, "eval.json"), data, split)
    except ConfigError as e:
        flag = flags.get(e.field, f"--{e.field.replace('_', '-')}")
        print(f"{PROG}: error: {e.render(flag, flag=True)}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
