"""open_clip's trainer with the focal contrastive loss: ``python -m softmask.open_clip_train``.

    python -m softmask.open_clip_train [open_clip_train's flags] --focal-gamma 2.0 [--focal-backend auto]

runs ``open_clip_train.main.main`` unchanged, except that the loss it builds (open_clip's
``ClipLoss``, with the run's ``--local-loss``, ``--gather-with-grad``, rank and world
size) is replaced by :class:`softmask.FocalClipLoss` with the same settings and
``gamma = --focal-gamma``. Other losses (``--siglip``, ``--distill``, CoCa models) are
refused: the focal loss is ClipLoss's. open_clip is imported only when this runs
(``pip install "softmask[open_clip]"``).

Under torchrun, put ``--`` between the module and its flags, so that torchrun's own
parser does not read them (under Python 3.11 it takes ``--logs`` for its
``--logs-specs``)::

    torchrun --nproc_per_node 8 -m softmask.open_clip_train -- --train-data ... --logs ./logs --focal-gamma 2

The replacement lives for the run only: ``open_clip_train.main.create_loss`` is
swapped while :func:`main` runs and restored after.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Iterator, List, Optional

__all__ = ["main", "focal_loss_in_open_clip"]


def _parse(argv: List[str]):
    parser = argparse.ArgumentParser(
        prog="python -m softmask.open_clip_train", allow_abbrev=False, add_help=False,
        description="open_clip_train with softmask.FocalClipLoss in place of ClipLoss; every other flag is "
                    "open_clip_train's.")
    parser.add_argument("--focal-gamma", type=float, required=True,
                        help="focal exponent gamma >= 0 (0: open_clip's ClipLoss, computed without logits)")
    parser.add_argument("--focal-backend", default="auto", choices=("auto", "triton", "torch", "reference"),
                        help="softmask backend (default auto: triton on CUDA, torch on the CPU)")
    return parser.parse_known_args(argv)


@contextlib.contextmanager
def focal_loss_in_open_clip(gamma: float, backend: str = "auto") -> Iterator[None]:
    """Within the block, ``open_clip_train.main`` builds :class:`softmask.FocalClipLoss`
    where it would build open_clip's ``ClipLoss`` (same local_loss, gather_with_grad,
    rank, world size)."""
    import open_clip_train.main as oc_main
    from open_clip.loss import ClipLoss

    from softmask.clip import FocalClipLoss

    FocalClipLoss(gamma=gamma, backend=backend)  # bad values fail here, before the run starts
    original = oc_main.create_loss

    def create_loss(args):
        loss = original(args)
        if type(loss) is not ClipLoss:
            raise ValueError(f"--focal-gamma: expected a run that trains with open_clip's ClipLoss, got "
                             f"{type(loss).__name__} (--siglip, --distill and CoCa models keep their own loss)")
        return FocalClipLoss(local_loss=loss.local_loss, gather_with_grad=loss.gather_with_grad,
                             cache_labels=loss.cache_labels, rank=loss.rank, world_size=loss.world_size,
                             use_horovod=loss.use_horovod, gamma=gamma, backend=backend)

    oc_main.create_loss = create_loss
    try:
        yield
    finally:
        oc_main.create_loss = original


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # torchrun ... -m softmask.open_clip_train -- <flags>
        argv = argv[1:]
    ours, rest = _parse(argv)
    try:
        import open_clip_train.main as oc_main
    except ImportError as e:
        raise SystemExit(f"softmask.open_clip_train needs open_clip's trainer: pip install \"softmask[open_clip]\" "
                         f"({e})")
    with focal_loss_in_open_clip(ours.focal_gamma, ours.focal_backend):
        oc_main.main(rest)


if __name__ == "__main__":
    main()
