"""From checkpoint to inspection line: thresholds fit after training, kdad-predict, safe loading.

One tiny RD4AD checkpoint is trained once for the module with the real kdad-train (resnet18,
random weights, 64 px synthetic data, one epoch) and reused. Checked: the final checkpoint
carries thresholds fit on the validation split (recomputed here independently, and different
from what the test images would give); kdad-predict scores a folder of awkward files (same
names in different folders, unreadable, 3x5, 4000x3000, 16-bit, RGBA, palette, CMYK, odd
names) into predictions.csv and overlays inside its run folder, with the scores of the
PyTorch model; glob/file/list inputs; no thresholds; and every kind of bad checkpoint gives
one line, never a traceback or code execution.
"""

from __future__ import annotations

import csv
import json
import math
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from clirun import TINY, run, run_in_process
from omegaconf import OmegaConf
from PIL import Image

from kdad.config import CONFIG_DIR
from kdad.data import AnomalyDataModule, Preprocess, load_image
from kdad.errors import KDADError
from kdad.inference.predict import (
    HEADER,
    find_inputs,
    inside,
    map_to_display,
    output_names,
    predict,
    resolve_device,
)
from kdad.io.checkpoint import read_checkpoint, sign, write_checkpoint
from kdad.lightning.loading import load_module, save_checkpoint
from kdad.metrics.thresholds import fit_from_values, normalize, settings


