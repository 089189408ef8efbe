"""``softmask-finetune`` / ``python -m softmask.train.finetune``: fine-tune for image-text retrieval.

ALBEF's ``Retrieval.py`` on the training loop that pretraining uses (:func:`softmask.train.loop.train`
with ``task="retrieval"``): ITC with focal weighting, momentum distillation and positive ids (every pair
whose image id equals the row's is a positive: the object set of a shapes image, the ``image_id`` of a
caption-JSON entry or else its image path), ITM with hard negatives that never share an id, the
soft-mask branch as in pretraining (``--no-softmask`` turns it off), no MLM. The same conventions as
``softmask-pretrain``: ``--out --steps --epochs --seed --device --config --resume --no-progress``, a
progress bar, ``metrics.jsonl``, loss curves, kill-safe checkpoints, and at the end ``eval.json``
(retrieval as ALBEF's ``itm_eval``: ITC similarity of all pairs, ITM rerank of the top ``--eval-k``,
an image's text retrieval a hit when any of its captions is retrieved; see
:func:`softmask.eval.evaluate.evaluate`). Bad settings end with one line and exit status 2.

``--checkpoint`` starts from a softmask run or checkpoint directory (its model settings and tokenizer
are used) or from an ALBEF checkpoint file (``ALBEF_4M.pth``, ``mscoco.pth``, ...; read with
``torch.load(weights_only=True)``, so nothing in it runs; the preset is ``base`` unless ``--preset``
says otherwise, and ``--tokenizer`` must name bert-base-uncased's tokenizer directory)::

    softmask-finetune --checkpoint runs/softmask-tiny --out runs/finetune-tiny
    softmask-finetune --checkpoint ALBEF_4M.pth --tokenizer BERT_DIR --data coco_train.json \\
        --image-root COCO_DIR --test-data coco_test.json --device cuda
"""

from __future__ import annotations

import sys

from softmask.train.__main__ import main as _main

__all__ = ["main"]


def main(argv=None) -> int:
    return _main(argv, task="retrieval")


if __name__ == "__main__":
    sys.exit(main())
