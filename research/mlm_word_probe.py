"""Can a run's fusion encoder fill in a masked colour word, and a masked shape word, from the image?

    python -m research.mlm_word_probe RUN_DIR

For every held-out shapes caption and every colour or shape word in it, that one token is
replaced by [MASK] and the MLM head's logits at its position, restricted to the words of
its type (6 colours, 5 shapes), are scored against the true word: accuracy and mean
negative log-likelihood per type (chance: 16.7 % / ln 6 = 1.79 nats for colours, 20 % /
ln 5 = 1.61 nats for shapes). The caption's other words never determine the masked word
(each colour and shape occurs once per image), so only the image can. Used for
docs/TRAINING_NOTES.md (H9).
"""

from __future__ import annotations

import argparse
import collections
import json

import torch
import torch.nn.functional as F

from softmask.data import Collator, build_dataset
from softmask.data.shapes import COLORS, SHAPES
from softmask.eval.evaluate import data_seed_of, load_model


@torch.no_grad()
def word_probe(model, tokenizer, dataset) -> dict:
    items = [dataset[i] for i in range(len(dataset))]
    batch = Collator(tokenizer, 32)(items)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    groups = {"shape": [tokenizer.convert_tokens_to_ids(w) for w in SHAPES],
              "colour": [tokenizer.convert_tokens_to_ids(w) for w in COLORS]}
    kind = {t: k for k, toks in groups.items() for t in toks}
    hits, total, nll = collections.Counter(), collections.Counter(), collections.Counter()
    image_embeds, _ = model.encode_image(batch["image"])
    for pos in range(ids.shape[1]):
        sel = torch.tensor([int(t) in kind for t in ids[:, pos]])
        if not sel.any():
            continue
        x = ids[sel].clone()
        truth = x[:, pos].clone()
        x[:, pos] = tokenizer.mask_token_id
        fused, _ = model.fusion_encoder(model.text_encoder(x, mask[sel]), mask[sel], image_embeds[sel])
        logits = model.mlm_head(fused[:, pos]).float()
        for k, cands in groups.items():
            m = torch.tensor([kind[int(t)] == k for t in truth])
            if not m.any():
                continue
            sub = logits[m][:, cands]
            target = torch.tensor([cands.index(int(t)) for t in truth[m]])
            hits[k] += int((sub.argmax(1) == target).sum())
            total[k] += int(m.sum())
            nll[k] += float(F.cross_entropy(sub, target, reduction="sum"))
    return {k: {"accuracy": 100.0 * hits[k] / total[k], "nll": nll[k] / total[k], "words": total[k]} for k in total}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="a run directory (or checkpoint directory)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, tokenizer, run_cfg, _ = load_model(a.run)
    test = build_dataset("shapes", "test", model.cfg.image_size, train=False, seed=data_seed_of(run_cfg["train"]))
    print(json.dumps({"run": a.run, **word_probe(model, tokenizer, test)}))


if __name__ == "__main__":
    main()