@pytest.fixture(scope="module")
def trained(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder of one tiny training run (no test phase)."""
    out = tmp_path_factory.mktemp("train")
    run(
        "kdad.cli.train",
        [*TINY, "test=false", "logger=none", "callbacks=none", f"hydra.run.dir={out}"],
        env,
        out,
    )
    return out


@pytest.fixture(scope="module")
def datamodule(env: dict[str, str], trained: Path) -> AnomalyDataModule:
    """The training run's data, split exactly as kdad-train split it (same seed)."""
    data = AnomalyDataModule(
        layout="synthetic",
        root=str(Path(env["KDAD_CACHE_DIR"]) / "synthetic"),
        category="stripes",
        image_size=64,
        num_workers=0,
        val_fraction=0.1,
        split_seed=111,
        synthetic={"resolution": 64, "num_train": 16, "num_test_good": 6, "num_test_per_defect": 2},
    )
    data.prepare_data()
    data.setup()
    return data


def scores_of(net: torch.nn.Module, loader) -> tuple[np.ndarray, np.ndarray]:
    scores, maps = [], []
    with torch.no_grad():
        for batch in loader:
            m, s = net.predict(batch["image"])
            scores.append(s)
            maps.append(m)
    return torch.cat(scores).numpy(), torch.cat(maps).numpy()


# --- thresholds ---------------------------------------------------------------------------
def test_final_checkpoint_holds_thresholds_fit_on_validation_images(
    trained: Path, datamodule
) -> None:
    checkpoint = read_checkpoint(trained)  # a run folder works as ckpt_path
    fitted = checkpoint["kdad"]["thresholds"]
    assert (
        fitted["split"] == "validation" and fitted["num_images"] == len(datamodule.val_dataset) == 2
    )
    module = load_module(trained)
    val_scores, val_maps = scores_of(module.net, datamodule.val_dataloader())
    assert fitted["image"]["method"] == "quantile" and fitted["image"]["quantile"] == 0.99
    assert fitted["image"]["threshold"] == pytest.approx(np.quantile(val_scores, 0.99), rel=1e-6)
    assert fitted["image"]["center"] == pytest.approx(np.median(val_scores), rel=1e-6)
    assert fitted["pixel"]["threshold"] == pytest.approx(np.quantile(val_maps, 0.999), rel=1e-5)
    # Never the test set: its normal images would give another threshold.
    test_scores, _ = scores_of(module.net, datamodule.test_dataloader())
    labels = np.array([s.label for s in datamodule.test_dataset.samples])
    assert not math.isclose(
        fitted["image"]["threshold"], np.quantile(test_scores[labels == 0], 0.99), rel_tol=1e-6
    )
    record = (trained / "thresholds.json").read_text()
    assert '"fitted": true' in record and str(fitted["image"]["threshold"])[:8] in record


def _linear_quantile(values: np.ndarray, q: float) -> float:
    """The q-quantile by sorting and linear interpolation between order statistics."""
    ordered = sorted(values.tolist())
    position = q * (len(ordered) - 1)
    below = int(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (position - below) * (ordered[above] - ordered[below])


def test_threshold_methods_and_normalisation() -> None:
    normal = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    pixels = np.random.default_rng(0).random(1001)
    fitted = fit_from_values(
        {
            "scores": normal,
            "labels": np.zeros(5, int),
            "pixel_values": pixels,
            "pixel_labels": None,
        },
        # Not conf/train.yaml's defaults: a quantile hard-coded in kdad would show.
        {"image_quantile": 0.75, "pixel_quantile": 0.9},
    )
    image = fitted["image"]
    assert image["threshold"] == 4.0 and image["center"] == 3.0 and image["method"] == "quantile"
    assert (
        normalize(4.0, image) == 1.0
        and normalize(3.0, image) == 0.0
        and normalize(5.0, image) == 2.0
    )
    pixel = fitted["pixel"]
    assert pixel["method"] == "quantile" and pixel["quantile"] == 0.9
    assert pixel["threshold"] == pytest.approx(_linear_quantile(pixels, 0.9), abs=1e-12)
    assert pixel["center"] == pytest.approx(_linear_quantile(pixels, 0.5), abs=1e-12)
    # With labelled anomalies (auto -> f1): the cut separating them perfectly, strict ">" rule.
    scores = np.array([1.0, 2.0, 3.0, 7.0, 8.0])
    labels = np.array([0, 0, 0, 1, 1])
    f1 = fit_from_values(
        {"scores": scores, "labels": labels, "pixel_values": pixels, "pixel_labels": None}, {}
    )["image"]
    assert f1["method"] == "f1" and f1["f1"] == 1.0 and 3.0 < f1["threshold"] < 7.0
    assert list(scores > f1["threshold"]) == [False, False, False, True, True]
    with pytest.raises(KDADError, match="needs labelled anomalies"):
        fit_from_values(
            {
                "scores": normal,
                "labels": np.zeros(5, int),
                "pixel_values": pixels,
                "pixel_labels": None,
            },
            {"method": "f1"},
        )
    with pytest.raises(KDADError, match=r"thresholds\.image_quantile=1\.5"):
        settings({"image_quantile": 1.5})
    with pytest.raises(KDADError, match="unknown key"):
        settings({"quantile": 0.9})


def test_no_validation_split_fits_no_thresholds(caplog: pytest.LogCaptureFixture) -> None:
    from kdad.lightning.callbacks import ThresholdFitter

    module = SimpleNamespace(thresholds={"stale": True})
    trainer = SimpleNamespace(datamodule=SimpleNamespace(val_dataset=None))
    ThresholdFitter(settings(None)).on_fit_end(trainer, module)
    assert module.thresholds is None
    assert "data.val_fraction=0" in caplog.text and "no thresholds were fit" in caplog.text


# --- kdad-predict -------------------------------------------------------------------------
def awkward_folder(root: Path, datamodule) -> dict[str, Path]:
    """Real test images plus every kind of awkward file; returns name -> path of a few."""
    tests = datamodule.test_dataset.samples
    good = next(s.image_path for s in tests if s.label == 0)
    bad = next(s.image_path for s in tests if s.label == 1)
    files = {
        "a_same": root / "line1" / "part.png",
        "b_same": root / "line2" / "part.png",
        "anomalous": root / "line2" / "defect.png",
        "spaces": root / "odd names" / "my part (1) é.png",
        "dots": root / "part..v2..png",
        "reserved": root / "CON.png",
        "case": root / "Part.PNG",
        "bmp_twin": root / "line1" / "part.bmp",
    }
    for key, path in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.open(bad if key == "anomalous" else good).convert("RGB").save(path)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (3, 5, 3), dtype=np.uint8)).save(root / "tiny_3x5.png")
    ramp = np.linspace(0, 255, 4000, dtype=np.float32)[None, :, None]
    Image.fromarray(np.broadcast_to(ramp, (3000, 4000, 3)).astype(np.uint8)).save(
        root / "huge_4000x3000.jpg"
    )
    Image.fromarray(rng.integers(0, 65535, (40, 50), dtype=np.uint16)).save(
        root / "sixteen_bit.png"
    )
    Image.new("RGBA", (30, 20), (10, 200, 30, 100)).save(root / "rgba.png")
    Image.new("P", (30, 20), 3).save(root / "palette.bmp")
    Image.new("CMYK", (30, 20), (10, 20, 30, 40)).save(root / "cmyk.tif")
    Image.new("L", (30, 20), 90).save(root / "gray.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
    (root / "truncated.jpg").write_bytes((root / "huge_4000x3000.jpg").read_bytes()[:500])
    (root / ".hidden.png").write_bytes(b"skipped: hidden")
    (root / "notes.txt").write_text("skipped: not an image extension")
    return {k: v for k, v in files.items()}


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_predict_cli_on_a_folder_of_awkward_files(
    trained: Path, datamodule, env, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    files = awkward_folder(folder, datamodule)
    out = tmp_path / "out"
    proc = run(
        "kdad.cli.predict",
        [
            f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}",
            f"input={folder}",
            "batch_size=4",
            "num_workers=1",
            "overlay_size=96",
            f"hydra.run.dir={out}",
        ],
        env,
        tmp_path,
    )
    rows = read_rows(out / "predictions.csv")
    assert tuple(rows[0]) == HEADER
    expected = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() != ".txt" and not p.name.startswith(".hidden")
    )
    assert sorted(Path(r["path"]) for r in rows) == expected  # every image file exactly once
    failed = {Path(r["path"]).name: r for r in rows if r["status"] == "failed"}
    assert set(failed) == {"broken.png", "truncated.jpg"}
    assert all("cannot read image file" in r["error"] and r["score"] == "" for r in failed.values())
    assert (proc.stdout + proc.stderr).count(
        "skipped: cannot read image file"
    ) == 2 and "Traceback" not in proc.stderr
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == len(expected) - 2
    module = load_module(trained)
    thresholds = module.thresholds
    preprocess = Preprocess(64)
    for row in ok:
        score = float(row["score"])
        assert math.isfinite(score)
        assert float(row["normalized_score"]) == pytest.approx(
            normalize(score, thresholds["image"])
        )
        assert row["label"] == str(int(score > thresholds["image"]["threshold"]))
        assert 0.0 <= float(row["defect_fraction"]) <= 1.0
    by_name = {Path(r["path"]): r for r in rows}
    for path in (
        files["a_same"],
        files["anomalous"],
        folder / "tiny_3x5.png",
        folder / "sixteen_bit.png",
    ):
        with torch.no_grad():
            _, expected_score = module.net.predict(preprocess(load_image(path))[None])
        assert float(by_name[path]["score"]) == pytest.approx(float(expected_score), rel=1e-5)
    # Overlays: one per scored image, unique, all inside the run folder's overlays/.
    overlays = [r["overlay"] for r in ok]
    assert len(set(overlays)) == len(ok) and all(
        o.startswith("overlays/") and o.endswith(".png") for o in overlays
    )
    written = sorted(p.name for p in (out / "overlays").iterdir())
    assert written == sorted(Path(o).name for o in overlays)
    assert all((out / "overlays").resolve() == (out / o).resolve().parent for o in overlays)
    assert by_name[files["a_same"]]["overlay"] != by_name[files["b_same"]]["overlay"]
    twins = {by_name[files["a_same"]]["overlay"], by_name[files["bmp_twin"]]["overlay"]}
    assert twins == {"overlays/line1__part.png", "overlays/line1__part-2.png"}
    huge = np.asarray(Image.open(out / by_name[folder / "huge_4000x3000.jpg"]["overlay"]))
    assert huge.shape[1] == 3 * 96 and huge.shape[0] > 72  # 3 panels of 96x72 (+ caption)
    tiny = np.asarray(Image.open(out / by_name[folder / "tiny_3x5.png"]["overlay"]))
    assert tiny.shape[1] == 3 * 96
    outside = (
        {p for p in tmp_path.rglob("*")}
        - {p for p in out.rglob("*")}
        - {p for p in folder.rglob("*")}
    )
    assert outside <= {out, folder}  # nothing written anywhere else


