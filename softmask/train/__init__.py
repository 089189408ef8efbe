"""The reference training loop (pretraining and retrieval fine-tuning) and its pieces.

- :mod:`softmask.train.config`: :class:`TrainConfig`, the shapes recipe, the tasks' defaults, config files;
- :mod:`softmask.train.setup`: the process (device, threads, allocator, process group);
- :mod:`softmask.train.init_weights`: the weights a run starts from;
- :mod:`softmask.train.data`: the data of a run and its resumable order;
- :mod:`softmask.train.loop`: :func:`train`, the loop itself.

``from softmask.train import TrainConfig, train`` gives the two names most code needs (imported on first use).
"""

__all__ = ["TrainConfig", "task_config", "train"]


def __getattr__(name):
    if name in ("TrainConfig", "task_config"):
        from softmask.train import config

        return getattr(config, name)
    if name == "train":
        from softmask.train.loop import train

        return train
    raise AttributeError(f"module 'softmask.train' has no attribute {name!r}")
