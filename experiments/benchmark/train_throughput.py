"""Training-step throughput of kdad's variants next to anomalib's RD4AD.

Both run in this one process on identical random batches (same backbone, image size, batch
size, random teacher weights), one after the other, with the same timing method: warm-up
steps, then the median of several timed windows of ``--steps`` full training steps (teacher
forward, student forward, loss, backward, optimiser step), synchronised on CUDA.

    python experiments/benchmark/train_throughput.py --device cpu --backbone resnet18 --size 128
    python experiments/benchmark/train_throughput.py --device cuda --backbone wide_resnet50_2 --size 256 --bf16

anomalib comes from the optional extra ``pip install -e '.[bench]'``; kdad never imports it.
Prints a markdown table and writes it (plus a JSON record with versions) with ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from kdad.io.atomic import write_json_atomic, write_text_atomic
from kdad.lightning.teacher_cache import TeacherFeatureCache


def fill_bank(net: torch.nn.Module, size: int, device: torch.device) -> None:
    """NFERD: build its normal feature bank from random images, as before_fit does."""
    if getattr(net, "banks", None) is None:
        return
    from torch.utils.data import DataLoader

    images = [{"image": torch.randn(3, size, size)} for _ in range(max(int(net.nfb_size), 1))]
    net.to(device).before_fit(DataLoader(images, batch_size=8))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def window_seconds(
    calls: dict[str, Callable[[], None]],
    repeats: int,
    windows: int,
    warmup: int,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, list[float]]:
    """Seconds per call of each entry of ``calls`` in each of ``windows`` timing windows of
    ``repeats`` calls (``sync()`` ends a window, e.g. a CUDA synchronise), after ``warmup``
    calls each. The windows of all entries are interleaved (A B C A B C ...), so that a slow
    phase of the machine hits every entry alike instead of biasing their ratio."""
    for call in calls.values():
        for _ in range(warmup):
            call()
        sync()
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(windows):
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(repeats):
                call()
            sync()
            seconds[name].append((time.perf_counter() - start) / repeats)
    return seconds


def measure(
    runs: dict[str, tuple[Callable[[torch.Tensor], None], torch.Tensor]],
    steps: int,
    windows: int,
    warmup: int,
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Median images/second per model over ``windows`` interleaved windows of ``steps``
    training steps (:func:`window_seconds`; every batch on one device), and the seconds per
    step of every window."""
    device = next(iter(runs.values()))[1].device
    seconds = window_seconds(
        {name: functools.partial(step, batch) for name, (step, batch) in runs.items()},
        steps,
        windows,
        warmup,
        lambda: _sync(device),
    )
    rates = {
        name: statistics.median(runs[name][1].shape[0] / s for s in values)
        for name, values in seconds.items()
    }
    return rates, seconds


def paired_ratios(seconds: list[float], reference: list[float]) -> tuple[float, float, float]:
    """Step time against a reference's, window by window (the two windows of a round are
    timed one after the other, so a slow phase of the machine cancels in their ratio):
    the median and the lower and upper quartiles of those ratios."""
    ratios = [s / r for s, r in zip(seconds, reference, strict=True)]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    low, _, high = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), low, high


