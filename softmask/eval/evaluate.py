"""Evaluation of a pretrained model: zero-shot retrieval, pointing game, pictures.

* Retrieval (ALBEF's ``itm_eval``): every distinct image and every caption is
  encoded once (a data set with several captions per image, such as ALBEF's
  retrieval test files, gives Ni images and Nt texts); rank all held-out texts
  for each image (and all images for each text) by ITC similarity, then rescore
  the top ``k`` with the ITM head's match logit (the others get -100).
  ``tr_*`` / ``ir_*`` are Recall@{1,5,10} in percent of the reranked scores,
  ``itc_tr_*`` / ``itc_ir_*`` those of the ITC similarities alone. Text
  retrieval counts a hit when any caption of the image is retrieved; texts with
  exactly the same string as one of the image's captions count too (no model
  can rank identical strings apart); ``duplicate_captions`` says how many
  held-out captions have such a twin.
* Pointing game (shapes data): for every named object, the Grad-CAM of its
  shape word (the token's row of the Grad-CAM layer's cross-attention, weighted
  by the clamped gradient of the positive pair's ITM match logit, averaged over
  heads; :func:`softmask.word_gradcam`) on the patch grid without [CLS]; a hit
  when the peak patch centre lies in the object's box. ``pointing_game`` is the
  percentage of hits over shape words, ``pointing_game_color`` the same for the
  colour words, ``pointing_game_chance`` the hit rate of a uniformly random patch.
* ITM shortcut probe (:func:`itm_probe`): ``itm_pos`` / ``itm_neg``, the mean ITM
  match probability of the held-out positives and of their ITC-hardest negatives
  (different caption), and ``itm_pos_masked`` / ``itm_neg_masked``, the same with every
  image soft-masked as in training. A dimmed negative that looks more like a match than
  an undimmed one means the model learned "dimmed means match".
* Pictures under ``plots/``: ``loss_curves.png`` (from ``metrics.jsonl``, with the
  pointing game logged during training), ``gradcam_overlays.png`` (held-out images, one
  panel per caption word) and ``soft_masks.png`` (image, chosen word, soft mask, image
  times mask).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

import softmask
from softmask.model import ModelConfig, SoftMaskALBEF
from softmask.eval.scoring import itm_match_prob as _itm_match_prob
from softmask.eval.scoring import object_pointing
from softmask.eval.scoring import pair_itm_logits as _pair_itm_logits
from softmask.eval.scoring import trim as _trim
from softmask.eval.scoring import word_cams
from softmask.runs.checkpoint import latest_checkpoint, load_model_weights

__all__ = ["evaluate_run", "load_model", "data_seed_of", "retrieval_scores", "word_cams", "evaluate", "itm_probe",
           "pointing_subset", "soft_masked_embeds", "encode_set", "EncodedSet"]


def data_seed_of(train_cfg: dict) -> int:
    """The seed of a run's data (its ``data_seed``, else its ``seed``): the shapes held-out split it is scored on."""
    return train_cfg["seed"] if train_cfg.get("data_seed") is None else train_cfg["data_seed"]


def load_model(checkpoint: str, device="cpu", *, warn: bool = True):
    """``(model, tokenizer, run_config, ckpt_dir)`` from a run directory or a checkpoint directory. ``warn``:
    say on stderr when the run's ``latest`` pointer is broken and the newest complete checkpoint is used."""
    from softmask.data import get_tokenizer, load_tokenizer

    ckpt = latest_checkpoint(checkpoint, warn=warn)
    if ckpt is None:
        raise FileNotFoundError(
            f"checkpoint: no checkpoint in {checkpoint!r} (expected a run directory with checkpoints/latest, "
            f"or a directory holding model.safetensors and config.json)"
        )
    with open(os.path.join(ckpt, "config.json")) as f:
        run_cfg = json.load(f)
    mcfg = ModelConfig.from_dict(run_cfg["model"])
    tok_dir = os.path.normpath(os.path.join(ckpt, run_cfg.get("tokenizer_dir", "../../tokenizer")))
    tokenizer = load_tokenizer(tok_dir) if os.path.isdir(tok_dir) else get_tokenizer(run_cfg["train"].get("tokenizer"))
    model = SoftMaskALBEF(mcfg)
    load_model_weights(model, ckpt)
    return model.to(device).eval(), tokenizer, run_cfg, ckpt


