"""Image transforms (with caption-safe RandAugment distortions) and BERT-style token masking."""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torchvision import transforms
from torchvision.transforms import InterpolationMode

# CLIP / ALBEF normalization constants.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

#: RandAugment operations kept by :class:`CaptionSafeRandAugment`. Captions name
#: colours and left/right/above/below relations, so every op that changes a colour
#: name (Color/saturation, Posterize, Solarize, Equalize, AutoContrast, Invert, hue)
#: is dropped, and flips are never used. Rotation and shear stay small (<= 0.23 x
#: their RandAugment range at magnitude 7 of 31 bins: rotation <= 7 degrees), so the
#: relations, defined on boxes separated along an axis, still hold.
SAFE_RANDAUGMENT_OPS = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Contrast",
    "Sharpness",
)

#: ALBEF's RandomAugment magnitude (N=2 ops, M=7); torchvision bins: 31.
RANDAUGMENT_MAGNITUDE = 7


class CaptionSafeRandAugment(transforms.RandAugment):
    """``torchvision.transforms.RandAugment`` restricted to :data:`SAFE_RANDAUGMENT_OPS`.

    Empty areas uncovered by geometric ops are filled with the normalization mean
    (so they become 0 after :func:`image_transform`'s ``Normalize``).
    """

    def __init__(self, num_ops: int = 2, magnitude: int = RANDAUGMENT_MAGNITUDE, ops: Iterable[str] = SAFE_RANDAUGMENT_OPS):
        fill = [int(round(255 * m)) for m in IMAGE_MEAN]
        super().__init__(num_ops=num_ops, magnitude=magnitude, interpolation=InterpolationMode.BILINEAR, fill=fill)
        self.ops = tuple(ops)
        probe = super()._augmentation_space(31, (32, 32))
        allowed = tuple(o for o in SAFE_RANDAUGMENT_OPS if o in probe)
        if not self.ops or any(o not in allowed for o in self.ops):
            raise ValueError(f"ops: expected a non-empty subset of the caption-safe ops {allowed}, got {self.ops}")

    def _augmentation_space(self, num_bins, image_size):
        space = super()._augmentation_space(num_bins, image_size)
        return {k: v for k, v in space.items() if k in self.ops}


def image_transform(image_size: int, train: bool, distort: bool = True):
    """PIL RGB image → normalized FloatTensor[3, image_size, image_size].

    - eval (``train=False``): ``Resize((S, S), bicubic)`` → ``ToTensor`` → ``Normalize``.
    - train: ``RandomResizedCrop(S, scale=(0.7, 1.0), bicubic)`` → (``distort``)
      :class:`CaptionSafeRandAugment` (2 ops, magnitude 7) → ``ToTensor`` → ``Normalize``.
      No horizontal flip: captions say "left of" / "right of".
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"image_size: expected a positive int, got {image_size!r}")
    norm = [transforms.ToTensor(), transforms.Normalize(IMAGE_MEAN, IMAGE_STD)]
    if not train:
        return transforms.Compose(
            [transforms.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC)] + norm
        )
    ops = [transforms.RandomResizedCrop(image_size, scale=(0.7, 1.0), interpolation=InterpolationMode.BICUBIC)]
    if distort:
        ops.append(CaptionSafeRandAugment(num_ops=2, magnitude=RANDAUGMENT_MAGNITUDE))
    return transforms.Compose(ops + norm)


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Undo ``Normalize(IMAGE_MEAN, IMAGE_STD)``: [..., 3, H, W] → same shape, clamped to [0, 1].

    Never modifies ``x``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 3 or x.shape[-3] != 3:
        raise ValueError(f"x: expected shape [..., 3, H, W], got {tuple(x.shape)}")
    mean = torch.tensor(IMAGE_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x * std + mean).clamp(0.0, 1.0)


def mask_tokens(
    input_ids: torch.Tensor,
    tokenizer,
    prob: float = 0.15,
    generator: Optional[torch.Generator] = None,
    special_ids=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masked-language-model corruption.

    Every token whose id is not special (default: ``tokenizer.all_special_ids``, which
    holds [PAD], [UNK], [CLS], [SEP], [MASK]) is chosen with probability ``prob``; a
    chosen token becomes [MASK] with probability 0.8, a uniformly random non-special
    vocabulary token with probability 0.1, and stays unchanged with probability 0.1.

    Args:
        input_ids: LongTensor[B, L] (any device); never modified.
        tokenizer: gives ``mask_token_id``, ``len(tokenizer)`` and ``all_special_ids``.
        prob: selection probability in [0, 1].
        generator: torch.Generator for the random draws (CPU or the device of
            ``input_ids``); with the same generator state the result is identical.
        special_ids: ids never chosen (overrides the tokenizer's special ids).

    Returns:
        ``(masked_ids, labels)``, both LongTensor[B, L] on ``input_ids``' device;
        ``labels`` holds the original id at chosen positions and -100 elsewhere.
    """
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids: expected a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids: expected an integer (int64/int32) tensor, got {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected shape [B, L], got {tuple(input_ids.shape)}")
    if not isinstance(prob, (int, float)) or isinstance(prob, bool) or not 0.0 <= float(prob) <= 1.0:
        raise ValueError(f"prob: expected a float in [0, 1], got {prob!r}")
    mask_id = getattr(tokenizer, "mask_token_id", None)
    if mask_id is None:
        raise ValueError("tokenizer: has no mask_token_id; masking needs a [MASK] token")
    if special_ids is None:
        special_ids = list(tokenizer.all_special_ids)
    special = torch.tensor(sorted({int(i) for i in special_ids} | {int(mask_id)}), dtype=torch.long)
    vocab_size = len(tokenizer)
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[special[special < vocab_size]] = False
    replacement_ids = allowed.nonzero().squeeze(1)  # (V',) non-special ids
    if replacement_ids.numel() == 0:
        raise ValueError("tokenizer: vocabulary has no non-special token to draw random replacements from")

    gen_device = generator.device if generator is not None else torch.device("cpu")
    ids = input_ids.to(gen_device, torch.long)
    candidate = ~torch.isin(ids, special.to(gen_device))  # (B, L)
    chosen = (torch.rand(ids.shape, generator=generator, device=gen_device) < prob) & candidate
    action = torch.rand(ids.shape, generator=generator, device=gen_device)
    rand_idx = torch.randint(0, replacement_ids.numel(), ids.shape, generator=generator, device=gen_device)

    masked = ids.clone()
    to_mask = chosen & (action < 0.8)
    to_rand = chosen & (action >= 0.8) & (action < 0.9)
    masked[to_mask] = int(mask_id)
    masked[to_rand] = replacement_ids.to(gen_device)[rand_idx[to_rand]]
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    return masked.to(input_ids.device), labels.to(input_ids.device)
