"""How much NFERD's feature-bank recall depends on the input, measured on a run's test images.

For each trained run folder given (``kdad-train model=nferd ... hydra.run.dir=DIR``) the model
is rebuilt from ``DIR/config.yaml`` (the teacher from its own weights, as in training) and
``DIR/checkpoints/last.ckpt``, the test split is run through it, and each decoder stage's
recall is recorded (the student map entering the bank, in eval mode). Per stage it reports:

- ``distinct``: distinct top-K sets over the test images (``flattened``: one set per image;
  ``per_position``: per position, averaged over positions) and the share of the most common;
- ``entropy``: mean entropy of the K weights divided by log K (1 = uniform, 0 = one entry);
- ``w_max``: mean largest weight.

    python experiments/nferd_ablation/recall_diversity.py /tmp/nferd_runs/* --out table.md
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf


def _model(run: Path) -> tuple[torch.nn.Module, object]:
    cfg = OmegaConf.load(run / "config.yaml")
    net = instantiate(cfg.model)
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    weights = {k.removeprefix("net."): v for k, v in state["state_dict"].items()}
    result = net.load_state_dict(weights, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("teacher.")]
    if missing or result.unexpected_keys:
        raise SystemExit(
            f"{run}: checkpoint does not fit: {missing[:3]} {result.unexpected_keys[:3]}"
        )
    data = instantiate(cfg.data)
    data.setup("test")
    return net.eval(), data


@torch.no_grad()
def diversity(run: Path) -> dict[str, object]:
    net, data = _model(run)
    if net.banks is None:
        return {}
    mixes: list[list[torch.Tensor]] = [[] for _ in net.banks]
    hooks = [
        bank.register_forward_pre_hook(
            lambda module, args, stage=stage: mixes[stage].append(module.mixture(args[0]))
        )
        for stage, bank in enumerate(net.banks)
    ]
    for batch in data.test_dataloader():
        net(batch["image"])
    for hook in hooks:
        hook.remove()
    row: dict[str, object] = {"run": run.name, "recall": net.banks[0].recall}
    for stage, (bank, chunks) in enumerate(zip(net.banks, mixes, strict=True)):
        mix = torch.cat(chunks)  # (images, N[, H, W])
        k = min(bank.top_k, bank.size)
        top_w, top_idx = mix.topk(k, dim=1)
        p = top_w.clamp_min(1e-12)
        entropy = (-(p * p.log()).sum(dim=1) / math.log(k)).mean().item() if k > 1 else 0.0
        sets = top_idx.sort(dim=1).values
        if sets.dim() == 2:  # flattened: one set per image
            counts = Counter(map(tuple, sets.tolist()))
            distinct, common = len(counts), max(counts.values()) / len(sets)
        else:  # per position: distinct sets over images at each position, averaged
            flat = sets.flatten(2).permute(2, 0, 1)  # (positions, images, K)
            per_position = [Counter(map(tuple, pos.tolist())) for pos in flat]
            distinct = sum(len(c) for c in per_position) / len(per_position)
            common = sum(max(c.values()) for c in per_position) / (
                len(per_position) * sets.shape[0]
            )
        row[f"stage{stage + 1}"] = {
            "images": int(sets.shape[0]),
            "distinct": round(float(distinct), 1),
            "common_share": round(common, 3),
            "entropy": round(entropy, 3),
            "w_max": round(top_w[:, 0].mean().item(), 3),
            "scale": round(float(bank.scale), 2),
        }
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="write <out>.md and <out>.json")
    args = parser.parse_args(argv)
    rows = [r for r in (diversity(run) for run in args.runs) if r]
    lines = [
        "| run | recall | stage | distinct top-K sets / images | most common set | weight entropy / log K | mean max w | 1/T |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for stage in ("stage1", "stage2", "stage3"):
            s = row[stage]
            lines.append(
                f"| {row['run']} | {row['recall']} | {stage[-1]} | {s['distinct']} / {s['images']} "
                f"| {s['common_share']:.0%} | {s['entropy']:.3f} | {s['w_max']:.3f} | {s['scale']} |"
            )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.with_suffix(".md").write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
