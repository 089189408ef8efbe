"""Speed of the embedded synthetic shapes data set (moved here from the unit tests: a
wall-clock bound fails on a busy machine and is a benchmark's job, not a test's).

    python -m pytest benchmarks/bench_data.py --benchmark-json=bench_results/<device>/data.json

Records the time to draw 1024 training items (image + caption + boxes, no tensor
transform) and ``items_per_s``; the loop needs far more than the 48 x ~2 items per
second a default-job training step consumes (4096 items took about 1 s when the unit
test was written; 1024 took a median 0.64 s over 5 rounds on the shared 2-core CPU at
nice 19 when this file was written).
"""

from __future__ import annotations

import torch

from benchmarks.common import record
from softmask.data.shapes import ShapesDataset

ITEMS = 1024


def test_shapes_generation(benchmark):
    ds = ShapesDataset("train", size=ITEMS)

    def draw_all():
        for i in range(len(ds)):
            ds[i]

    record(benchmark, draw_all, op="shapes_data", provider="numpy", mode="generate", shape=f"{ITEMS}-items",
           dtype=torch.uint8, device=torch.device("cpu"), sizes=dict(items=ITEMS), rounds=5)
    benchmark.extra_info["items_per_s"] = ITEMS / benchmark.stats.stats.median
