"""Memory of the test metrics: where the stored maps live, and the peak while computing.

The test loop (kdad.lightning.module) feeds every batch's anomaly maps and masks to the
metrics of :func:`kdad.metrics.build_metrics`; they are exact, so they keep every pixel
(float32 map + uint8 mask per pixel metric) until ``compute()``. This script replays that
loop on synthetic maps (``--images`` at ``--size`` px, batches of ``--batch``, generated
batch by batch so that the data themselves do not accumulate) in a fresh process per
configuration and reports:

- ``device_state_bytes`` / ``host_state_bytes``: bytes of the distinct storages behind the
  stored states by where they live, after the last update (the pixel metrics share one
  float32 map tensor per batch; each keeps its own uint8 masks);
- ``peak_rss_*_mib``: the process's peak resident host memory (VmHWM, reset once the
  libraries are loaded) above its resident memory at that point, after the updates and after
  ``compute()``: everything the process allocated on the host, the metrics' compute
  temporaries included;
- on CUDA, ``cuda_peak_*_mib``: ``torch.cuda.max_memory_allocated`` during the updates and
  during ``compute()``;
- every metric's value, so that the two placements are compared for exact equality.

Configurations: ``device`` = states kept on the test device (``states_on_cpu=False``, kdad's
behaviour before) and ``host`` = states in host memory (``states_on_cpu=True``, the default
now; the batch is copied to the host once and shared by the pixel metrics, as
``DistillationModule.test_step`` does).

    python experiments/benchmark/pixel_metric_memory.py --images 167 --size 256 --device cpu \
        --out experiments/benchmark/results/pixel_metric_memory_cpu.md
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from kdad.metrics import METRIC_LEVEL, build_metrics


def batch_data(index: int, batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps correlated with blob-shaped defects; a third of the images defect-free."""
    rng = np.random.default_rng(1000 + index)
    masks = np.zeros((batch, size, size), dtype=bool)
    yy, xx = np.mgrid[:size, :size]
    for i in range(batch):
        if (index * batch + i) % 3 == 0:
            continue
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.integers(0, size, 2)
            r = rng.integers(2, max(3, size // 8))
            masks[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    maps = ndimage.gaussian_filter(masks.astype(np.float32), sigma=(0, 4, 4))
    maps += 0.3 * rng.random(masks.shape, dtype=np.float32)
    return torch.from_numpy(maps), torch.from_numpy(masks)


def _status_mib(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5), so the peak is this phase's."""
    Path("/proc/self/clear_refs").write_text("5")


def _state_bytes(metrics: dict, device_type: str) -> tuple[int, int]:
    """Bytes of the distinct storages behind the states (metrics may share one tensor)."""
    seen: dict[tuple[str, int], int] = {}
    for metric in metrics.values():
        for name in metric._defaults:
            for tensor in getattr(metric, name):
                storage = tensor.untyped_storage()
                seen[(tensor.device.type, storage.data_ptr())] = storage.nbytes()
    # On a CPU run the test device *is* host memory: everything counts as "on the device".
    on_device = sum(b for (kind, _), b in seen.items() if kind == device_type)
    return on_device, sum(seen.values()) - on_device


def measure(images: int, size: int, batch: int, device: str, mode: str) -> dict:
    """One configuration, in this process (the driver starts one process per configuration)."""
    dev = torch.device(device)
    baseline = _status_mib("VmRSS")
    _reset_peak()
    metrics = {k: m.to(dev) for k, m in build_metrics(states_on_cpu=(mode == "host")).items()}
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    start = time.perf_counter()
    for index in range((images + batch - 1) // batch):
        n = min(batch, images - index * batch)
        maps, masks = batch_data(index, n, size)
        maps, masks = maps.to(dev), masks.to(dev)
        scores, labels = maps.flatten(1).amax(1), masks.flatten(1).any(1)
        if mode == "host":  # as the test loop does: one host copy shared by the pixel metrics
            maps, masks = maps.cpu(), masks.cpu()
        for name, metric in metrics.items():
            if METRIC_LEVEL[name] == "image":
                metric.update(scores, labels)
            else:
                metric.update(maps, masks)
        del maps, masks, scores, labels
    update_seconds = time.perf_counter() - start
    record: dict = {"mode": mode, "device": device, "images": images, "size": size}
    record["device_state_bytes"], record["host_state_bytes"] = _state_bytes(metrics, dev.type)
    record["peak_rss_update_mib"] = _status_mib("VmHWM") - baseline
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        record["cuda_peak_update_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
        torch.cuda.reset_peak_memory_stats(dev)
    start = time.perf_counter()
    values = {name: float(metric.compute()) for name, metric in metrics.items()}
    record["compute_seconds"] = time.perf_counter() - start
    record["update_seconds"] = update_seconds
    record["peak_rss_compute_mib"] = _status_mib("VmHWM") - baseline
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        record["cuda_peak_compute_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
    record["values"] = values
    return record


def _child(args: argparse.Namespace, mode: str) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        mode,
        *("--images", str(args.images), "--size", str(args.size)),
        *("--batch", str(args.batch), "--device", args.device),
    ]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _mib(value: float) -> str:
    return f"{value:,.0f}"


def report(args: argparse.Namespace, records: list[dict]) -> str:
    before, after = records
    same = before["values"] == after["values"]
    pixels = args.images * args.size * args.size
    lines = [
        f"# Pixel-metric memory: {args.images} images at {args.size} px ({pixels:,} pixels), "
        f"device {args.device}",
        "",
        f"Command: `python experiments/benchmark/pixel_metric_memory.py --images {args.images} "
        f"--size {args.size} --batch {args.batch} --device {args.device}`  ",
        f"Host: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; one fresh process per row.",
        "",
        "| states | on test device (MiB) | in host memory (MiB) | peak RSS after updates (MiB) "
        "| peak RSS after compute (MiB) | "
        + ("CUDA peak updates / compute (MiB) | " if args.device.startswith("cuda") else "")
        + "update s | compute s |",
        "|---|---|---|---|---|" + ("---|" if args.device.startswith("cuda") else "") + "---|---|",
    ]
    for r in records:
        label = "device (before)" if r["mode"] == "device" else "host (after, default)"
        cuda = (
            f"{_mib(r['cuda_peak_update_mib'])} / {_mib(r['cuda_peak_compute_mib'])} | "
            if "cuda_peak_update_mib" in r
            else ""
        )
        lines.append(
            f"| {label} | {_mib(r['device_state_bytes'] / 2**20)} | "
            f"{_mib(r['host_state_bytes'] / 2**20)} | {_mib(r['peak_rss_update_mib'])} | "
            f"{_mib(r['peak_rss_compute_mib'])} | {cuda}{r['update_seconds']:.1f} | "
            f"{r['compute_seconds']:.1f} |"
        )
    lines += [
        "",
        f"Values identical in both placements (all {len(before['values'])} metrics, "
        f"compared with ==): **{same}**.",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {k} | {v:.6f} |" for k, v in after["values"].items()),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=167)  # MVTec AD 'pill', the largest
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", choices=("device", "host"), default=None)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.images, args.size, args.batch, args.device, args.child)))
        return
    records = [_child(args, mode) for mode in ("device", "host")]
    text = report(args, records)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()