@dataclass
class EncodedSet:
    """An evaluation set encoded once: ``Ni`` distinct images and ``Nt`` texts (all captions of those images).

    ``img_embeds [Ni, N, Dv]`` / ``img_feats [Ni, E]`` and ``txt_ids`` / ``txt_masks [Nt, L]`` /
    ``txt_feats [Nt, E]`` (float32, CPU); ``captions`` and ``objects`` per text; ``txt2img [Nt]`` (the
    image of every text) and ``img2txt [Ni]`` (the texts of every image); ``images``: the first few
    image tensors ``[3, S, S]``, for the pictures; ``item_index [Ni]``: the data set item each image was read
    through; ``scene_objects``: per text, every object of its image when captions name part of it
    (``shapes-partial``), else empty."""

    img_embeds: torch.Tensor
    img_feats: torch.Tensor
    txt_ids: torch.Tensor
    txt_masks: torch.Tensor
    txt_feats: torch.Tensor
    captions: list
    objects: list
    txt2img: list
    img2txt: list
    images: list = field(default_factory=list)
    item_index: list = field(default_factory=list)
    scene_objects: list = field(default_factory=list)

    def text_hits(self) -> list:
        """The texts that count as a hit for each image: its own captions and every other text with exactly
        the same string as one of them (no model can rank identical strings apart)."""
        by_caption = {}
        for t, c in enumerate(self.captions):
            by_caption.setdefault(c, []).append(t)
        return [sorted({u for t in texts for u in by_caption[self.captions[t]]}) for texts in self.img2txt]


def _caption_of(dataset, t: int) -> str:
    captions = getattr(dataset, "captions", None)
    return captions[t] if captions is not None else dataset[t]["caption"]


@torch.no_grad()
def encode_set(model, tokenizer, dataset, *, device="cpu", batch_size: int = 64, max_len: int = 32,
               keep_images: int = 6) -> EncodedSet:
    """Encode every distinct image of ``dataset`` once and every caption of it once (ALBEF's evaluation).

    The images are the data set's ``img2txt`` groups (one image per item when it has none); each image is
    read through the first item of its group. An image that cannot be read (the data set returns None and
    warns) is left out with all its captions. Raises ValueError when no image can be read."""
    from softmask.data import Collator

    n = len(dataset)
    groups = [list(g) for g in dataset.img2txt] if hasattr(dataset, "img2txt") else [[i] for i in range(n)]
    first = [g[0] for g in groups]
    group_of = {f: gi for gi, f in enumerate(first)}
    collate = Collator(tokenizer, max_len)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, first), batch_size=batch_size,
                                         shuffle=False, collate_fn=collate)
    img_embeds, img_feats, kept, images, seen = [], [], [], [], {}
    for batch in loader:
        if batch is None:
            continue
        ie, ifeat = model.encode_image(batch["image"].to(device))
        img_embeds.append(ie.float().cpu())
        img_feats.append(ifeat.float().cpu())
        for j, idx in enumerate(batch["index"].tolist()):
            kept.append(group_of[idx])
            seen[idx] = (batch["captions"][j], batch["objects"][j],
                         batch["scene_objects"][j] if "scene_objects" in batch else None)
            if len(images) < keep_images:
                images.append(batch["image"][j])
    if not kept:
        raise ValueError(f"data: none of the {len(groups)} images of the evaluation set could be read")
    texts, txt2img, img2txt = [], [], []
    for i, gi in enumerate(kept):
        img2txt.append([])
        for t in groups[gi]:
            img2txt[-1].append(len(texts))
            texts.append(t)
            txt2img.append(i)
    captions = [seen[t][0] if t in seen else _caption_of(dataset, t) for t in texts]
    objects = [list(seen[t][1]) if t in seen else [] for t in texts]
    scene = [seen[t][2] if t in seen else None for t in texts]
    txt_ids, txt_masks, txt_feats = [], [], []
    for s in range(0, len(captions), batch_size):
        enc = collate.tokenize(captions[s : s + batch_size])
        ids, mask = _trim(enc["input_ids"].to(device), enc["attention_mask"].to(device))
        _, tfeat = model.encode_text(ids, mask)
        txt_ids.append(enc["input_ids"])
        txt_masks.append(enc["attention_mask"])
        txt_feats.append(tfeat.float().cpu())
    return EncodedSet(torch.cat(img_embeds), torch.cat(img_feats), torch.cat(txt_ids), torch.cat(txt_masks),
                      torch.cat(txt_feats), captions, objects, txt2img, img2txt, images, [first[gi] for gi in kept],
                      scene if all(o is not None for o in scene) else [])


