"""``softmask-pretrain`` / ``python -m softmask.train``: the pretraining command line.

With no arguments: the ``tiny`` preset on the synthetic shapes data set, on CPU,
then evaluation (``eval.json``) and pictures (``plots/``) under
``runs/softmask-tiny``. Under ``torchrun --nproc_per_node K`` it runs
DistributedDataParallel (NCCL on GPUs, gloo on CPU).
"""

from __future__ import annotations

import argparse
import json
import sys

from softmask.train.loop import NonFiniteLossError, TrainConfig, train

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="softmask-pretrain",
        description="Pretrain the ALBEF-style model with text-driven soft masks, focal ITC and multi-modal "
        "augmentation; evaluate it (retrieval, pointing game) and draw pictures at the end.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--preset", choices=("tiny", "base"), default=d.preset, help="model size")
    p.add_argument("--data", default=d.data, help="'shapes' (embedded synthetic data) or a caption JSON file")
    p.add_argument("--image-root", default=None, help="directory the JSON's image paths are relative to")
    p.add_argument("--tokenizer", default=None,
                   help="local Hugging Face tokenizer directory (default: the shapes WordPiece tokenizer)")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="batch size per process")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW, cosine with warm-up)")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--temp-lr-scale", type=float, default=d.temp_lr_scale,
                   help="learning rate of the ITC temperature relative to --lr")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=d.out, help="output directory")
    p.add_argument("--impl", choices=("fused", "reference"), default=d.impl,
                   help="fused ops and SDPA attention, or the plain-PyTorch references and eager attention")
    p.add_argument("--device", default=None, help="torch device (default: cpu; cuda for GPUs)")
    p.add_argument("--gamma", type=float, default=None, help="focal ITC exponent (0: plain ITC)")
    p.add_argument("--alpha", type=float, default=None, help="momentum-distillation weight (ramped up)")
    p.add_argument("--no-softmask", action="store_true", help="ablation: no soft-masked ITM positives")
    p.add_argument("--softmask-positives-only", action="store_true",
                   help="soft-masked images only in positive ITM pairs (always labelled a match), instead of in "
                   "positive and negative pairs in the clean pairs' 1 : 2 ratio")
    p.add_argument("--mask-floor", type=float, default=None, help="soft-mask value on the most word-related patch")
    p.add_argument("--gradcam-layer", type=int, default=None, help="fusion layer (0-based) of the Grad-CAM")
    for term in ("itc", "itm", "softmask", "mlm"):
        p.add_argument(f"--weight-{term}", type=float, default=None, help=f"weight of loss_{term}")
    p.add_argument("--queue-size", type=int, default=None)
    p.add_argument("--no-text-aug", action="store_true",
                   help="ITC/ITM on the clean caption (ALBEF) instead of the masked-caption view")
    p.add_argument("--no-image-aug", action="store_true",
                   help="training crops without the caption-safe RandAugment (the image half of the multi-modal "
                   "augmentation; --no-text-aug is the text half)")
    p.add_argument("--train-size", type=int, default=d.train_size, help="shapes training items")
    p.add_argument("--test-size", type=int, default=None, help="shapes held-out items (default: 256)")
    p.add_argument("--num-workers", type=int, default=d.num_workers, help="data loader worker processes")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU intra-op threads (default: one per core; on a CPU shared with other jobs, 1 avoids "
                   "OpenMP stalls)")
    p.add_argument("--vit-checkpoint", default=None, help="local timm ViT weights file")
    p.add_argument("--bert-dir", default=None, help="local Hugging Face BERT directory (layers 6-11 -> fusion)")
    p.add_argument("--pointing-every", type=int, default=d.pointing_every,
                   help="held-out pointing game every N steps during training, logged to metrics.jsonl (0: off; "
                   "shapes data only)")
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--resume", action="store_true", help="continue exactly from the last checkpoint in --out")
    p.add_argument("--no-eval", action="store_true", help="skip evaluation and pictures at the end")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        preset=a.preset, data=a.data, image_root=a.image_root, tokenizer=a.tokenizer, steps=a.steps,
        batch_size=a.batch_size, lr=a.lr, warmup_steps=a.warmup_steps, temp_lr_scale=a.temp_lr_scale, seed=a.seed, out=a.out, impl=a.impl,
        device=a.device, gamma=a.gamma, alpha=a.alpha, softmask=False if a.no_softmask else None,
        mask_floor=a.mask_floor, softmask_negatives=False if a.softmask_positives_only else None,
        gradcam_layer=a.gradcam_layer, weight_itc=a.weight_itc, weight_itm=a.weight_itm,
        weight_softmask=a.weight_softmask, weight_mlm=a.weight_mlm, queue_size=a.queue_size,
        text_aug=False if a.no_text_aug else None, image_aug=not a.no_image_aug, train_size=a.train_size, test_size=a.test_size,
        num_workers=a.num_workers, threads=a.threads, vit_checkpoint=a.vit_checkpoint, bert_dir=a.bert_dir, log_every=a.log_every,
        save_every=a.save_every, pointing_every=a.pointing_every, resume=a.resume, run_eval=not a.no_eval, progress=not a.no_progress,
    )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        summary = train(cfg)
    except NonFiniteLossError as e:
        print(f"softmask-pretrain: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:
        print(f"softmask-pretrain: error: {e}", file=sys.stderr)
        return 2
    if "eval" in summary:
        ev = summary["eval"]
        keys = [k for k in ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "pointing_game") if k in ev]
        print("eval: " + json.dumps({k: round(ev[k], 2) for k in keys}))
    print(f"softmask-pretrain: done in {summary['wall_s']:.0f} s; outputs in {summary['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
