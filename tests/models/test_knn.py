"""model=knn, the training-free reference: the bank (bounded, coreset or random, from training
images only), nearest-neighbour maps, checkpoints, export-friendly search, and the CLI path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from clirun import TINY, run, run_in_process
from torch.utils.data import DataLoader

from kdad.errors import KDADError
from kdad.models.knn import KNN, greedy_coreset


def small(**kwargs) -> KNN:
    return KNN(**{"backbone": "resnet18", "pretrained": False, **kwargs})


def loader(images: torch.Tensor, batch_size: int = 4) -> DataLoader:
    return DataLoader([{"image": image} for image in images], batch_size=batch_size)


def test_greedy_coreset_covers_every_cluster_random_subsample_is_seeded() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    # 1000 points around the first centre, 5 around each of the others.
    points = torch.cat(
        [centres[0] + torch.randn(1000, 2, generator=generator) * 0.1]
        + [c + torch.randn(5, 2, generator=generator) * 0.1 for c in centres[1:]]
    )
    chosen = greedy_coreset(points, 4, projection_dim=0, seed=0)
    assert len(set(chosen.tolist())) == 4
    nearest_centre = torch.cdist(points[chosen], centres).argmin(dim=1)
    assert sorted(nearest_centre.tolist()) == [0, 1, 2, 3]  # one per cluster, however small
    torch.testing.assert_close(chosen, greedy_coreset(points, 4, projection_dim=0, seed=0))


@pytest.mark.parametrize("sampling", ["coreset", "random"])
def test_bank_is_bounded_and_built_from_the_training_images(sampling: str) -> None:
    torch.manual_seed(0)
    images = torch.randn(6, 3, 64, 64)
    model = small(bank_size=50, sampling=sampling).eval()
    model.before_fit(loader(images))
    patches = model.patch_features(images)  # 8 x 8 grid at stride 8
    assert patches.shape == (6, 64 + 128 + 256, 8, 8)
    assert model.bank.shape == (50, 448)
    rows = patches.permute(0, 2, 3, 1).reshape(-1, 448)
    # Every bank entry is one of the training patches.
    distance = (model.bank[:, None] - rows[None]).pow(2).sum(-1)  # exact, unlike cdist's
    assert distance.min(dim=1).values.max() < 1e-8
    again = small(bank_size=50, sampling=sampling).eval()
    again.load_state_dict(model.state_dict())  # teacher weights too: same patches
    again.before_fit(loader(images))
    torch.testing.assert_close(again.bank, model.bank)  # deterministic


def test_map_is_zero_on_a_training_image_and_high_on_a_planted_defect() -> None:
    torch.manual_seed(0)
    images = torch.rand(4, 3, 64, 64)
    model = small(bank_size=10_000, anomaly_map={"sigma": 0.0}).eval()
    model.before_fit(loader(images))  # the bank holds every patch
    maps, scores = model.predict(images[:1])
    assert maps.shape == (1, 1, 64, 64) and maps.abs().max() < 1e-3
    defect = images[:1].clone()
    defect[:, :, 24:40, 24:40] = 3.0
    maps, defect_scores = model.predict(defect)
    assert defect_scores[0] > 10 * (scores[0] + 1e-3)
    inside, outside = maps[0, 0, 24:40, 24:40].mean(), maps[0, 0, :8, :8].mean()
    assert inside > 2 * outside


def test_bank_travels_with_the_state_dict_and_empty_bank_is_an_error() -> None:
    torch.manual_seed(0)
    model = small(bank_size=20).eval()
    fresh = small(bank_size=20).eval()
    with pytest.raises(KDADError, match="memory bank is empty"):
        fresh.predict(torch.rand(1, 3, 64, 64))
    model.before_fit(loader(torch.rand(4, 3, 64, 64)))
    fresh.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(fresh.predict(x)[0], model.predict(x)[0])
    assert model.num_parameters(trainable=True) == 0


def test_nearest_search_in_chunks_equals_the_whole_search() -> None:
    torch.manual_seed(0)
    model = small(bank_size=100).eval()
    model.before_fit(loader(torch.rand(4, 3, 64, 64)))
    patches = model.patch_features(torch.rand(3, 3, 64, 64))
    whole = model.nearest(patches, chunk=10**6)
    torch.testing.assert_close(model.nearest(patches, chunk=7), whole)
    # The nearest entry is the one cdist picks.
    rows = patches.permute(0, 2, 3, 1).reshape(-1, patches.shape[1])
    expected = model.bank[(rows[:, None] - model.bank[None]).pow(2).sum(-1).argmin(dim=1)]
    torch.testing.assert_close(whole.permute(0, 2, 3, 1).reshape(-1, patches.shape[1]), expected)


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("stride", 6, "model.stride=6"),
        ("patch_size", 2, "odd"),
        ("bank_size", 0, "model.bank_size"),
        ("sampling", "all", "model.sampling"),
    ],
)
def test_bad_settings_are_one_line_errors(key: str, value: object, words: str) -> None:
    with pytest.raises(KDADError, match=words):
        small(**{key: value})


def test_knn_runs_through_train_eval_and_export(env: dict[str, str], tmp_path: Path) -> None:
    """The reference line goes through the same commands as every variant: one pass builds
    the bank (nothing trained), the run folder holds the contract files, kdad-eval re-tests
    the checkpoint to the same metrics, and the model exports."""
    data = [a for a in TINY if a.startswith("data.")]
    train = run(
        "kdad.cli.train",
        ["model=knn", *TINY, "logger=none", f"hydra.run.dir={tmp_path / 'run'}"],
        env,
        tmp_path,
    )
    assert "knn memory bank" in train.stdout + train.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["model"] == "knn" and metrics["params_trainable"] == 0
    assert 0 <= metrics["image_auroc"] <= 1
    run_in_process(
        "kdad.cli.eval",
        [
            f"ckpt_path={tmp_path / 'run'}/checkpoints/last.ckpt",
            *data,
            "logger=none",
            f"hydra.run.dir={tmp_path / 'eval'}",
        ],
        env,
        tmp_path,
    )
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "pixel_aupro"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-6)
    run_in_process(
        "kdad.cli.export",
        [f"ckpt_path={tmp_path / 'run'}", "format=torchscript", f"output={tmp_path / 'k.pt'}"],
        env,
        tmp_path,
    )
    assert (tmp_path / "k.pt").is_file()
