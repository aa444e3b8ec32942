"""Where a training step's time goes: teacher forward, student forward, backward, optimiser.

Times each phase of kdad's training step separately (synchronised on CUDA), median over
repeats, for a variant at a given size; the data loader's share is measured by
``data_loading.py``.

    python experiments/benchmark/step_breakdown.py --device cpu --backbone resnet18 --size 128
    python experiments/benchmark/step_breakdown.py --device cuda --backbone wide_resnet50_2 --size 256 --bf16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext

import torch

from kdad.models.rd4ad import RD4AD


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    net = RD4AD(args.backbone, pretrained=False).to(device).train()
    optimizer = torch.optim.Adam(
        [p for p in net.parameters() if p.requires_grad], lr=0.005, betas=(0.5, 0.999)
    )
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()

    def tick() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    phases: dict[str, list[float]] = {
        "teacher forward": [],
        "student forward + loss": [],
        "backward": [],
        "optimiser step": [],
    }
    for i in range(args.repeats + 2):
        t0 = tick()
        with ctx:
            targets = net.teacher(images)
            t1 = tick()
            predictions = net.decoder(net.bn(targets))
            loss = net.loss(list(zip(targets, predictions, strict=True)))
        t2 = tick()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t3 = tick()
        optimizer.step()
        t4 = tick()
        if i >= 2:  # warm-up
            for name, (a, b) in zip(phases, ((t0, t1), (t1, t2), (t2, t3), (t3, t4)), strict=True):
                phases[name].append(b - a)
    medians = {name: statistics.median(values) for name, values in phases.items()}
    total = sum(medians.values())
    print(
        f"RD4AD {args.backbone} {args.size}px batch {args.batch} on {device} bf16={args.bf16}: {args.batch / total:.1f} img/s\n"
    )
    print("| phase | ms per step | share |\n|---|---|---|")
    for name, seconds in medians.items():
        print(f"| {name} | {1000 * seconds:.1f} | {100 * seconds / total:.0f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
