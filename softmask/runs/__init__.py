"""A run on disk, below both training and evaluation, which both read runs.

- :mod:`softmask.runs.errors`: :class:`ConfigError` (a bad setting, named) and the notes a run prints;
- :mod:`softmask.runs.checkpoint`: kill-safe checkpoints, written by training, read by both;
- :mod:`softmask.runs.datasets`: the caption-JSON sets a run trains and is evaluated on, checked up front;
- :mod:`softmask.runs.device`: the device a command runs on, checked up front.

Nothing here imports :mod:`softmask.train` or :mod:`softmask.eval`.
"""
