"""Tokenizers: a WordPiece vocabulary built from the shapes captions, or a local
Hugging Face tokenizer directory (e.g. a saved ``bert-base-uncased``).

Nothing is downloaded: the shapes tokenizer is built in memory with
``tokenizers`` (deterministic, well under a second once transformers is
imported), other tokenizers load with ``local_files_only=True``.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# Captions drawn to count word frequencies (the vocabulary order), on top of one
# line listing every caption word (which alone guarantees coverage). 2000
# captions take about 60 ms.
_N_TRAIN_CAPTIONS = 2000
_ALPHABET = list("abcdefghijklmnopqrstuvwxyz0123456789")


def _training_corpus() -> list[str]:
    from softmask.data.shapes import sample_scene, vocabulary_words

    rng = np.random.default_rng(12345)
    lines = [" ".join(vocabulary_words())]
    lines += [sample_scene(rng)["caption"] for _ in range(_N_TRAIN_CAPTIONS)]
    return lines


def _wordpiece_vocab(lines: list[str], normalizer, pre_tokenizer) -> dict[str, int]:
    """Deterministic WordPiece vocabulary: specials, whole words by frequency, then characters.

    ``tokenizers``' ``WordPieceTrainer`` is not used: its merge tie-breaking follows
    hash-map order, and four runs of it on the same captions gave four different
    vocabularies (checked with tokenizers 0.23). Here every word of the corpus is a
    whole token (ordered by decreasing count, then alphabetically), followed by every
    letter/digit as a word-initial piece and as a ``##`` continuation piece, so any
    lowercase alphanumeric word outside the shapes vocabulary still tokenizes
    without [UNK].
    """
    counts: dict[str, int] = {}
    for line in lines:
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)):
            counts[word] = counts.get(word, 0) + 1
    tokens = list(SPECIAL_TOKENS)
    tokens += sorted((w for w in counts if w not in SPECIAL_TOKENS), key=lambda w: (-counts[w], w))
    tokens += [c for c in _ALPHABET if c not in counts]
    tokens += ["##" + c for c in _ALPHABET]
    return {t: i for i, t in enumerate(tokens)}


def build_shapes_tokenizer(save_dir: Optional[str] = None):
    """Build a BERT-style WordPiece tokenizer from the shapes captions.

    Lowercasing BERT normalizer, BERT pre-tokenizer, WordPiece model (``##``
    continuation prefix, vocabulary from :func:`_wordpiece_vocab`: every shapes
    caption word is a single token, other words fall back to characters),
    post-processor ``[CLS] $A [SEP]`` (pairs: ``[CLS] $A [SEP] $B [SEP]``).
    Special tokens have ids 0..4 in the order of :data:`SPECIAL_TOKENS`. The result
    is identical in every process (no hash-order dependence).

    Args:
        save_dir: if given, the tokenizer is also written there with ``save_pretrained``
            (load it back with :func:`load_tokenizer`).

    Returns:
        a ``transformers.PreTrainedTokenizerFast`` with pad/unk/cls/sep/mask tokens set.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.BertNormalizer(lowercase=True, clean_text=True, handle_chinese_chars=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    vocab = _wordpiece_vocab(_training_corpus(), normalizer, pre_tokenizer)
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(SPECIAL_TOKENS)  # never split or normalized

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
        padding_side="right",
        truncation_side="right",
    )
    if save_dir is not None:
        os.makedirs(save_dir, exist_ok=True)
        fast.save_pretrained(save_dir)
    return fast


def load_tokenizer(path: str):
    """Load a local Hugging Face tokenizer directory (never downloads).

    Raises:
        FileNotFoundError: ``path`` is not an existing directory.
        ValueError: the directory holds no loadable tokenizer, or it lacks a
            [CLS]/[SEP]/[PAD]/[MASK] token (the model needs all four).
    """
    from transformers import AutoTokenizer

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a tokenizer directory path, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"tokenizer: {path!r} is not a directory; expected a local Hugging Face tokenizer "
            f"directory (tokenizer.json or vocab.txt + tokenizer_config.json), or 'shapes'"
        )
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/KeyError depending on what is missing
        raise ValueError(f"tokenizer: could not load a tokenizer from {path!r}: {type(e).__name__}: {e}") from e
    missing = [n for n in ("cls_token", "sep_token", "pad_token", "mask_token") if getattr(tok, n, None) is None]
    if missing:
        raise ValueError(f"tokenizer: {path!r} defines no {', '.join(missing)}; a BERT-style tokenizer is needed")
    return tok


def get_tokenizer(spec: Optional[str]):
    """``None`` or ``"shapes"`` → :func:`build_shapes_tokenizer`, anything else → :func:`load_tokenizer`."""
    if spec is None or spec == "shapes":
        return build_shapes_tokenizer()
    return load_tokenizer(spec)