@torch.no_grad()
def retrieval_scores(model, img_embeds, img_feats, txt_ids, txt_masks, txt_feats, *, k: int = 16,
                     batch_size: int = 128, device="cpu"):
    """ITC similarities ``[Ni, Nt]`` and the ITM-reranked scores (``i2t [Ni, Nt]``, ``t2i [Nt, Ni]``).

    Args: image token embeddings ``[Ni, N, Dv]``, unit features ``[Ni, E]`` / ``[Nt, E]``,
    token ids / masks ``[Nt, L]``. Only the top ``k`` of every row are rescored (ITM
    match logit); the rest are -100.
    """
    sims = img_feats @ txt_feats.t()  # (Ni, Nt)
    k = min(k, sims.shape[0], sims.shape[1])

    def itm(img_idx, txt_idx):
        return _pair_itm_logits(model, img_embeds, txt_ids, txt_masks, img_idx, txt_idx, batch_size=batch_size,
                                device=device)[:, 1]

    i2t = torch.full_like(sims, -100.0)
    top = sims.topk(k, dim=1).indices  # (Ni, k)
    rows = torch.arange(sims.shape[0]).repeat_interleave(k)
    i2t[rows, top.reshape(-1)] = itm(rows, top.reshape(-1))
    t2i = torch.full_like(sims.t(), -100.0)
    top_t = sims.t().topk(k, dim=1).indices  # (Nt, k)
    rows_t = torch.arange(sims.shape[1]).repeat_interleave(k)
    t2i[rows_t, top_t.reshape(-1)] = itm(top_t.reshape(-1), rows_t)
    return sims, i2t, t2i


def _pointing(model, tokenizer, enc: EncodedSet, device):
    results = {}
    S = model.cfg.image_size
    pairs = [(enc.txt2img[t], t, objs) for t, objs in enumerate(enc.objects)]
    for key, what in (("pointing_game", "word"), ("pointing_game_color", "color")):
        pct, n, b = object_pointing(model, tokenizer, enc.img_embeds, enc.txt_ids, enc.txt_masks, pairs, what,
                                    device=device)
        if not n:
            continue
        results[key] = pct
        results[key + "_n"] = n
        if what == "word":  # chance: a random patch centre inside the box
            g = model.cfg.grid
            c = (torch.arange(g, dtype=torch.float64) + 0.5) * S / g
            inside_x = (c[None, :] >= b[:, 0:1]) & (c[None, :] <= b[:, 2:3])
            inside_y = (c[None, :] >= b[:, 1:2]) & (c[None, :] <= b[:, 3:4])
            results["pointing_game_chance"] = 100.0 * float(
                (inside_x.sum(1) * inside_y.sum(1)).double().mean() / (g * g)
            )
    return results