def call_predict(
    cfg_changes: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> list[dict[str, str]]:
    """kdad.predict.predict in-process on conf/predict.yaml's defaults; returns the CSV rows."""
    cfg = OmegaConf.load(Path(CONFIG_DIR) / "predict.yaml")
    del cfg["defaults"]
    cfg = OmegaConf.merge(
        cfg, {"num_workers": 0, "progress": False, "overlays": False, **cfg_changes}
    )
    out = tmp_path / "run"
    out.mkdir(exist_ok=True)
    monkeypatch.chdir(out)  # without Hydra, the run folder is the working directory
    predict(cfg)
    return read_rows(out / "predictions.csv")


def test_glob_file_and_list_inputs(trained: Path, datamodule, tmp_path: Path, monkeypatch) -> None:
    samples = datamodule.test_dataset.samples
    ckpt = str(trained)
    pattern = str(Path(samples[0].image_path).parent.parent / "*" / "00[01].png")
    rows = call_predict({"ckpt_path": ckpt, "input": pattern}, tmp_path, monkeypatch)
    matched = sorted(str(p) for p in Path(samples[0].image_path).parent.parent.glob("*/00[01].png"))
    assert sorted(r["path"] for r in rows) == matched and all(r["status"] == "ok" for r in rows)
    one = str(samples[0].image_path)
    rows = call_predict(
        {"ckpt_path": ckpt, "input": [one, one, str(samples[1].image_path)]}, tmp_path, monkeypatch
    )
    assert [r["path"] for r in rows] == [one, str(samples[1].image_path)]  # duplicates once
    with pytest.raises(KDADError, match="no such file or folder"):
        call_predict(
            {"ckpt_path": ckpt, "input": str(tmp_path / "nope.png")}, tmp_path, monkeypatch
        )
    with pytest.raises(KDADError, match="matches no file"):
        call_predict({"ckpt_path": ckpt, "input": str(tmp_path / "*.png")}, tmp_path, monkeypatch)


def test_checkpoint_without_thresholds_gives_scores_only(
    trained: Path, datamodule, tmp_path: Path, monkeypatch, caplog
) -> None:
    checkpoint = read_checkpoint(trained)
    checkpoint["kdad"]["thresholds"] = None  # as trained with data.val_fraction=0
    bare = tmp_path / "bare.ckpt"
    write_checkpoint(checkpoint, bare)  # kdad's writer: re-signed
    image = str(datamodule.test_dataset.samples[0].image_path)
    rows = call_predict(
        {"ckpt_path": str(bare), "input": image, "overlays": True}, tmp_path, monkeypatch
    )
    assert (
        rows[0]["score"] != ""
        and rows[0]["normalized_score"] == rows[0]["label"] == rows[0]["defect_fraction"] == ""
    )
    assert "holds no image threshold" in caplog.text
    score = float(rows[0]["score"])
    rows = call_predict(
        {"ckpt_path": str(bare), "input": image, "image_threshold": score - 1},
        tmp_path,
        monkeypatch,
    )
    assert rows[0]["label"] == "1" and float(rows[0]["normalized_score"]) > 1


def test_output_names_are_safe_and_unique(tmp_path: Path) -> None:
    base = Path("/in")
    files = [
        Path("/in/a/x.png"),
        Path("/in/b/x.png"),
        Path("/in/x.png"),
        Path("/in/X.png"),
        Path("/in/x.bmp"),
        Path("/in/../../etc/passwd.png"),  # not below the base: its name only
        Path("/in/.../..png"),
        Path("/in/CON.png"),
        Path("/in/" + "long" * 100 + ".png"),
        Path("/in/é ü/ß.png"),
    ]
    names = output_names([(f, base) for f in files])
    assert len({n.lower() for n in names}) == len(names)
    assert names[:5] == ["a__x.png", "b__x.png", "x.png", "X-2.png", "x-3.png"]
    for name in names:
        assert "/" not in name and "\\" not in name and not name.startswith((".", "-"))
        assert len(name) <= 130 and inside(tmp_path, name).parent == tmp_path.resolve()
    assert names[7] == "_CON.png"
    for bad in ("../x.png", "a/../../x.png", ".."):
        with pytest.raises(KDADError, match="outside"):
            inside(tmp_path, bad)


def test_find_inputs_skips_hidden_and_non_images(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("a.png", "sub/b.JPG", ".c.png", "d.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "e.png").write_bytes(b"x")
    found = [f.relative_to(tmp_path).as_posix() for f, _ in find_inputs(str(tmp_path))]
    assert found == ["a.png", "sub/b.JPG"]
    assert [f.name for f, _ in find_inputs(str(tmp_path), recursive=False)] == ["a.png"]


def test_map_is_placed_where_the_model_saw_the_image() -> None:
    anomaly_map = torch.arange(16.0).view(4, 4)
    full = map_to_display(anomaly_map, Preprocess(4), (8, 12))
    assert full.shape == (8, 12) and np.isfinite(full).all()
    cropped = map_to_display(anomaly_map, Preprocess(8, crop_size=4), (16, 16))
    assert (
        np.isnan(cropped[:4]).all()
        and np.isnan(cropped[:, 12:]).all()
        and np.isfinite(cropped[4:12, 4:12]).all()
    )


def test_device_choice() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(KDADError, match="expected auto, cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(KDADError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_predict_on_gpu_matches_cpu(trained: Path, datamodule, tmp_path: Path, monkeypatch) -> None:
    image = str(datamodule.test_dataset.samples[0].image_path)
    cpu = call_predict(
        {"ckpt_path": str(trained), "input": image, "device": "cpu"}, tmp_path / "c", monkeypatch
    )
    gpu = call_predict(
        {"ckpt_path": str(trained), "input": image, "device": "cuda"}, tmp_path / "g", monkeypatch
    )
    assert float(gpu[0]["score"]) == pytest.approx(float(cpu[0]["score"]), rel=1e-4)


# --- safe loading -------------------------------------------------------------------------
class _Payload:
    """A pickled object whose unpickling would create a file: it must never run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def bad_checkpoints(trained: Path, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, expected words in the one-line error)."""
    # The trained weights without optimiser state: a smaller file to damage.
    clean = save_checkpoint(load_module(trained), tmp_path / "weights_only.ckpt")
    good = clean.read_bytes()
    marker = tmp_path / "EXECUTED"
    files: dict[str, tuple[Path, str]] = {}

    def write(name: str, data: bytes, words: str) -> None:
        (tmp_path / name).write_bytes(data)
        files[name] = (tmp_path / name, words)

    def save(name: str, checkpoint: dict, words: str) -> None:
        torch.save(checkpoint, tmp_path / name)
        files[name] = (tmp_path / name, words)

    write("truncated.ckpt", good[: len(good) // 2], "truncated or corrupted")
    flipped = bytearray(good)
    flipped[200:400] = bytes(b ^ 0xFF for b in flipped[200:400])
    write("flipped.ckpt", bytes(flipped), "truncated or corrupted")
    # Flipped bits inside the weights: torch.load does not notice, the recorded checksum does.
    middle = len(flipped) // 2
    rotten = bytearray(good)
    rotten[middle : middle + 64] = bytes(b ^ 0xFF for b in rotten[middle : middle + 64])
    write("bitrot.ckpt", bytes(rotten), "do not match the digest recorded when it was saved")
    write("empty.ckpt", b"", "empty or truncated")
    write("random.ckpt", np.random.default_rng(0).bytes(5000), "not a torch checkpoint file")
    save("foreign.ckpt", {"state_dict": {"w": torch.ones(2)}, "epoch": 3}, "not a kdad checkpoint")
    save("object.ckpt", {"kdad": {}, "payload": _Payload(marker)}, "contains pickled code")
    write(
        "plain_pickle.ckpt",
        pickle.dumps({"payload": _Payload(marker)}),
        "not a torch checkpoint file",
    )
    checkpoint = read_checkpoint(clean)
    hparams = checkpoint["hyper_parameters"]
    # The one digest covers weights, thresholds and hyper-parameters: removing it is refused,
    # changing any of them without re-signing is refused.
    unsigned = {k: v for k, v in checkpoint["kdad"].items() if k != "sha256"}
    save("unsigned.ckpt", {**checkpoint, "kdad": unsigned}, "carries no integrity digest")
    moved = json.loads(json.dumps(checkpoint["kdad"]["thresholds"]))
    moved["image"]["threshold"] = -1e9
    save(
        "threshold.ckpt",
        {**checkpoint, "kdad": {**checkpoint["kdad"], "thresholds": moved}},
        "do not match the digest",
    )
    resized = {**hparams, "preprocess": {**hparams["preprocess"], "image_size": 32}}
    save("preprocess.ckpt", {**checkpoint, "hyper_parameters": resized}, "do not match the digest")
    # A digest can be recomputed by whoever edits the file (integrity, not authenticity): the
    # checks behind it must hold on their own. These are re-signed.
    unchecked = checkpoint["kdad"]

    def save_signed(name: str, checkpoint: dict, words: str) -> None:
        save(name, sign(checkpoint), words)

    # Hyper-parameters that would make Hydra call something else than a kdad variant.
    touch = {"_target_": "pathlib.Path.touch", "self": str(marker)}
    save_signed(
        "target.ckpt",
        {"state_dict": {}, "kdad": unchecked, "hyper_parameters": {**hparams, "model": touch}},
        "is not a kdad variant; refusing to build it",
    )
    nested_model = {**hparams["model"], "anomaly_map": touch}
    save_signed(
        "nested.ckpt",
        {
            "state_dict": {},
            "kdad": unchecked,
            "hyper_parameters": {**hparams, "model": nested_model},
        },
        "nested _target_ is not allowed",
    )
    state = dict(checkpoint["state_dict"])
    key = next(k for k in state if k.startswith("net.decoder") and state[k].ndim == 4)
    state[key] = torch.zeros(1, 1, 1, 1)
    save_signed(
        "reshaped.ckpt",
        {**checkpoint, "state_dict": state, "kdad": unchecked},
        "weights do not fit the model=rd4ad",
    )
    return files


def test_bad_checkpoints_give_one_line_and_run_nothing(trained: Path, tmp_path: Path) -> None:
    for name, (path, words) in bad_checkpoints(trained, tmp_path).items():
        with pytest.raises(KDADError) as caught:
            load_module(path)
            pytest.fail(f"{name} was loaded")
        message = str(caught.value)
        assert words in message and "\n" not in message and len(message) < 400, (name, message)
    assert not (tmp_path / "EXECUTED").exists()
    # A file the user trusts loads unsigned on request; a changed one never does.
    assert load_module(tmp_path / "unsigned.ckpt", allow_unsigned=True).thresholds
    with pytest.raises(KDADError, match="do not match the digest"):
        load_module(tmp_path / "threshold.ckpt", allow_unsigned=True)
    with pytest.raises(KDADError, match="no such file"):
        load_module(tmp_path / "missing.ckpt")
    with pytest.raises(KDADError, match=r"without checkpoints/last\.ckpt"):
        load_module(tmp_path)


def test_predict_cli_rejects_a_tampered_checkpoint(env, tmp_path: Path) -> None:
    torch.save({"kdad": {}, "payload": _Payload(tmp_path / "EXECUTED")}, tmp_path / "object.ckpt")
    Image.new("RGB", (8, 8)).save(tmp_path / "part.png")
    proc = run_in_process(
        "kdad.cli.predict",
        [
            f"ckpt_path={tmp_path / 'object.ckpt'}",
            f"input={tmp_path}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        env,
        tmp_path,
        expect=2,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kdad: error:")]
    assert (
        len(errors) == 1 and "contains pickled code" in errors[0] and "Traceback" not in proc.stderr
    )
    assert not (tmp_path / "EXECUTED").exists()


def test_a_run_folder_means_the_checkpoint_it_tested(tmp_path: Path) -> None:
    from kdad.io.run_folder import resolve_checkpoint

    (tmp_path / "checkpoints").mkdir()
    for name in ("last.ckpt", "best.ckpt"):
        (tmp_path / "checkpoints" / name).write_bytes(b"")
    (tmp_path / "config.yaml").write_text("task_name: train\ntest_ckpt: last\n")
    assert resolve_checkpoint(tmp_path).name == "last.ckpt"
    (tmp_path / "config.yaml").write_text("task_name: train\ntest_ckpt: best\n")  # STFPM
    assert resolve_checkpoint(tmp_path).name == "best.ckpt"


def test_predict_fails_when_no_input_could_be_read(trained: Path, env, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"not a png")
    (folder / "b.jpg").write_bytes(b"")
    out = tmp_path / "out"
    proc = run_in_process(
        "kdad.cli.predict",
        [f"ckpt_path={trained}", f"input={folder}", f"hydra.run.dir={out}"],
        env,
        tmp_path,
        expect=2,
    )
    assert "kdad: error: none of the 2 input image(s) could be read" in proc.stderr
    rows = read_rows(out / "predictions.csv")  # the reasons are written first
    assert [r["status"] for r in rows] == ["failed", "failed"]