def kdad_step(
    net: torch.nn.Module,
    bf16: bool,
    fused: bool,
    compile: bool = False,
    teacher_cache: bool = False,
) -> Callable[[torch.Tensor], None]:
    """One kdad training step; with ``teacher_cache``, the steady state of epochs 2, 3, ...:
    the teacher's features come from kdad's TeacherFeatureCache (filled on the first call,
    then a lookup per step, as in the training loop) instead of a teacher forward."""
    params = [p for p in net.parameters() if p.requires_grad]
    forward = torch.compile(net.forward) if compile else net.forward
    extra = {"fused": True} if fused else {}
    optimizer = torch.optim.Adam(params, lr=0.005, betas=(0.5, 0.999), **extra)
    net.train()
    device_type = next(net.parameters()).device.type

    cache: TeacherFeatureCache | None = None

    def step(images: torch.Tensor) -> None:
        nonlocal cache
        with torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else nullcontext():
            targets = None
            if teacher_cache:
                index = torch.arange(len(images), device=images.device)
                if cache is None:
                    cache = TeacherFeatureCache(len(images), float("inf"))
                    cache.store(index, net.teacher_features(images))
                targets = cache.lookup(index)
            loss = net.loss(forward(images, targets))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def anomalib_step(
    backbone: str, size: int, device: torch.device, bf16: bool
) -> Callable[[torch.Tensor], None]:
    from anomalib.models.image.reverse_distillation.loss import ReverseDistillationLoss
    from anomalib.models.image.reverse_distillation.torch_model import ReverseDistillationModel

    model = ReverseDistillationModel(
        backbone=backbone,
        input_size=(size, size),
        layers=["layer1", "layer2", "layer3"],
        anomaly_map_mode="add",
        pre_trained=False,
    ).to(device)
    loss_fn = ReverseDistillationLoss()
    # anomalib's configure_optimizers: Adam over decoder + bottleneck, lr 0.005, betas (0.5, 0.99).
    optimizer = torch.optim.Adam(
        list(model.decoder.parameters()) + list(model.bottleneck.parameters()),
        lr=0.005,
        betas=(0.5, 0.99),
    )
    model.train()

    def step(images: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
            encoder_features, decoder_features = model(images)
            loss = loss_fn(encoder_features, decoder_features)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def build_kdad(
    name: str, backbone: str, size: int, device: torch.device, channels_last: bool
) -> torch.nn.Module:
    """The variant exactly as ``model=<name>`` composes it (conf/model/<name>.yaml), with a
    random teacher of ``backbone``."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from kdad.config import CONFIG_DIR
    from kdad.lightning.module import build_net

    overrides = [f"model={name}", f"model.backbone={backbone}", "model.pretrained=false"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    net = build_net(OmegaConf.to_container(cfg.model, resolve=True)).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    fill_bank(net, size, device)  # after the conversion, as in training (setup, then before_fit)
    return net


def versions() -> dict[str, str]:
    import lightning
    import timm

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "timm": timm.__version__,
    }
    try:
        import anomalib

        out["anomalib"] = anomalib.__version__
    except ImportError:
        out["anomalib"] = "not installed"
    try:
        out["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        out["commit"] = "unknown"
    out["cpu"] = platform.processor() or platform.machine()
    out["threads"] = str(torch.get_num_threads())
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--models", default="rd4ad,hkt_plus,nferd")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for both frameworks")
    parser.add_argument(
        "--channels-last", action="store_true", help="kdad: channels_last memory format"
    )
    parser.add_argument("--fused", action="store_true", help="kdad: fused Adam")
    parser.add_argument(
        "--compile", action="store_true", help="kdad: torch.compile of the training forward"
    )
    parser.add_argument(
        "--teacher-cache",
        action="store_true",
        help="kdad: teacher features from the cache (steady state of epochs after the first)",
    )
    parser.add_argument("--no-anomalib", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="write <out>.md and <out>.json")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(0)
    batch = torch.randn(args.batch, 3, args.size, args.size, device=device)
    runs: dict[str, tuple[Callable[[torch.Tensor], None], torch.Tensor]] = {}
    if not args.no_anomalib:
        runs["anomalib RD4AD"] = (
            anomalib_step(args.backbone, args.size, device, args.bf16),
            batch,
        )
    kdad_batch = (
        batch.contiguous(memory_format=torch.channels_last) if args.channels_last else batch
    )
    for name in args.models.split(","):
        net = build_kdad(name, args.backbone, args.size, device, args.channels_last)
        step = kdad_step(net, args.bf16, args.fused, args.compile, args.teacher_cache)
        runs[f"kdad {name}"] = (step, kdad_batch)
    rates, seconds = measure(runs, args.steps, args.windows, args.warmup)
    rows = list(rates.items())
    reference = rates.get("anomalib RD4AD")
    first = next(name for name in runs if name.startswith("kdad "))
    lines = [
        f"device={args.device} backbone={args.backbone} size={args.size} batch={args.batch} bf16={args.bf16} "
        f"channels_last={args.channels_last} fused={args.fused} compile={args.compile} "
        f"teacher_cache={args.teacher_cache} threads={torch.get_num_threads()} "
        f"(timing windows interleaved; median of {args.windows} windows of {args.steps} steps)",
        "",
        f"step time vs {first}: the median (quartiles) over the windows of the step time's ratio "
        f"to {first}'s in the same round",
        "",
        f"| model | train images/s | vs anomalib RD | step time vs {first} |",
        "|---|---|---|---|",
    ]
    paired = {}
    for name, rate in rows:
        ratio = f"{rate / reference:.2f}x" if reference else "–"
        step = "–"
        if name.startswith("kdad "):
            paired[name] = paired_ratios(seconds[name], seconds[first])
            step = "{:.3f}x ({:.3f}–{:.3f})".format(*paired[name])
        lines.append(f"| {name} | {rate:.1f} | {ratio} | {step} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        record = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "versions": versions(),
            "threads": torch.get_num_threads(),
            "rows": rows,
            "step_time_vs": first,
            "step_time_ratio_median_q1_q3": paired,
            "seconds_per_step": seconds,
            "command": " ".join(sys.argv),
        }
        write_json_atomic(args.out.with_suffix(".json"), record)
        write_text_atomic(args.out.with_suffix(".md"), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