def _overlays(model, tokenizer, enc: EncodedSet, out_png, device, n_images=6):
    """Every caption word's Grad-CAM on the first ``n_images`` images, each with its first caption."""
    from softmask.data import candidate_word_mask, denormalize, word_positions
    from softmask.eval.plots import plot_gradcam_overlays

    n = min(n_images, len(enc.images))
    first = [enc.img2txt[i][0] for i in range(n)]
    txt_ids, txt_masks = enc.txt_ids, enc.txt_masks
    pi, pt, pw, words, boxes = [], [], [], [], []
    for i, t in enumerate(first):
        cand = candidate_word_mask(txt_ids[t : t + 1], txt_masks[t : t + 1], tokenizer)[0]
        pos = cand.nonzero().flatten().tolist()
        toks = tokenizer.convert_ids_to_tokens(txt_ids[t, pos].tolist())
        objs = enc.objects[t]
        box_at = {}
        for what in ("word", "color"):
            for o, p in zip(objs, word_positions(txt_ids[t], tokenizer, [o[what] for o in objs])):
                if p >= 0:
                    box_at[p] = list(o["box"])
        words.append(toks)
        boxes.append([box_at.get(p) for p in pos])
        pi += [i] * len(pos)
        pt += [t] * len(pos)
        pw += pos
    cams = word_cams(model, enc.img_embeds, txt_ids, txt_masks, torch.tensor(pi, dtype=torch.long),
                     torch.tensor(pt, dtype=torch.long), torch.tensor(pw, dtype=torch.long), device=device)
    per_image, s = [], 0
    for w in words:
        per_image.append(cams[s : s + len(w)])
        s += len(w)
    images = denormalize(torch.stack(enc.images[:n]))
    plot_gradcam_overlays(images, [enc.captions[t] for t in first], words, per_image, out_png, boxes=boxes)


def soft_masked_embeds(model, tokenizer, img_embeds, txt_ids, txt_masks, *, seed: int = 0, batch_size: int = 128,
                       device="cpu"):
    """Every image soft-masked as in training: one random caption word of its own caption (of the model's
    ``softmask_words`` candidates, drawn with a
    generator seeded by ``seed``), the Grad-CAM of that word for the positive pair's ITM match logit,
    :func:`softmask.text_driven_soft_mask` with the model's floor. Returns ``(masked [n, N, Dv],
    masks [n, N], word_index [n])``."""
    from softmask.data import candidate_word_mask

    cand = candidate_word_mask(txt_ids, txt_masks, tokenizer, words=model.cfg.softmask_words) & txt_masks.bool()
    cand[:, 1] |= ~cand.any(1)
    gen = torch.Generator().manual_seed(seed)
    words = torch.multinomial(cand.float(), 1, generator=gen).squeeze(1)  # (n,)
    masked, masks = [], []
    for s in range(0, img_embeds.shape[0], batch_size):
        ids, mask = _trim(txt_ids[s : s + batch_size].to(device), txt_masks[s : s + batch_size].to(device))
        ie = img_embeds[s : s + batch_size].to(device)
        with torch.no_grad():
            te, _ = model.encode_text(ids, mask)
        _, _, q, k, v, gc = model.word_gradcam_inputs(te, mask, ie, retain_graph=False)
        me, m = softmask.text_driven_soft_mask(ie, q, k, v, gc, words[s : s + batch_size].to(device),
                                               floor=model.cfg.mask_floor, backend=model.cfg.op_backend)
        masked.append(me.detach().float().cpu())
        masks.append(m.detach().float().cpu())
    return torch.cat(masked), torch.cat(masks), words


def _caption_truth(enc) -> Optional[torch.Tensor]:
    """``[Ni, Nt]``: caption t is true of image i (:func:`softmask.data.shapes.caption_holds`), when every
    text carries its image's objects with boxes (the shapes data); else None."""
    from softmask.data.shapes import caption_holds

    first = [texts[0] for texts in enc.img2txt]
    if enc.scene_objects:  # captions that name part of the image: true when every named object is there
        return torch.tensor([[caption_holds(c, enc.scene_objects[f], partial=True) for c in enc.captions]
                             for f in first], dtype=torch.bool)
    if not enc.objects or not all(enc.objects) or not all("box" in o for objs in enc.objects for o in objs):
        return None
    return torch.tensor([[caption_holds(c, enc.objects[f]) for c in enc.captions] for f in first], dtype=torch.bool)


def _true_r1(i2t: torch.Tensor, t2i: torch.Tensor, holds: torch.Tensor) -> dict:
    """R@1 where every caption true of an image counts (``holds [Ni, Nt]``): text retrieval hits when the top text
    is true of the image, image retrieval when the caption is true of the top image (in %)."""
    tr = holds[torch.arange(i2t.shape[0]), i2t.argmax(1)]
    ir = holds[t2i.argmax(1), torch.arange(t2i.shape[0])]
    return {"tr_r1_true": 100.0 * float(tr.double().mean()), "ir_r1_true": 100.0 * float(ir.double().mean())}


