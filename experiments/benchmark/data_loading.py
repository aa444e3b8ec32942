"""Data loading: training-loader throughput with and without the preprocessed-tensor cache.

Iterates the training loader of the synthetic data (PNG files, MVTec layout) for a few epochs
and reports images/second for data.cache=false/true and several worker counts. The first
epoch of a cached run includes decoding everything once (``preload``).

    python experiments/benchmark/data_loading.py --size 256 --epochs 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

from kdad.data import AnomalyDataModule


def throughput(root: str, size: int, cache: bool, workers: int, epochs: int) -> tuple[float, float]:
    """(first-epoch img/s including setup, later-epoch img/s)."""
    start = time.perf_counter()
    dm = AnomalyDataModule(
        "synthetic",
        root,
        "stripes",
        image_size=size,
        batch_size=16,
        num_workers=workers,
        cache=cache,
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    rates = []
    for epoch in range(epochs):
        if epoch > 0:
            start = time.perf_counter()
        count = sum(len(batch["image"]) for batch in loader)
        rates.append(count / (time.perf_counter() - start))
    return rates[0], sum(rates[1:]) / max(len(rates) - 1, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", default="0,2")
    args = parser.parse_args(argv)
    root = tempfile.mkdtemp(prefix="kdad_bench_")
    AnomalyDataModule("synthetic", root, "stripes").prepare_data()  # generate once, untimed
    print(
        "| cache | workers | first epoch img/s (incl. setup) | later epochs img/s |\n|---|---|---|---|"
    )
    for cache in (False, True):
        for workers in (int(w) for w in args.workers.split(",")):
            first, later = throughput(root, args.size, cache, workers, args.epochs)
            print(f"| {cache} | {workers} | {first:.0f} | {later:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
