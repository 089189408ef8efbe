"""Does a model still match a caption when one object it names is gone? The occlusion evaluation.

Every held-out shapes image whose caption names at least two objects is scored against its full caption as it is,
with one named object painted over by the background (the same background and noise; which object:
:meth:`softmask.data.ShapesDataset.occlusion_choice`, a seeded rule, so every model sees the same images), and with
only the left half of that object painted over. Painted over whole, the caption no longer holds (it names an object
that is not there): a model that reads the image rejects the pair, whatever the training. Half painted over, the
object is still there and identifiable by its colour and the rest of its outline, so the caption holds. Per
version: the ITM match probability of the pair; the rank of the caption in text retrieval with the occluded image
as the query, among every held-out caption (ITC ranking, the top ``k`` reordered by the ITM match logit first, as
the retrieval evaluation does; rank 1 is a hit at R@1); and the pointing game of the remaining objects' shape and
colour words. The drop from ``*_clean`` to ``*_occluded`` under the half occlusion is what the paper's soft masks
should shrink: a positive whose most telling region is dimmed teaches ITM to match from the rest of the image.
"""

from __future__ import annotations

from typing import Optional

import torch

from softmask.eval.scoring import itm_match_prob, object_pointing, pair_itm_logits

__all__ = ["occlusion_eval"]


def _text_ranks(model, img_embeds, img_feats, enc, own: list, *, k: int, device) -> torch.Tensor:
    """Rank (1 = first) of the best of ``own[j]`` (the texts that count as a hit for image j) when image j queries
    every text of ``enc``: the top ``k`` by ITC similarity reordered by the ITM match logit, then the rest by ITC."""
    sims = img_feats @ enc.txt_feats.t()  # (n, Nt)
    k = min(k, sims.shape[1])
    top = sims.topk(k, dim=1).indices  # (n, k)
    rows = torch.arange(sims.shape[0]).repeat_interleave(k)
    logits = pair_itm_logits(model, img_embeds, enc.txt_ids, enc.txt_masks, rows, top.reshape(-1), device=device)
    key = sims.double().clone()
    key[rows, top.reshape(-1)] = 1e6 + logits[:, 1].double()  # the reranked top k come first, by ITM
    ranks = []
    for j, hits in enumerate(own):
        best = key[j, hits].max()
        ranks.append(int((key[j] > best).sum()) + 1)
    return torch.tensor(ranks)


@torch.no_grad()
def _encode_occluded(model, tokenizer, dataset, items: list, *, part: str, device, batch_size: int, max_len: int):
    from softmask.data import Collator

    collate = Collator(tokenizer, max_len)
    embeds, feats, objects = [], [], []
    for s in range(0, len(items), batch_size):
        batch = collate([dataset.occluded(i, part) for i in items[s: s + batch_size]])
        ie, ifeat = model.encode_image(batch["image"].to(device))
        embeds.append(ie.float().cpu())
        feats.append(ifeat.float().cpu())
        objects += batch["objects"]
    return torch.cat(embeds), torch.cat(feats), objects


def occlusion_eval(model, tokenizer, enc, dataset, *, k: int = 16, device="cpu", batch_size: int = 64,
                   max_len: int = 32) -> Optional[dict]:
    """The occlusion evaluation (module docstring) of ``dataset`` (a :class:`~softmask.data.ShapesDataset`,
    ``enc`` its :class:`~softmask.eval.evaluate.EncodedSet`). Returns ``{"occlusion": {...}, "occlusion_half":
    {...}}``: the named object painted over whole (the caption no longer holds: a model that reads the image should
    say so) and only its left half (the caption still holds: the paper's soft masks should keep the match), each
    with ``n`` (images), ``itm_clean`` / ``itm_occluded`` (mean ITM match probability), ``tr_rank_clean`` /
    ``tr_rank_occluded`` (mean rank of the caption), ``tr_r1_*`` / ``tr_r5_*`` (% at rank <= 1 / 5),
    ``pointing_clean`` / ``pointing_occluded`` (shape words of the other named objects, %), ``pointing_color_*``
    (colour words), ``pointing_n``; None when the data set has no occlusion rule or no image names two objects."""
    if not hasattr(dataset, "occluded") or not enc.item_index:
        return None
    rows = [i for i, item in enumerate(enc.item_index) if dataset.occlusion_choice(item) is not None]
    if not rows:
        return None
    items = [enc.item_index[i] for i in rows]
    texts = [enc.img2txt[i][0] for i in rows]  # the full caption of each image
    hits = enc.text_hits()
    own = [hits[i] for i in rows]
    idx, t = torch.arange(len(rows)), torch.tensor(texts)

    def scores(name, embeds, feats, objects) -> dict:
        out = {f"itm_{name}": float(itm_match_prob(model, embeds, enc.txt_ids, enc.txt_masks, idx, t,
                                                   device=device).mean())}
        ranks = _text_ranks(model, embeds, feats, enc, own, k=k, device=device)
        out[f"tr_rank_{name}"] = float(ranks.double().mean())
        out[f"tr_r1_{name}"] = 100.0 * float((ranks <= 1).double().mean())
        out[f"tr_r5_{name}"] = 100.0 * float((ranks <= 5).double().mean())
        for key, what in (("pointing", "word"), ("pointing_color", "color")):
            out[f"{key}_{name}"], out["pointing_n"], _ = object_pointing(
                model, tokenizer, embeds, enc.txt_ids, enc.txt_masks, list(zip(range(len(texts)), texts, objects)),
                what, device=device)
        return out

    result, clean = {}, None
    for key, part in (("occlusion", "whole"), ("occlusion_half", "half")):
        occ_embeds, occ_feats, remaining = _encode_occluded(model, tokenizer, dataset, items, part=part,
                                                            device=device, batch_size=batch_size, max_len=max_len)
        if clean is None:  # the same items and words as it is: the pointing of the same remaining objects
            sel = torch.tensor(rows)
            clean = scores("clean", enc.img_embeds[sel], enc.img_feats[sel], remaining)
        result[key] = {"n": len(rows), **clean, **scores("occluded", occ_embeds, occ_feats, remaining)}
    return result
