"""Retrieval and pointing on the head and on the tail of a long-tailed training set (``shapes-longtail``).

The test split is balanced; an image is a *tail* image when one of its objects has a tail colour-shape combination
(:data:`softmask.data.shapes.TAIL_COMBOS`, the rarest third of the training combinations), a *head* image
otherwise. Reported: R@1 of text retrieval (per image) and image retrieval (per caption), ITM-reranked as the main
retrieval numbers are, on each part; the pointing game of the shape and colour words of tail objects and of head
objects. Focal ITC should help most on the tail, where the training pairs are rare.
"""

from __future__ import annotations

from typing import Optional

import torch

from softmask.eval.scoring import object_pointing

__all__ = ["long_tail_eval"]


def long_tail_eval(model, tokenizer, enc, i2t: torch.Tensor, t2i: torch.Tensor, dataset, *,
                   device="cpu") -> Optional[dict]:
    """``{"long_tail": {...}}`` for a ``shapes-longtail`` evaluation set (None for any other data): ``tr_r1_head``,
    ``tr_r1_tail``, ``ir_r1_head``, ``ir_r1_tail`` (%), ``images_head``, ``images_tail``, ``pointing_head``,
    ``pointing_tail``, ``pointing_color_head``, ``pointing_color_tail`` (%) and ``objects_head``,
    ``objects_tail``. ``i2t [Ni, Nt]`` / ``t2i [Nt, Ni]``: the reranked retrieval scores."""
    from softmask.data.shapes import TAIL_COMBOS

    if getattr(dataset, "variant", None) != "longtail" or not enc.item_index:
        return None
    hits = enc.text_hits()
    tail_img = torch.tensor([any((o["color"], o["word"]) in TAIL_COMBOS for o in enc.objects[texts[0]])
                             for texts in enc.img2txt])
    tr_hit = torch.tensor([int(i2t[i].argmax()) in set(hits[i]) for i in range(i2t.shape[0])])
    ir_hit = torch.tensor([int(t2i[t].argmax()) == enc.txt2img[t] for t in range(t2i.shape[0])])
    tail_txt = tail_img[torch.tensor(enc.txt2img)]
    pct = lambda x: 100.0 * float(x.double().mean()) if x.numel() else None  # noqa: E731
    out = {"tr_r1_head": pct(tr_hit[~tail_img]), "tr_r1_tail": pct(tr_hit[tail_img]),
           "ir_r1_head": pct(ir_hit[~tail_txt]), "ir_r1_tail": pct(ir_hit[tail_txt]),
           "images_head": int((~tail_img).sum()), "images_tail": int(tail_img.sum())}
    is_tail = lambda o: (o["color"], o["word"]) in TAIL_COMBOS  # noqa: E731
    parts = {"head": [(enc.txt2img[t], t, [o for o in objs if not is_tail(o)]) for t, objs in enumerate(enc.objects)],
             "tail": [(enc.txt2img[t], t, [o for o in objs if is_tail(o)]) for t, objs in enumerate(enc.objects)]}
    for key, what in (("pointing", "word"), ("pointing_color", "color")):
        for part, pairs in parts.items():
            out[f"{key}_{part}"], out[f"objects_{part}"], _ = object_pointing(
                model, tokenizer, enc.img_embeds, enc.txt_ids, enc.txt_masks, pairs, what, device=device)
    return {"long_tail": out}
