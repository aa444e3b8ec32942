"""Where NFERD's extra step time goes: its bank recall and its fusion at each decoder stage,
and its loss beside RD4AD's.

Builds each variant as its config composes it (``train_throughput.build_kdad``: random teacher,
channels-last, bank built), records the inputs of every bank and fusion module in one training
forward, then times each module's forward + backward on those inputs (parameter gradients
included, as in training) and each model's loss on its feature pairs, next to the whole
training step of RD4AD and of the variant. Timing windows are interleaved (A B C ... A B C
...) and the median taken, as in train_throughput.py.

    python experiments/benchmark/nferd_parts.py --backbone tf_efficientnet_lite0 --size 128 \\
        --models nferd,nferd_plus --out experiments/benchmark/results/nferd_parts_lite0

Prints a markdown table (ms per training step) and writes it with a JSON record with ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from kdad.io.atomic import write_json_atomic, write_text_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import build_kdad, kdad_step, versions, window_seconds


def module_step(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[[], None]:
    """Forward + backward of ``module`` on copies of ``inputs`` that take gradients."""
    leaves = [x.detach().requires_grad_() for x in inputs]
    upstream = torch.randn_like(module(*leaves))

    def step() -> None:
        module.zero_grad(set_to_none=True)
        for leaf in leaves:
            leaf.grad = None
        module(*leaves).backward(upstream)

    return step


def loss_step(net: torch.nn.Module, images: torch.Tensor) -> Callable[[], None]:
    """Forward + backward of ``net``'s training loss on the feature pairs of one training
    forward (teacher maps fixed, the predictions as leaves, in the layout training gives them)."""
    net.train()
    with torch.no_grad():
        pairs = net(images)
    targets = [target.detach() for target, _ in pairs]
    predictions = [prediction.detach().requires_grad_() for _, prediction in pairs]

    def step() -> None:
        for leaf in predictions:
            leaf.grad = None
        net.loss(list(zip(targets, predictions, strict=True))).backward()

    return step


def recorded_inputs(net: torch.nn.Module, images: torch.Tensor) -> dict[str, tuple]:
    """``"bank 0"``, ``"fusion 0"``, ...: each bank and fusion module of ``net`` with the
    inputs it got in one training forward."""
    seen: dict[str, tuple] = {}
    hooks = []
    for kind, modules in (("bank", net.banks or ()), ("fusion", net.fusions)):
        for stage, module in enumerate(modules):

            def hook(module, args, name=f"{kind} {stage}"):
                seen[name] = (module, tuple(a.detach() for a in args if torch.is_tensor(a)))

            hooks.append(module.register_forward_pre_hook(hook))
    net.train()
    net(images)
    for handle in hooks:
        handle.remove()
    return seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--models", default="nferd,nferd_plus")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--windows", type=int, default=9)
    parser.add_argument("--out", type=Path, default=None, help="write <out>.md and <out>.json")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device("cpu")
    images = torch.randn(args.batch, 3, args.size, args.size).contiguous(
        memory_format=torch.channels_last
    )
    models = args.models.split(",")
    steps: dict[str, Callable[[], None]] = {}
    for name in ["rd4ad", *models]:
        net = build_kdad(name, args.backbone, args.size, device, channels_last=True)
        whole = kdad_step(net, bf16=False, fused=True, teacher_cache=True)
        steps[f"{name}: whole training step"] = lambda whole=whole: whole(images)
        steps[f"{name}: loss"] = loss_step(net, images)
        if name == "rd4ad":
            continue
        for part, (module, inputs) in recorded_inputs(net, images).items():
            steps[f"{name}: {part}"] = module_step(module, inputs)
    seconds = window_seconds(steps, args.repeats, args.windows, warmup=2)
    ms = {name: 1000 * statistics.median(values) for name, values in seconds.items()}

    header = (
        f"device=cpu backbone={args.backbone} size={args.size} batch={args.batch} "
        f"threads={torch.get_num_threads()} (forward + backward, ms per training step; median "
        f"of {args.windows} interleaved windows of {args.repeats} calls)"
    )
    lines = [header, "", "| part | ms |", "|---|---|"]
    lines += [f"| {name} | {value:.2f} |" for name, value in ms.items()]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out is not None:
        record = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "versions": versions(),
            "ms": ms,
            "command": " ".join(sys.argv),
        }
        write_text_atomic(args.out.with_suffix(".md"), table)
        write_json_atomic(args.out.with_suffix(".json"), record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
