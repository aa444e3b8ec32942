"""Evaluation speed: pixel AUROC + AUPRO over an MVTec-sized test set, and that they are exact.

An MVTec AD category has up to ~170 test images; all 15 together have 1,725. This builds
``--images`` synthetic anomaly maps and masks at ``--size`` px (blobs of several sizes as
defects, maps correlated with them plus noise), times kdad's metrics (the torchmetrics
objects the test loop uses: update per batch, then compute), and checks the values against
independent computations: scikit-learn's ``roc_auc_score`` for pixel AUROC and a numpy port of
the MVTec AD evaluation code's PRO integration for AUPRO.

    python experiments/benchmark/eval_speed.py --images 1725 --size 256 --device cpu
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from kdad.metrics import AUPRO, AUROC


def make_data(images: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    masks = np.zeros((images, size, size), dtype=bool)
    yy, xx = np.mgrid[:size, :size]
    for i in range(images):
        if i % 3 == 0:
            continue  # a third of the images are defect-free, as in MVTec AD
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.integers(0, size, 2)
            r = rng.integers(2, size // 8)
            masks[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    maps = ndimage.gaussian_filter(masks.astype(np.float32), sigma=(0, 4, 4)) + 0.3 * rng.random(
        masks.shape, dtype=np.float32
    )
    return torch.from_numpy(maps), torch.from_numpy(masks)


def reference_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """The MVTec AD evaluation code's computation (sort once, cumulative FPR/PRO, trapezoid)."""
    structure = np.ones((3, 3), dtype=int)
    labels = np.zeros(masks.shape, dtype=np.int64)
    offset = 0
    for i in range(len(masks)):
        lab, n = ndimage.label(masks[i], structure=structure)
        labels[i] = np.where(lab > 0, lab + offset, 0)
        offset += n
    flat_scores, flat_labels = maps.ravel(), labels.ravel()
    order = np.argsort(flat_scores, kind="stable")[::-1]
    sizes = np.bincount(flat_labels)
    ok = flat_labels == 0
    fp = np.where(ok, 1.0 / ok.sum(), 0.0)[order]
    pro = np.where(ok, 0.0, 1.0 / (offset * sizes[flat_labels].clip(min=1)))[order]
    fprs, pros = np.cumsum(fp), np.cumsum(pro)
    keep = np.append(np.diff(flat_scores[order]) != 0, True)
    fprs, pros = (
        np.concatenate([[0.0], fprs[keep].clip(max=1.0), [1.0]]),
        np.concatenate([[0.0], pros[keep], [1.0]]),
    )
    i = np.searchsorted(fprs, limit)
    x = np.concatenate([fprs[:i], [limit]])
    y = np.concatenate(
        [
            pros[:i],
            [
                pros[i - 1]
                + (pros[i] - pros[i - 1]) * (limit - fprs[i - 1]) / (fprs[i] - fprs[i - 1])
            ],
        ]
    )
    return float(np.trapezoid(y, x) / limit)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1725)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--no-reference", action="store_true", help="skip the (slow) independent check"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    maps, masks = make_data(args.images, args.size)
    device = torch.device(args.device)
    auroc, aupro = AUROC().to(device), AUPRO().to(device)
    start = time.perf_counter()
    for i in range(0, args.images, args.batch):
        m, g = maps[i : i + args.batch].to(device), masks[i : i + args.batch].to(device)
        auroc.update(m, g)
        aupro.update(m, g)
    updated = time.perf_counter()
    pixel_auroc = float(auroc.compute())
    after_auroc = time.perf_counter()
    pixel_aupro = float(aupro.compute())
    if device.type == "cuda":
        torch.cuda.synchronize()
    done = time.perf_counter()
    record = {
        "images": args.images,
        "size": args.size,
        "pixels": args.images * args.size**2,
        "device": str(device),
        "pixel_auroc": pixel_auroc,
        "pixel_aupro": pixel_aupro,
        "seconds_update": updated - start,
        "seconds_auroc": after_auroc - updated,
        "seconds_aupro": done - after_auroc,
        "seconds_total": done - start,
    }
    if not args.no_reference:
        from sklearn.metrics import roc_auc_score

        t0 = time.perf_counter()
        record["reference_pixel_auroc"] = float(
            roc_auc_score(masks.numpy().ravel(), maps.numpy().ravel())
        )
        record["reference_pixel_aupro"] = reference_aupro(maps.numpy(), masks.numpy())
        record["seconds_reference"] = time.perf_counter() - t0
        record["abs_diff_auroc"] = abs(record["reference_pixel_auroc"] - pixel_auroc)
        record["abs_diff_aupro"] = abs(record["reference_pixel_aupro"] - pixel_aupro)
    print(json.dumps(record, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
