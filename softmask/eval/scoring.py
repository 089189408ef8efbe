"""What the evaluations score a model with: ITM logits and match probabilities of image-text pairs, and the
Grad-CAM of one word of a pair (shared by retrieval, the probes, the pointing game, the occlusion evaluation)."""

from __future__ import annotations

from typing import Optional

import torch

import softmask

__all__ = ["trim", "pair_itm_logits", "itm_match_prob", "word_cams", "object_pointing"]


def trim(ids, mask):
    L = int(mask.sum(1).max())
    return ids[:, :L], mask[:, :L]


@torch.no_grad()
def pair_itm_logits(model, img_embeds, txt_ids, txt_masks, pair_image, pair_text, *, batch_size: int = 128,
                     device="cpu") -> torch.Tensor:
    """ITM logits ``[n, 2]`` (float32, CPU) of the pairs ``(text pair_text[i], image pair_image[i])``, in batches;
    ``img_embeds`` may already be soft-masked. Within a batch each distinct text is encoded once and each
    distinct image's cross-attention keys / values are projected once (a rerank batch holds a few images with
    their top-k texts, or the reverse)."""
    out = []
    for s in range(0, len(pair_image), batch_size):
        ii, tt = pair_image[s : s + batch_size], pair_text[s : s + batch_size]
        ui, inv_i = torch.unique(ii, return_inverse=True)
        ut, inv_t = torch.unique(tt, return_inverse=True)
        ids, mask = trim(txt_ids[ut].to(device), txt_masks[ut].to(device))
        te, _ = model.encode_text(ids, mask)
        inv_t = inv_t.to(device)
        kv = model.fusion_encoder.image_kv(img_embeds[ui].to(device))
        logits, _, _ = model.itm_logits(te[inv_t], mask[inv_t], image_kv=kv, image_index=inv_i.to(device))
        out.append(logits.float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 2)


def itm_match_prob(model, img_embeds, txt_ids, txt_masks, pair_image, pair_text, *, batch_size: int = 128,
                    device="cpu") -> torch.Tensor:
    """ITM match probability ``softmax(logits)[:, 1]`` of the pairs (see :func:`pair_itm_logits`)."""
    logits = pair_itm_logits(model, img_embeds, txt_ids, txt_masks, pair_image, pair_text, batch_size=batch_size,
                              device=device)
    return torch.softmax(logits, dim=-1)[:, 1]


def word_cams(model, img_embeds, txt_ids, txt_masks, pair_image, pair_text, pair_word, *, batch_size: int = 128,
              device="cpu", backend: Optional[str] = None) -> torch.Tensor:
    """Grad-CAM maps ``[n, g, g]`` of word ``pair_word[i]`` of text ``pair_text[i]`` on image ``pair_image[i]``.

    The gradient is that of the pair's ITM match logit with respect to the Grad-CAM
    layer's attention output (parameter gradients untouched); the map drops the image
    [CLS] key and is reshaped to the patch grid.
    """
    g = model.cfg.grid
    backend = backend or model.cfg.op_backend
    out = []
    for s in range(0, len(pair_image), batch_size):
        ii, tt = pair_image[s : s + batch_size], pair_text[s : s + batch_size]
        w = pair_word[s : s + batch_size].to(device)
        ids, mask = trim(txt_ids[tt].to(device), txt_masks[tt].to(device))
        with torch.no_grad():
            te, _ = model.encode_text(ids, mask)
        _, _, q, k, v, gc = model.word_gradcam_inputs(te, mask, img_embeds[ii].to(device), retain_graph=False)
        cam = softmask.word_gradcam(q, k, v, gc, w, backend=backend)  # (n, N)
        out.append(cam[:, 1:].reshape(-1, g, g).float().cpu())  # (n, g, g)
    return torch.cat(out) if out else torch.zeros(0, g, g)


def object_pointing(model, tokenizer, img_embeds, txt_ids, txt_masks, pairs, what: str, *, device="cpu"):
    """The pointing game of the ``what`` words (``"word"``: shape, ``"color"``) of objects: ``pairs`` holds
    ``(image, text, objects)``, image ``image`` of ``img_embeds``, text ``text`` of ``txt_ids``, the objects (dicts
    with ``box``) whose words are looked up in that text. Returns ``(% hits or None, words found, boxes [n, 4]
    float64)``; a word the text does not contain is skipped."""
    from softmask.data import word_positions
    from softmask.eval.metrics import pointing_game

    pi, pt, pw, boxes = [], [], [], []
    for i, t, objs in pairs:
        if not objs:
            continue
        for o, p in zip(objs, word_positions(txt_ids[t], tokenizer, [o[what] for o in objs])):
            if p >= 0:
                pi.append(i), pt.append(t), pw.append(p), boxes.append(list(o["box"]))
    b = torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    if not pi:
        return None, 0, b
    cams = word_cams(model, img_embeds, txt_ids, txt_masks, torch.tensor(pi), torch.tensor(pt), torch.tensor(pw),
                     device=device)
    return pointing_game(cams, b, model.cfg.image_size), len(pi), b