def itm_probe(model, tokenizer, img_embeds, txt_ids, txt_masks, sims, captions, *, seed: int = 0,
              device="cpu", txt2img=None, holds=None) -> dict:
    """The shortcut probe: mean ITM match probability of held-out positives and hard negatives, each with
    clean and with soft-masked images.

    ``sims [Ni, Nt]``; ``captions`` and ``txt2img`` (the image of every text; None: text i belongs to image
    i) per text. Positives are the pairs (text t, its image). Hard negatives are, for every image, the text
    of highest ITC similarity whose caption is none of the image's own, and for every text the image of
    highest ITC similarity none of whose captions is the text's (Ni + Nt pairs). ``holds [Ni, Nt]`` (bool,
    optional; the shapes data: :func:`softmask.data.shapes.caption_holds`) marks the texts that are true of
    an image although its own captions say it otherwise ("a picture of a red circle" of an image captioned
    "there is a red circle"): those are no negatives either. The soft-masked variants
    use every image soft-masked by a random word of its first caption (:func:`soft_masked_embeds`), so a
    dimmed hard negative is dimmed exactly as the training loop dims it. A model that learned "dimmed means
    match" shows ``itm_neg_masked`` far above ``itm_neg``.
    """
    ni, nt = sims.shape
    txt2img = torch.arange(nt) if txt2img is None else torch.as_tensor(txt2img, dtype=torch.long)
    cap_ids = {c: j for j, c in enumerate(dict.fromkeys(captions))}
    cid = torch.tensor([cap_ids[c] for c in captions])  # (Nt,)
    own = torch.zeros(ni, len(cap_ids), dtype=torch.bool)
    own[txt2img, cid] = True  # (Ni, distinct captions): the captions of every image
    same = own[:, cid]  # (Ni, Nt): text t says exactly what one of image i's captions says
    if holds is not None:
        same = same | torch.as_tensor(holds, dtype=torch.bool)
    masked_sims = sims.masked_fill(same, float("-inf"))
    ok_i, ok_t = ~same.all(1), ~same.all(0)
    rows_i, rows_t = torch.arange(ni)[ok_i], torch.arange(nt)[ok_t]
    neg_t = masked_sims.argmax(1)[ok_i]  # hard negative text of each image
    neg_i = masked_sims.t().argmax(1)[ok_t]  # hard negative image of each text
    pi = torch.cat([rows_i, neg_i])  # images of the negative pairs
    pt = torch.cat([neg_t, rows_t])  # texts of the negative pairs
    idx = torch.arange(nt)
    res = {
        "itm_pos": float(_itm_match_prob(model, img_embeds, txt_ids, txt_masks, txt2img, idx, device=device).mean()),
        "itm_neg": float(_itm_match_prob(model, img_embeds, txt_ids, txt_masks, pi, pt, device=device).mean()),
    }
    # the first text of every image
    first = torch.full((ni,), nt, dtype=torch.long).scatter_reduce(0, txt2img, torch.arange(nt), reduce="amin")
    masked, _, _ = soft_masked_embeds(model, tokenizer, img_embeds, txt_ids[first], txt_masks[first], seed=seed,
                                      device=device)
    res["itm_pos_masked"] = float(_itm_match_prob(model, masked, txt_ids, txt_masks, txt2img, idx,
                                                  device=device).mean())
    res["itm_neg_masked"] = float(_itm_match_prob(model, masked, txt_ids, txt_masks, pi, pt, device=device).mean())
    res["itm_probe_pairs"] = {"positives": nt, "hard_negatives": int(pi.numel())}
    return res


def pointing_subset(model, tokenizer, dataset, *, device="cpu", batch_size: int = 64, max_len: int = 32) -> dict:
    """The pointing game (shape and colour words) on ``dataset`` (items with ``objects``), in eval mode;
    the model's train/eval mode is restored. Used by the training loop to watch grounding every N steps
    on a fixed held-out subset."""
    was_training = model.training
    model.eval()
    try:
        enc = encode_set(model, tokenizer, dataset, device=device, batch_size=batch_size, max_len=max_len,
                         keep_images=0)
        return _pointing(model, tokenizer, enc, device)
    finally:
        model.train(was_training)


