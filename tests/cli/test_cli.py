"""The real entry points, run as a user runs them: kdad-train, kdad-eval, -m, kdad-aggregate.

Each test starts the CLI in a subprocess with tiny settings (resnet18 with random weights,
64-px synthetic images, one epoch) and checks the files a run leaves behind.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from clirun import DATA, TINY, run, run_in_process
from wandb_reader import find_run_files, read_run

from kdad.errors import KDADError
from kdad.io.results import RESULT_KEYS


@pytest.fixture(scope="module")
def trained_run(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("train_run")
    run("kdad.cli.train", [*TINY, "logger=csv", f"hydra.run.dir={out}"], env, out)
    return out


def test_train_writes_the_contract_files(trained_run: Path) -> None:
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert tuple(metrics) == RESULT_KEYS  # exactly the contract's keys
    assert (
        metrics["model"] == "rd4ad"
        and metrics["data"] == "synthetic"
        and metrics["category"] == "stripes"
    )
    for key in ("image_auroc", "pixel_auroc", "pixel_aupro", "image_f1_max", "pixel_ap"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["params_trainable"] == 15_908_480  # RD4AD resnet18, official count
    assert metrics["params_total"] > metrics["params_trainable"]
    assert (
        metrics["train_seconds"] > 0
        and metrics["train_images_per_second"] > 0
        and metrics["test_images_per_second"] > 0
    )
    assert (trained_run / "config.yaml").read_text().startswith("task_name: train")
    assert (trained_run / "checkpoints" / "last.ckpt").is_file()
    panels = sorted((trained_run / "images").glob("*.png"))
    assert len(panels) == 16
    assert {p.name.split("_", 1)[1].rsplit("_", 1)[0] for p in panels} >= {
        "good",
        "scratch",
        "hole",
    }
    with open(trained_run / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 + 6 * 2  # every test image once
    assert {row["label"] for row in rows} == {"0", "1"}


def _recompute_test_metrics(run_folder: Path) -> dict[str, float]:
    """The run's test metrics recomputed from its checkpoint and its test images: scikit-learn
    for AUROC, AP and F1-max, kdad's functional AUPRO and PROs (checked against independent
    references in tests/metrics) for the region metrics."""
    import numpy as np
    from omegaconf import OmegaConf
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

    from kdad.data.datamodule import instantiate_data
    from kdad.lightning.loading import load_module
    from kdad.metrics import aupro, pro_rd4ad, pro_stfpm

    data = instantiate_data(OmegaConf.load(run_folder / "config.yaml").data)
    data.setup("test")
    net = load_module(run_folder / "checkpoints" / "last.ckpt").net.eval()
    scores, labels, maps, masks = [], [], [], []
    with torch.no_grad():
        for batch in data.test_dataloader():
            batch_maps, batch_scores = net.predict(batch["image"])
            scores.append(batch_scores)
            labels.append(batch["label"])
            maps.append(batch_maps[:, 0])
            masks.append(batch["mask"][:, 0] > 0.5)
    score, label = torch.cat(scores).double().numpy(), torch.cat(labels).numpy()
    pixel_map, pixel_mask = torch.cat(maps), torch.cat(masks)
    precision, recall, _ = precision_recall_curve(label, score)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    flat_map, flat_mask = pixel_map.double().numpy().ravel(), pixel_mask.numpy().ravel()
    return {
        "image_auroc": roc_auc_score(label, score),
        "image_f1_max": float(f1.max()),
        "pixel_auroc": roc_auc_score(flat_mask, flat_map),
        "pixel_ap": average_precision_score(flat_mask, flat_map),
        "pixel_aupro": aupro(pixel_map, pixel_mask, fpr_limit=0.3).item(),
        "pixel_pro_rd4ad": pro_rd4ad(pixel_map, pixel_mask).item(),
        "pixel_pro_stfpm": pro_stfpm(pixel_map, pixel_mask).item(),
    }


def test_eval_reproduces_the_training_run(
    trained_run: Path, env: dict[str, str], tmp_path: Path
) -> None:
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    run_in_process(  # the real command's main(), without a second process start
        "kdad.cli.eval",
        [*DATA, f"ckpt_path={ckpt}", "logger=none", f"hydra.run.dir={tmp_path}"],
        env,
        tmp_path,
    )
    trained = json.loads((trained_run / "metrics.json").read_text())
    evaluated = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "pixel_aupro", "image_f1_max", "pixel_ap"):
        assert math.isclose(trained[key], evaluated[key], abs_tol=1e-6), key
    # Both files come from the same writer: each value under its key is also checked against
    # the metric recomputed here, named by hand, so that a swapped key cannot cancel out.
    recomputed = _recompute_test_metrics(trained_run)
    for key, value in recomputed.items():
        assert trained[key] == pytest.approx(value, abs=1e-4), key
    assert evaluated["model"] == "rd4ad" and evaluated["train_seconds"] == pytest.approx(
        trained["train_seconds"], rel=1e-6
    )


def test_eval_rejects_a_checkpoint_of_another_variant(
    trained_run: Path, env: dict[str, str], tmp_path: Path
) -> None:
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    proc = run_in_process(
        "kdad.cli.eval",
        [*DATA, "model=stfpm", f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path}"],
        env,
        tmp_path,
        expect=2,
    )
    assert "model=rd4ad checkpoint" in proc.stderr and "Traceback" not in proc.stderr


def test_checkpoint_loads_with_weights_only(trained_run: Path) -> None:
    checkpoint = torch.load(
        trained_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert checkpoint["kdad"]["model_name"] == "rd4ad"
    assert checkpoint["hyper_parameters"]["model"]["backbone"] == "resnet18"


def test_multirun_and_aggregate(env: dict[str, str], tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    run(
        "kdad.cli.train",
        [
            "-m",
            *TINY,
            "model=rd4ad,stfpm",
            "data.category=stripes,dots",
            "logger=none",
            "callbacks=none",
            f"hydra.sweep.dir={sweep}",
        ],
        env,
        tmp_path,
    )
    assert len(list(sweep.rglob("metrics.json"))) == 4
    proc = run_in_process("kdad.cli.aggregate", [str(sweep)], env, tmp_path)
    with open(sweep / "aggregate.csv") as handle:
        rows = list(csv.DictReader(handle))
    cells = [(r["model"], r["category"]) for r in rows if r["category"] != "mean"]
    assert sorted(cells) == [
        ("rd4ad", "dots"),
        ("rd4ad", "stripes"),
        ("stfpm", "dots"),
        ("stfpm", "stripes"),
    ]
    assert sorted(r["model"] for r in rows if r["category"] == "mean") == ["rd4ad", "stfpm"]
    for row in rows:
        assert 0.0 <= float(row["image_auroc_mean"]) <= 1.0
    assert "| rd4ad | synthetic | stripes |" in proc.stdout and (sweep / "aggregate.md").is_file()


def test_wandb_offline_run_holds_the_test_metrics(env: dict[str, str], tmp_path: Path) -> None:
    run(
        "kdad.cli.train",
        [*TINY, "logger=wandb", "callbacks=none", f"hydra.run.dir={tmp_path}"],
        env,
        tmp_path,
    )
    files = find_run_files(tmp_path / "wandb")
    assert len(files) == 1
    logged = read_run(files[0])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "pixel_aupro", "image_f1_max", "pixel_ap"):
        assert logged["history"][f"test/{key}"][-1] == pytest.approx(metrics[key], abs=1e-6)
    assert logged["group"] == "train" and logged["job_type"] == "train"  # task_name, command
    assert set(logged["tags"]) >= {"rd4ad", "synthetic", "stripes"}
    assert logged["config"]["model.backbone"] == "resnet18"  # flattened: filterable by any key
    assert logged["config"]["params_trainable"] == metrics["params_trainable"]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data=mvtec", "data.root=/nonexistent/mvtec"], "/nonexistent/mvtec"),
        (["data.category=marble"], "stripes"),  # unknown category: the valid ones are listed
        (["data=btad", "data.root=/nonexistent/btad"], "/nonexistent/btad"),
        (["model.backbone=not_a_net"], "not a timm model"),
    ],
)
def test_user_errors_are_one_line_without_traceback(
    overrides: list[str], expected: str, env: dict[str, str], tmp_path: Path
) -> None:
    base = (
        TINY
        if "data=" not in " ".join(overrides)
        else [a for a in TINY if not a.startswith("data.synthetic")]
    )
    proc = run_in_process(  # the command's main() in this process: it stops before training
        "kdad.cli.train", [*base, *overrides, f"hydra.run.dir={tmp_path}"], env, tmp_path, expect=2
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kdad: error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr
    assert "Error in call to target" not in errors[0]  # Hydra's wrapper is peeled off
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "FAILED").is_file()


def test_unreadable_training_image_is_named(env: dict[str, str], tmp_path: Path) -> None:
    root = tmp_path / "own"
    (root / "good").mkdir(parents=True)
    from PIL import Image

    for i in range(6):
        Image.new("RGB", (32, 32), (i * 20, 90, 120)).save(root / "good" / f"{i}.png")
    (root / "good" / "broken.png").write_bytes(b"this is not a png")
    proc = run_in_process(
        "kdad.cli.train",
        [
            *[a for a in TINY if not a.startswith("data.synthetic")],
            "data=folder",
            f"data.root={root}",
            "data.val_fraction=0",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        env,
        tmp_path,
        expect=2,
    )
    assert "broken.png" in proc.stderr and "Traceback" not in proc.stderr


def test_version_on_every_command(env: dict[str, str], tmp_path: Path) -> None:
    import kdad

    assert kdad.__version__ and kdad.__version__ != "0+unknown"  # installed: from its metadata
    for module in ("kdad.cli.train", "kdad.cli.eval", "kdad.cli.predict", "kdad.cli.export"):
        proc = run_in_process(module, ["--version"], env, tmp_path)
        assert proc.stdout.strip() == f"kdad {kdad.__version__}"
    proc = run_in_process("kdad.cli.aggregate", ["--version"], env, tmp_path)
    assert proc.stdout.strip() == f"kdad {kdad.__version__}"


def test_a_group_whose_extra_is_missing_names_the_extra(monkeypatch) -> None:
    from kdad.engine import hydra as kdad_hydra

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name.startswith(("hydra_plugins", "tensorboard")) else real(name),
    )
    for argument, extra in (
        ("hparams_search=rd4ad_optuna", "sweep"),
        ("launcher=slurm", "slurm"),
        ("launcher=local_cpu", "slurm"),
        ("logger=tensorboard", "tensorboard"),
    ):
        message = kdad_hydra.missing_extra(["model=rd4ad", argument])
        assert message == f"{argument} needs the optional extra: pip install 'kdad[{extra}]'"
    assert kdad_hydra.missing_extra(["logger=csv", "launcher=null", "model=rd4ad"]) is None


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (
            ["optimizer._target_=shutil.copyfile", "+optimizer.src=a.txt", "+optimizer.dst=b.txt"],
            "optimizer._target_=shutil.copyfile: optimizer may instantiate only torch.optim.",
        ),
        (["+callbacks.evil._target_=os.system"], "callbacks.evil._target_=os.system"),
        (["+evil._target_=builtins.exec"], "evil may instantiate only none"),
        (["logger.csv._target_=subprocess.run"], "logger.csv._target_=subprocess.run"),
    ],
)
def test_targets_outside_their_group_are_refused_before_anything_runs(
    args: list[str], words: str, env: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "a.txt").write_text("x")
    proc = run_in_process(
        "kdad.cli.train",
        [*TINY, "logger=csv", *args, f"hydra.run.dir={tmp_path / 'r'}"],
        env,
        tmp_path,
        expect=2,
    )
    assert words in proc.stderr and "allow_targets=[" in proc.stderr
    assert not (tmp_path / "b.txt").exists() and not (tmp_path / "r" / "checkpoints").exists()


def test_allow_targets_opts_a_module_in(env: dict[str, str], tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from kdad.engine import validate

    cfg = OmegaConf.create(
        {"optimizer": {"_target_": "my_package.optim.Lion"}, "allow_targets": []}
    )
    with pytest.raises(KDADError, match=r"allow_targets=\[my_package.optim\]"):
        validate.check_targets(cfg)
    cfg.allow_targets = ["my_package"]
    validate.check_targets(cfg)  # opted in
    cfg.optimizer._target_ = "torch.optim.AdamW"
    cfg.allow_targets = []
    validate.check_targets(cfg)
