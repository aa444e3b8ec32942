"""The typed schema of the model and data groups (kdad/config.py).

A typo or a wrong type is refused while Hydra composes, naming the key and the expected type
or choices; the composed configs hold the same values as before the schema (a snapshot taken
then: tests/config_snapshot.json); the YAML files set only what differs from the defaults,
which live once, in the constructors' signatures (read from the source, checked here against
``inspect``); a checkpoint's hyper-parameters stay plain data, and an older checkpoint's plain
strings still build the model.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import io
import json
import pickle
import subprocess
import sys
import typing
from enum import Enum
from pathlib import Path
from typing import Any

import pytest
import torch
from clirun import TINY, run_in_process
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from kdad import config
from kdad.config import CONFIG_DIR, flatten
from kdad.errors import KDADError

SNAPSHOT = json.loads((Path(__file__).parent / "config_snapshot.json").read_text())
CASES = sorted(k for k in SNAPSHOT if not k.startswith("_"))
# Keys the schema adds to a composed config: settings the code always had, now shown (value
# unchanged: the constructor's default, which the YAML used to leave implicit).
ADDED = {"model.anomaly_map.fuse_at": "image"}
YAML = sorted((Path(CONFIG_DIR) / "model").glob("*.yaml")) + sorted(
    (Path(CONFIG_DIR) / "data").glob("*.yaml")
)
TARGETS = [*config.MODEL_SCHEMAS.values(), "kdad.data.datamodule.AnomalyDataModule"]


def _compose(config_name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name, overrides=overrides)


def _import(dotted: str) -> Any:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _choices(kind: Any) -> type[Enum] | None:
    """The Enum in an annotation (``Alignment | str``, ``Optional[...]``), if any."""
    for candidate in (kind, *typing.get_args(kind)):
        if isinstance(candidate, type) and issubclass(candidate, Enum):
            return candidate
    return None


def _schema_choice_keys(schema: type, prefix: str = "") -> list[tuple[str, type[Enum]]]:
    found = []
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(f.type):
            found += _schema_choice_keys(f.type, f"{prefix}{f.name}.")
        elif _choices(f.type) is not None:
            found.append((f"{prefix}{f.name}", _choices(f.type)))
    return found


# --- refused while composing ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "key", "words"),
    [
        ("model.cbam=flase", "model.cbam", "'flase' is not a valid bool"),
        ("data.batch_size=1.5", "data.batch_size", "could not be converted to Integer"),
        ("model.alignment=crosss", "model.alignment", "expected one of [cross, same, both]"),
        ("data.image_size=abc", "data.image_size", "could not be converted to Integer"),
    ],
)
def test_a_wrong_type_or_choice_is_refused_while_composing(
    override: str, key: str, words: str
) -> None:
    with pytest.raises(ConfigCompositionException) as caught:
        _compose("train", ["model=hkt", override])
    cause = caught.value.__cause__
    assert isinstance(cause, ValidationError), repr(cause)
    assert cause.full_key == key and words in str(cause), str(cause)


def test_the_command_stops_with_one_line_before_any_work(
    env: dict[str, str], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    args = [*TINY, "model=hkt", "model.alignment=crosss", f"hydra.run.dir={run}"]
    proc = run_in_process("kdad.cli.train", args, env, tmp_path, expect=2)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kdad: error:"), proc.stderr
    assert "model.alignment=crosss" in lines[0] and "cross, same, both" in lines[0]
    assert not run.exists()  # refused before the run folder is made


@pytest.mark.parametrize("name", sorted(config.schemas()))
def test_every_choice_key_is_an_enum_whose_error_lists_the_choices(name: str) -> None:
    schema = config.schemas()[name]
    node = OmegaConf.structured(schema)
    keys = _schema_choice_keys(schema)
    assert keys  # every variant's map settings, every layout's layout and mask_resize
    for key, choices in keys:
        values = [m.value for m in choices]
        assert [m.name for m in choices] == values  # OmegaConf validates by name
        with pytest.raises(ValidationError, match=r"expected one of \[" + ", ".join(values)):
            OmegaConf.update(node, key, "nosuch")
        OmegaConf.update(node, key, values[-1])
        assert str(OmegaConf.select(node, key)) == values[-1]  # prints as the plain value


def test_the_data_schemas_follow_the_data_module() -> None:
    from kdad.data import datamodule, transforms

    layout_keys = config.layout_only_keys()
    assert tuple(layout_keys) == datamodule.LAYOUTS
    assert layout_keys["folder"] == datamodule._FOLDER_ONLY
    assert set(datamodule.GENERATED) == {k for k, v in layout_keys.items() if v == (k,)}
    assert {m.value for m in datamodule.MaskResize} == set(transforms.MASK_RESIZE)
    for layout in layout_keys:
        fields = {f.name for f in dataclasses.fields(config.schemas()[f"schema_data_{layout}"])}
        others = {k for lay, keys in layout_keys.items() if lay != layout for k in keys}
        assert not fields & others, (layout, fields & others)
        assert set(layout_keys[layout]) <= fields


# --- the same values as before ----------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_composed_configs_hold_the_values_they_held_before_the_schema(case: str) -> None:
    cfg = _compose("train" if case.startswith("model=") else "eval", [case])
    container = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    now = flatten({k: container[k] for k in SNAPSHOT[case]})
    before = flatten(SNAPSHOT[case])
    assert {k: now.get(k, "<missing>") for k in before} == before
    assert {k: v for k, v in now.items() if k not in before} == {
        k: v for k, v in ADDED.items() if k in now and k not in before
    }


@pytest.mark.parametrize("path", YAML, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_the_yaml_sets_only_what_differs_from_the_schema(path: Path) -> None:
    group = path.parent.name
    raw = OmegaConf.load(path)
    schema_name = _schema_of(path)
    defaults = OmegaConf.structured(config.schemas()[schema_name])
    section = raw.get("model") if group == "model" else raw
    given = flatten(OmegaConf.to_container(section, resolve=False)) if section else {}
    given.pop("defaults", None)
    assert "_target_" not in given  # the schema names the class
    container = OmegaConf.to_container(defaults, enum_to_str=True)
    for key, value in given.items():
        default: Any = container
        for part in key.split("."):
            default = default.get(part) if isinstance(default, dict) else None
        if default == "???":  # required: the file must set it
            continue
        assert value != default, f"{path.name}: {group}.{key}={value!r} repeats the default"


def _schema_of(path: Path) -> str:
    """The schema a model/data file names in its defaults list (or inherits from its parent)."""
    for entry in OmegaConf.load(path).get("defaults", []):
        if isinstance(entry, str) and entry.startswith("/schema_"):
            return entry[1:].split("@")[0]
        if isinstance(entry, str) and entry != "_self_":
            return _schema_of(path.parent / f"{entry}.yaml")
    raise AssertionError(f"{path} names no schema in its defaults list")


# --- the schema is the signatures, read without importing ---------------------------------
def _python_default(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("target", TARGETS)
def test_the_schema_reads_the_signature_as_python_does(target: str) -> None:
    cls = _import(target)
    hints = typing.get_type_hints(cls.__init__)
    parameters = dict(list(inspect.signature(cls.__init__).parameters.items())[1:])
    if target.endswith("AnomalyDataModule"):
        layouts = config.layout_only_keys()
        schemas = [config.schemas()[f"schema_data_{layout}"] for layout in layouts]
    else:
        key = next(k for k, v in config.MODEL_SCHEMAS.items() if v == target)
        schemas = [config.schemas()[f"schema_model_{key}"]]
    seen = set()
    for schema in schemas:
        node = OmegaConf.structured(schema)
        assert node._target_ in (target, config.DATA_TARGET)
        container = OmegaConf.to_container(node, enum_to_str=True)
        for f in dataclasses.fields(schema):
            if f.name in ("_target_", "download"):
                continue
            seen.add(f.name)
            default = parameters[f.name].default
            if f.name in config.NESTED_ARGUMENTS:  # another class's keyword arguments
                nested = _import(config.NESTED_ARGUMENTS[f.name][0]).__init__
                _same_fields(f.type, typing.get_type_hints(nested), _defaults(nested))
                continue
            settings = next(
                (t for t in typing.get_args(hints[f.name]) if dataclasses.is_dataclass(t)), None
            )
            if settings is not None:  # None in the signature: the settings' defaults
                assert default is None
                python = {k: _python_default(v) for k, v in dataclasses.asdict(settings()).items()}
                _same_fields(f.type, typing.get_type_hints(settings), python)
                continue
            if default is inspect.Parameter.empty:
                assert OmegaConf.is_missing(node, f.name)
            else:
                assert container[f.name] == _python_default(default), f.name
            _same_type(f.name, hints[f.name], f.type)
    assert seen == set(parameters), set(parameters) - seen


def _defaults(function: Any) -> dict[str, Any]:
    parameters = list(inspect.signature(function).parameters.values())[1:]
    return {p.name: _python_default(p.default) for p in parameters}


def _same_fields(ours: type, hints: dict[str, Any], python: dict[str, Any]) -> None:
    """A nested schema has the fields, defaults and types of its Python counterpart."""
    assert OmegaConf.to_container(OmegaConf.structured(ours), enum_to_str=True) == python
    for f in dataclasses.fields(ours):
        _same_type(f.name, hints[f.name], f.type)


def _same_type(name: str, python: Any, ours: Any) -> None:
    """The same choices, or the same scalar type (``X | None`` as ``Optional[X]``)."""
    python_choices, our_choices = _choices(python), _choices(ours)
    assert (python_choices is None) == (our_choices is None), name
    if python_choices is not None:
        assert [m.value for m in our_choices] == [m.value for m in python_choices], name
        return
    plain = [t for t in typing.get_args(python) or (python,) if t is not type(None)]
    if len(plain) == 1 and plain[0] in (str, int, float, bool):
        ours_plain = [t for t in typing.get_args(ours) or (ours,) if t is not type(None)]
        assert ours_plain == plain, name


def test_composing_imports_neither_torch_nor_the_variants() -> None:
    """The schema is read from the source: --cfg and a TAB do not wait for torch."""
    code = (
        "import sys\n"
        "from hydra import compose, initialize_config_dir\n"
        "from kdad.config import CONFIG_DIR\n"
        "with initialize_config_dir(config_dir=CONFIG_DIR, version_base='1.3'):\n"
        "    cfg = compose('train', overrides=['model=nferd', 'data=photos'])\n"
        "assert cfg.model.nfb.recall == 'flattened'\n"
        "print(sorted(m for m in ('torch', 'timm', 'lightning', 'kdad.models.nferd') "
        "if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout
    plain = "import sys, kdad.config; print('hydra' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", plain], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # the variants import kdad.config, not Hydra


def test_a_composed_config_pickles_for_a_launcher(tmp_path: Path) -> None:
    """A launcher (submitit) sends the composed config to its jobs: its schema classes
    pickle by reference and are rebuilt in a fresh process."""
    cfg = _compose("train", ["model=nferd"])
    path = tmp_path / "cfg.pkl"
    path.write_bytes(pickle.dumps(cfg))
    code = (
        "import pickle, sys\n"
        "cfg = pickle.loads(open(sys.argv[1], 'rb').read())\n"
        "cfg.model.nfb.recall = 'per_position'\n"
        "print(cfg.model.nfb.recall, type(cfg.model.nfb.recall).__name__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["per_position", "Recall"]


def test_flatten_gives_choices_as_plain_strings() -> None:
    cfg = _compose("train", ["model=hkt"])
    flat = flatten(cfg.model, "model")  # a config node
    assert flat["model.alignment"] == "cross" and type(flat["model.alignment"]) is str
    flat = flatten({"data": {"mask_resize": cfg.data.mask_resize}})  # a container holding one
    assert flat == {"data.mask_resize": "nearest"} and type(flat["data.mask_resize"]) is str


# --- values that bypass the schema: one line ----------------------------------------------
def _bad_choices() -> list:
    """For every choice of every variant and of the data module: the target, the keyword
    arguments a Python caller might pass with a wrong string, the key the message names and
    the valid values."""
    cases = []

    def case(target: str, kwargs: dict, key: str, choices: type[Enum]) -> None:
        valid = [m.value for m in choices]
        name = f"{target.rpartition('.')[2]}-{key}"
        cases.append(pytest.param(target, kwargs, key, valid, id=name))

    for target in TARGETS:
        hints = typing.get_type_hints(_import(target).__init__)
        group = "data" if target.endswith("AnomalyDataModule") else "model"
        base = {"layout": "synthetic", "root": "/nonexistent"} if group == "data" else {}
        for name, kind in hints.items():
            nested = next((t for t in typing.get_args(kind) if dataclasses.is_dataclass(t)), None)
            for key, choice in typing.get_type_hints(nested).items() if nested else ():
                if _choices(choice) is not None:
                    kwargs = {**base, name: {key: "nosuch"}}
                    case(target, kwargs, f"{group}.{name}.{key}", _choices(choice))
            if nested is None and _choices(kind) is not None:
                case(target, {**base, name: "nosuch"}, f"{group}.{name}", _choices(kind))
    from kdad.models.anomaly_map import MapFusion

    kwargs = {"anomaly_map": {"fusion": "nosuch"}}
    case(config.MODEL_SCHEMAS["rd4ad"], kwargs, "model.anomaly_map.fusion", MapFusion)
    return cases


@pytest.mark.parametrize(("target", "kwargs", "key", "valid"), _bad_choices())
def test_a_wrong_choice_given_in_python_is_one_line_naming_the_key(
    target: str, kwargs: dict, key: str, valid: list[str]
) -> None:
    with pytest.raises(KDADError) as caught:
        _import(target)(**kwargs)
    assert str(caught.value) == f"{key}='nosuch': expected one of {', '.join(valid)}"


# --- checkpoints ----------------------------------------------------------------------------
VARIANTS = sorted(k.split("=")[1] for k in CASES if k.startswith("model="))
SMALL = ["model.backbone=resnet18", "model.pretrained=false"]


def _plain(value: Any) -> None:
    assert not isinstance(value, Enum), value
    if isinstance(value, dict):
        for v in value.values():
            _plain(v)
    elif isinstance(value, list):
        for v in value:
            _plain(v)


@pytest.mark.parametrize("variant", VARIANTS)
def test_checkpoint_hyper_parameters_are_plain_and_rebuild_the_model(variant: str) -> None:
    from kdad.engine.run import build_module
    from kdad.io.checkpoint import plain
    from kdad.lightning.module import DistillationModule

    cfg = _compose("train", [f"model={variant}", *SMALL])
    with torch.device("meta"):
        module = build_module(cfg)
    buffer = io.BytesIO()
    torch.save({"hyper_parameters": plain(dict(module.hparams))}, buffer)
    buffer.seek(0)
    stored = torch.load(buffer, weights_only=True)["hyper_parameters"]
    _plain(stored)
    assert stored["model"] == OmegaConf.to_container(cfg.model, resolve=True, enum_to_str=True)
    assert type(stored["preprocess"]["mask_resize"]) is str
    with torch.device("meta"):
        rebuilt = DistillationModule(
            model=stored["model"], optimizer=stored["optimizer"] or {}, model_name=variant
        )
    assert type(rebuilt.net) is type(module.net)
    assert sorted(rebuilt.state_dict()) == sorted(module.state_dict())


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_checkpoint_written_before_the_schema_still_builds(variant: str) -> None:
    """An older checkpoint holds the model config as plain strings, without the keys the
    schema added (model.anomaly_map.fuse_at): it builds the same network as today's."""
    from kdad.lightning.module import build_net

    old = {**SNAPSHOT[f"model={variant}"]["model"], "backbone": "resnet18", "pretrained": False}
    assert "fuse_at" not in old["anomaly_map"] or variant == "stfpm"
    new = OmegaConf.to_container(
        _compose("train", [f"model={variant}", *SMALL]).model, resolve=True, enum_to_str=True
    )
    with torch.device("meta"):
        then, now = build_net(old), build_net(new)
    assert sorted(then.state_dict()) == sorted(now.state_dict())
    assert then.map_generator.fuse_at == now.map_generator.fuse_at
    assert type(then.distance) is str and then.distance == now.distance