def _soft_mask_picture(model, tokenizer, enc: EncodedSet, out_png, device, n_images=6):
    from softmask.data import denormalize
    from softmask.eval.plots import plot_soft_masks

    n = min(n_images, len(enc.images))
    first = torch.tensor([enc.img2txt[i][0] for i in range(n)], dtype=torch.long)
    txt_ids = enc.txt_ids[first]
    _, masks, words = soft_masked_embeds(model, tokenizer, enc.img_embeds[:n], txt_ids, enc.txt_masks[first],
                                         device=device)
    g = model.cfg.grid
    toks = [tokenizer.convert_ids_to_tokens([int(txt_ids[i, words[i]])])[0] for i in range(n)]
    images = denormalize(torch.stack(enc.images[:n]))
    plot_soft_masks(images, [enc.captions[int(t)] for t in first], toks, masks[:, 1:].reshape(n, g, g), out_png)


def evaluate(model: SoftMaskALBEF, tokenizer, dataset, *, k: int = 16, device="cpu", pointing: bool = True,
             overlays_png: Optional[str] = None, soft_masks_png: Optional[str] = None, batch_size: int = 64,
             max_len: int = 32, probe: bool = True, grounding: bool = True) -> dict:
    """Retrieval as ALBEF's ``itm_eval``, the ITM shortcut probe (:func:`itm_probe`) and, when the items carry
    ``objects``, the pointing game, on ``dataset``.

    Every distinct image and every caption is encoded once (:func:`encode_set`; several captions per image,
    as in ALBEF's retrieval test files, are ``Ni`` images and ``Nt`` texts). The ITC similarity of all
    pairs ranks them; the top ``k`` of every row are rescored with the ITM match logit
    (:func:`retrieval_scores`). Text retrieval counts a hit for an image when any of its captions (or a
    text with the same string as one of them) is retrieved, image retrieval when a caption's own image is.
    Keys: ``tr_r1/5/10``, ``ir_r1/5/10`` and their means ``tr_mean``, ``ir_mean``, ``r_mean`` (reranked),
    ``itc_tr_r1/5/10``, ``itc_ir_r1/5/10`` and ``itc_tr_mean``, ``itc_ir_mean``, ``itc_r_mean`` (ITC alone),
    in percent; ``num_images``, ``num_texts``, ``rerank_k``, ``chance_r1`` (100 / Ni),
    ``duplicate_captions``; on the shapes data ``tr_r1_true`` / ``ir_r1_true``: R@1 where any caption true of the
    image counts (``caption_holds``; on ``shapes-partial`` many captions hold for an image). On the shapes data
    (``grounding``): ALBEF-protocol grounding
    (:func:`softmask.eval.grounding.shapes_grounding`: ``grounding_acc`` ...) and the occlusion evaluation
    (:func:`softmask.eval.occlusion.occlusion_eval`: ``occlusion``, ``occlusion_half``), and on ``shapes-longtail``
    the head / tail split (:func:`softmask.eval.longtail.long_tail_eval`: ``long_tail``)."""
    from softmask.eval.metrics import retrieval_metrics

    was_training = model.training
    model.eval()
    enc = encode_set(model, tokenizer, dataset, device=device, batch_size=batch_size, max_len=max_len)
    sims, i2t, t2i = retrieval_scores(model, enc.img_embeds, enc.img_feats, enc.txt_ids, enc.txt_masks,
                                      enc.txt_feats, k=k, device=device)
    hits, txt2img = enc.text_hits(), enc.txt2img
    tr = retrieval_metrics(i2t, hits, txt2img)
    ir = retrieval_metrics(t2i.t(), hits, txt2img)
    itc = retrieval_metrics(sims, hits, txt2img)
    res = {key: tr[key] for key in ("tr_r1", "tr_r5", "tr_r10", "tr_mean")}
    res.update({key: ir[key] for key in ("ir_r1", "ir_r5", "ir_r10", "ir_mean")})
    res["r_mean"] = (res["tr_mean"] + res["ir_mean"]) / 2
    res.update({f"itc_{key}": itc[key] for key in ("tr_r1", "tr_r5", "tr_r10", "tr_mean", "ir_r1", "ir_r5", "ir_r10",
                                                    "ir_mean", "r_mean")})
    ni, nt = sims.shape
    counts = {}
    for c in enc.captions:
        counts[c] = counts.get(c, 0) + 1
    res.update(num_images=ni, num_texts=nt, rerank_k=min(k, ni, nt), chance_r1=100.0 / ni,
               duplicate_captions=sum(1 for c in enc.captions if counts[c] > 1))
    truth = _caption_truth(enc)
    if truth is not None:
        res.update(_true_r1(i2t, t2i, truth))
    if probe:
        res.update(itm_probe(model, tokenizer, enc.img_embeds, enc.txt_ids, enc.txt_masks, sims, enc.captions,
                             device=device, txt2img=txt2img, holds=truth))
    if pointing and any(enc.objects):
        res.update(_pointing(model, tokenizer, enc, device))
        if grounding:
            from softmask.eval.grounding import shapes_grounding
            from softmask.eval.longtail import long_tail_eval
            from softmask.eval.occlusion import occlusion_eval

            res.update(shapes_grounding(model, tokenizer, enc, dataset, device=device, max_len=max_len) or {})
            res.update(occlusion_eval(model, tokenizer, enc, dataset, k=k, device=device, batch_size=batch_size,
                                      max_len=max_len) or {})
            res.update(long_tail_eval(model, tokenizer, enc, i2t, t2i, dataset, device=device) or {})
    if overlays_png is not None:
        _overlays(model, tokenizer, enc, overlays_png, device)
    if soft_masks_png is not None:
        _soft_mask_picture(model, tokenizer, enc, soft_masks_png, device)
    model.train(was_training)
    return res


