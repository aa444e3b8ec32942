"""Inference: batch-1 latency and batch-N throughput of every variant, fp32 and bf16 autocast.

Times ``net.predict`` (teacher, student, per-layer distances, fused and smoothed map, score):
what ``kdad-predict`` and the exported models compute, without file I/O. Random weights
(timing does not depend on them); warm-up first, median over repeats, CUDA synchronised.

    python experiments/benchmark/inference.py --device cpu --size 256 --backbone resnet18
    python experiments/benchmark/inference.py --device cuda --size 256 --backbone wide_resnet50_2 --batch 32
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from kdad.config import CONFIG_DIR
from kdad.lightning.module import build_net


def fill_bank(net: torch.nn.Module, size: int, device: torch.device) -> None:
    """NFERD: build its normal feature bank from random images, as before_fit does."""
    if getattr(net, "banks", None) is None:
        return
    from torch.utils.data import DataLoader

    images = [{"image": torch.randn(3, size, size)} for _ in range(max(int(net.nfb_size), 1))]
    net.to(device).before_fit(DataLoader(images, batch_size=8))


def build(variant: str, backbone: str) -> torch.nn.Module:
    # Composed as kdad-train composes it (hkt_plus.yaml extends hkt.yaml through its defaults).
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"model={variant}"])
    model = OmegaConf.to_container(cfg.model, resolve=True)
    model.update(backbone=backbone, pretrained=False, weights_path=None)
    return build_net(model).eval()


@torch.inference_mode()
def timed(net: torch.nn.Module, images: torch.Tensor, bf16: bool, repeats: int) -> float:
    """Median seconds per call of net.predict."""
    ctx = torch.autocast(images.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    times = []
    for i in range(repeats + 2):
        if images.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with ctx:
            net.predict(images)
        if images.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # warm-up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", default="rd4ad,stfpm,hkt,hkt_plus,nferd")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    one = torch.randn(1, 3, args.size, args.size, device=device)
    many = torch.randn(args.batch, 3, args.size, args.size, device=device)
    lines = [
        f"device={args.device} backbone={args.backbone} size={args.size} threads={torch.get_num_threads()}",
        "",
        f"| variant | batch-1 latency fp32 (ms) | batch-1 bf16 (ms) | batch-{args.batch} fp32 (img/s) | batch-{args.batch} bf16 (img/s) |",
        "|---|---|---|---|---|",
    ]
    for variant in args.variants.split(","):
        net = build(variant, args.backbone).to(device)
        fill_bank(net, args.size, device)
        row = [variant]
        for bf16 in (False, True):
            row.append(f"{1000 * timed(net, one, bf16, args.repeats):.1f}")
        for bf16 in (False, True):
            row.append(f"{args.batch / timed(net, many, bf16, args.repeats):.1f}")
        lines.append("| " + " | ".join([row[0], row[1], row[2], row[3], row[4]]) + " |")
        print(lines[-1], flush=True)
        del net
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