def evaluate_run(checkpoint: str, *, device="cpu", model: Optional[SoftMaskALBEF] = None, tokenizer=None,
                 k: int = 16, test_size: Optional[int] = None, image_root: Optional[str] = None,
                 data: Optional[str] = None, plots: bool = True, out_dir: Optional[str] = None,
                 extra: Optional[dict] = None, seed: Optional[int] = None) -> dict:
    """Evaluate a run directory (or checkpoint directory); writes ``eval.json`` and ``plots/`` into
    ``out_dir`` (default: the run directory; created if needed). Pass ``model``/``tokenizer`` to skip
    loading. ``image_root`` defaults to the run's only when ``data`` is the run's own data set.
    ``extra`` entries are added to the result (and to ``eval.json``). ``seed``: the shapes held-out split of
    this seed (default: the run's own)."""
    from softmask.data import build_dataset, is_shapes
    from softmask.eval.plots import plot_loss_curves

    device = torch.device(device)
    ckpt = latest_checkpoint(checkpoint)  # the one place that says so when it falls back
    if model is None:
        model, tokenizer, run_cfg, ckpt = load_model(checkpoint, device, warn=False)
    else:
        with open(os.path.join(ckpt, "config.json")) as f:
            run_cfg = json.load(f)
    tcfg = run_cfg["train"]
    spec = data or tcfg["data"]
    if out_dir is None:
        out_dir = checkpoint if not os.path.isfile(os.path.join(checkpoint, "model.safetensors")) else ckpt
    if image_root is None and spec == tcfg["data"]:
        image_root = tcfg.get("image_root")
    ds = build_dataset(spec, "test", model.cfg.image_size, train=False, image_root=image_root,
                       seed=data_seed_of(tcfg) if seed is None else seed, size=test_size if is_shapes(spec) else None)
    plot_dir = os.path.join(out_dir, "plots")
    res = evaluate(model, tokenizer, ds, k=k, device=device,
                   overlays_png=os.path.join(plot_dir, "gradcam_overlays.png") if plots else None,
                   soft_masks_png=os.path.join(plot_dir, "soft_masks.png") if plots else None)
    res["checkpoint"] = os.path.abspath(ckpt)
    res["data"] = spec
    res.update(extra or {})
    run_dir = checkpoint if ckpt != checkpoint else os.path.dirname(os.path.dirname(ckpt))  # a run or one checkpoint
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if plots and os.path.exists(metrics):
        plot_loss_curves(metrics, os.path.join(plot_dir, "loss_curves.png"))
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, f".eval.json.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(res, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, "eval.json"))
    return res
