"""kdad's config tree: where its YAML lives, the typed schema of its model and data groups,
defaults read from YAML, and config flattening.

The YAML under the top-level ``conf/`` ships inside the package as ``kdad.conf``
(``pyproject.toml`` maps ``conf/`` onto it), so an installed wheel composes exactly as a checkout
does.

**Typed configs.** The ``model`` and ``data`` groups are Hydra structured configs: a dataclass
per variant (and per dataset layout) in Hydra's ConfigStore, with an Enum for every closed set
of choices. Each ``conf/model/*.yaml`` and ``conf/data/*.yaml`` names its schema first in its
defaults list (``- /schema_model_hkt@model``), so Hydra refuses a typo or a wrong type while it
composes, before any work, and names the key with the expected type or the choices
(``model.cbam=flase``, ``data.batch_size=1.5``, ``model.alignment=crosss``). The YAML files keep
only what differs from the schema's defaults: a variant's reference settings (and the
optimiser, data, trainer and seed settings of its paper).

Why the schema is *built from the constructors' signatures* (hydra-zen's ``builds``) rather
than written as dataclasses (Hydra's structured-config tutorial): hand-written dataclasses
would be a second copy of every default the constructors already have, and the two would
drift. Built from a signature, a variant's defaults live once, in the code that uses them: the
constructor's signature, or one settings dataclass for a nested group (NFERD's ``nfb`` and
``hafm``; every variant's ``anomaly_map`` is the map generator's signature); an Enum of choices
lives next to the code that uses it. STYLE.md asks for one way everywhere: this is it, for the
model and data groups. kdad's builder is the few functions below rather than a dependency on
hydra-zen, because hydra-zen's ``builds`` imports the class: the variants' modules import torch
and timm (seconds), and ``--help``, ``--cfg`` and a TAB of shell completion compose configs
without them (README: "a TAB takes well under a second"; experiments/benchmark/completion.py).
So the builder reads the signatures, Enums and settings dataclasses from the *source files*
with :mod:`ast`, without importing them; tests/test_config.py checks that reading against
``inspect.signature`` of the imported classes. What it accepts is deliberately small:
annotations of ``str``, ``int``, ``float``, ``bool``, ``X | None``, ``Sequence[...]``,
``Mapping[...]``, an Enum of strings or a settings dataclass (written ``X | str`` and
``X | Mapping | None``: the plain forms a Python caller may pass), and literal defaults;
anything else is a :class:`SchemaError` naming the parameter (a bug of kdad, caught by the tests).

OmegaConf validates an Enum key by member *name*: every Enum of choices names its members as
their values (``class Alignment(str, Enum): cross = "cross"``), and the variants take plain
strings (:func:`choice` checks one that did not come through the schema, e.g. a model built
in Python, and returns the plain string). A composed config holds Enum members: code that
stores or logs a config converts them to strings (``enum_to_str=True``, :func:`flatten`), so
a checkpoint's hyper-parameters stay plain data (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import importlib.util
import os
import typing
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from kdad.errors import KDADError

T = TypeVar("T")


def _config_dir() -> Path:
    # An installed package (wheel or editable) has kdad.conf, a namespace package (YAML only):
    # its folder is its one search location (importlib.resources would give a MultiplexedPath).
    spec = importlib.util.find_spec("kdad.conf")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    # A checkout on sys.path without installing: conf/ beside kdad/.
    return Path(__file__).resolve().parent.parent / "conf"


def launch_dir() -> str:
    """The folder the command was started in, for ``paths.root_dir`` (resolver ``kdad_cwd``).

    Hydra's own ``${hydra:runtime.cwd}`` is not set yet when a multirun composes
    ``hydra.sweep.dir``, so a multirun without ``hydra.sweep.dir`` crashed on it; inside a job
    Hydra's recorded value is used (a launcher may start jobs elsewhere), before that the
    process's working directory, which Hydra does not change (``hydra.job.chdir=false``).
    """
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        cwd = OmegaConf.select(HydraConfig.get(), "runtime.cwd", default=None)
        if cwd:
            return str(cwd)
    return os.getcwd()


if not OmegaConf.has_resolver("kdad_cwd"):
    # Registered on import: every composition of kdad's configs goes through CONFIG_DIR.
    OmegaConf.register_new_resolver("kdad_cwd", launch_dir)

# An absolute folder, given to ``hydra.main(config_path=...)`` as ``CONFIG_DIR``; users add
# their own config folders in front of it with ``--config-dir`` or ``hydra.searchpath`` (README,
# configs). ``CONFIG_DIR`` is looked up through :func:`__getattr__`, which first puts the
# schemas into Hydra's ConfigStore: whatever composes kdad's configs asks for it, and a plain
# ``import kdad.config`` (the variants' modules do) stays free of Hydra.
_CONFIG_DIR = str(_config_dir())


# --- choices and settings, as the variants take them -----------------------------------------
class ChoiceError(KDADError, ValueError):
    """A value that is none of a setting's choices: a user error (one line), and a
    ``ValueError`` for code that catches those."""


def choice(options: type[Enum], value: Any, key: str) -> str:
    """``value`` (a member of the Enum of strings ``options``, or its value) as a plain string;
    anything else is a one-line :class:`ChoiceError` naming ``key`` and the choices.

    The schema refuses a wrong value while Hydra composes; this is for values that do not come
    through it (a model built in Python, an older checkpoint's hyper-parameters).
    """
    text = value.value if isinstance(value, Enum) else value
    valid = [str(member.value) for member in options]
    if isinstance(text, str) and text in valid:
        return text
    raise ChoiceError(f"{key}={text!r}: expected one of {', '.join(valid)}")


def settings(cls: type[T], given: Any, key: str) -> T:
    """The settings dataclass ``cls`` from ``given``: an instance, a mapping of some of its
    fields (over its defaults) or None (all defaults). A key ``cls`` does not have is a
    one-line error naming it and the valid ones."""
    if isinstance(given, cls):
        return given
    values = dict(given or {})
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise KDADError(f"{key}: unknown key(s) {unknown}; valid: {sorted(names)}")
    return cls(**values)


# Names a variant had before (conf/model/<old name>.yaml is an alias of the current config):
# what older checkpoints and results record is read under the current name.
MODEL_ALIASES = {"rd": "rd4ad"}
RENAMED_TARGETS = {
    "kdad.models.rd4ad.ReverseDistillation": "kdad.models.rd4ad.RD4AD",
    "kdad.models.knn.NearestNeighbourReference": "kdad.models.knn.KNN",
}


def current_model_name(name: str) -> str:
    """``name`` (a ``model_name`` as a checkpoint or results file records it) as kdad names
    that variant now."""
    return MODEL_ALIASES.get(name, name)


def current_target(target: str) -> str:
    """``target`` (a model ``_target_`` as a checkpoint or results file records it) as the
    variant's class is named now."""
    return RENAMED_TARGETS.get(target, target)


# --- the schema: structured configs built from the constructors' source ----------------------
# The variants: conf/model/<file>.yaml names ``/schema_model_<name>@model`` in its defaults list.
MODEL_SCHEMAS = {
    "stfpm": "kdad.models.stfpm.STFPM",
    "rd4ad": "kdad.models.rd4ad.RD4AD",
    "hkt": "kdad.models.hkt.HKT",
    "nferd": "kdad.models.nferd.NFERD",
    "knn": "kdad.models.knn.KNN",
}
# Every variant's ``anomaly_map`` is the keyword arguments of the shared map generator.
NESTED_ARGUMENTS = {
    "anomaly_map": ("kdad.models.anomaly_map.AnomalyMapGenerator", "AnomalyMapSettings")
}

# The data module (``_target_`` as the YAML names it; defined in kdad.data.datamodule), one
# schema per layout (conf/data/<layout>.yaml: ``/schema_data_<layout>@_here_``): each holds the
# keys its layout uses, so ``data=mvtec`` shows no folder-layout keys. The layouts are the data
# module's ``Layout``; the folder layout's own keys its ``_FOLDER_ONLY``; a generated layout's
# parameters the key named as the layout (``synthetic``, ``photos``).
DATA_TARGET = "kdad.data.AnomalyDataModule"
_DATA_MODULE = "kdad.data.datamodule"
_GENERATED_LAYOUTS = ("synthetic", "photos")
# ``download`` is not the data module's: kdad.data.datamodule.instantiate_data fetches the
# archive first. Its value (false) is in the two layouts' YAML.
_DOWNLOAD_LAYOUTS = ("mvtec", "btad")

_KDAD = Path(__file__).resolve().parent
# Annotation names the builder knows; anything else must be an Enum or a dataclass of kdad.
_SCALARS: dict[str, Any] = {"str": str, "int": int, "float": float, "bool": bool, "Any": Any}
_SEQUENCES = ("Sequence", "list", "List", "tuple", "Tuple")
_MAPPINGS = ("Mapping", "dict", "Dict")
_REQUIRED = object()  # a parameter without a default


class SchemaError(Exception):
    """kdad's source does not give a schema (a bug of kdad, not a user error)."""


class _Choice(str, Enum):
    """The schema's copy of an Enum of choices: prints as its value (``--cfg``, a TAB)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


@functools.cache
def _source(module: str) -> ast.Module:
    """The parsed source of kdad's ``module`` (its file, not imported)."""
    parts = module.split(".")
    if parts[0] != "kdad":
        raise SchemaError(f"{module}: the schema reads kdad's own modules only")
    path = _KDAD.joinpath(*parts[1:]).with_suffix(".py")
    if not path.is_file():
        path = _KDAD.joinpath(*parts[1:], "__init__.py")
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _class_node(module: str, name: str) -> tuple[str, ast.ClassDef]:
    """The class ``name`` as ``module`` sees it: defined there, or imported from kdad."""
    tree = _source(module)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return module, node
    for node in tree.body:
        if (
            isinstance(node, ast.ImportFrom)
            and (node.module or "").startswith("kdad.")
            and any(alias.name == name and alias.asname is None for alias in node.names)
        ):
            return _class_node(node.module, name)  # type: ignore[arg-type]
    raise SchemaError(f"{module}: no class {name} (defined there or imported from kdad)")


_TYPES: dict[str, type] = {}  # every class the schema made, by name (pickled by reference)


def _keep(cls: type, where: str) -> type:
    cls.__module__ = __name__
    cls.__qualname__ = cls.__name__
    if cls.__name__ in _TYPES:
        raise SchemaError(f"{where}: a second schema class named {cls.__name__}")
    _TYPES[cls.__name__] = cls
    return cls


def _named_type(module: str, name: str) -> type:
    """The schema's Enum or settings dataclass for the class ``name`` as ``module`` sees it."""
    return _made_type(_class_node(module, name)[0], name)


@functools.cache
def _made_type(where: str, name: str) -> type:
    """The schema's Enum or settings dataclass for the class ``name`` defined in ``where``."""
    node = _class_node(where, name)[1]
    bases = {ast.unparse(base) for base in node.bases}
    if "Enum" in bases or "enum.Enum" in bases:
        members = []
        for stmt in node.body:
            if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant):
                member = stmt.targets[0].id if isinstance(stmt.targets[0], ast.Name) else None
                if member != stmt.value.value:
                    raise SchemaError(
                        f"{where}.{name}: name each member as its value (OmegaConf validates "
                        f"by name): {ast.unparse(stmt)}"
                    )
                members.append((member, member))
        enum = _Choice(name, members, module=__name__, qualname=name)  # type: ignore[call-overload]
        return _keep(enum, where)
    if any(
        ast.unparse(d).split("(")[0] in ("dataclass", "dataclasses.dataclass")
        for d in node.decorator_list
    ):
        fields = [
            (stmt.target.id, stmt.annotation, _REQUIRED if stmt.value is None else stmt.value)
            for stmt in node.body
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
        ]
        return _dataclass(name, where, fields)
    raise SchemaError(f"{where}.{name}: a config type must be an Enum of strings or a dataclass")


def _alternatives(node: ast.expr) -> list[ast.expr]:
    """The members of ``A | B | None`` (or ``Optional[A]``)."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _alternatives(node.left) + _alternatives(node.right)
    if isinstance(node, ast.Subscript) and ast.unparse(node.value) == "Optional":
        return [node.slice, ast.Constant(None)]
    return [node]


def _config_type(module: str, node: ast.expr) -> Any:
    """The OmegaConf type of an annotation of ``module``: an Enum or a settings dataclass wins
    over the plain forms beside it (``Alignment | str``, ``Settings | Mapping | None``)."""
    alternatives = _alternatives(node)
    optional = any(isinstance(a, ast.Constant) and a.value is None for a in alternatives)
    kinds = [
        _one_type(module, a)
        for a in alternatives
        if not (isinstance(a, ast.Constant) and a.value is None)
    ]
    for kind in kinds:
        if dataclasses.is_dataclass(kind):
            return kind  # None means "the defaults": the node always holds every setting
    enums = [k for k in kinds if isinstance(k, type) and issubclass(k, Enum)]
    kinds = enums[:1] or list(dict.fromkeys(kinds))
    kind = kinds[0] if len(kinds) == 1 else Any  # OmegaConf has no unions: checked by the code
    return typing.Optional[kind] if optional and kind is not Any else kind  # noqa: UP045


def _one_type(module: str, node: ast.expr) -> Any:
    if isinstance(node, ast.Name):
        if node.id in _SCALARS:
            return _SCALARS[node.id]
        if node.id in _SEQUENCES:
            return list[Any]
        if node.id in _MAPPINGS:
            return dict[str, Any]
        return _named_type(module, node.id)
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
        args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if node.value.id in _SEQUENCES:
            return list[_config_type(module, args[0])]  # type: ignore[misc]
        if node.value.id in _MAPPINGS and len(args) == 2:
            return dict[str, _config_type(module, args[1])]  # type: ignore[misc]
    raise SchemaError(f"{module}: the annotation {ast.unparse(node)} has no config type")


def _enum_of(kind: Any) -> type[Enum] | None:
    for candidate in (kind, *typing.get_args(kind)):
        if isinstance(candidate, type) and issubclass(candidate, Enum):
            return candidate
    return None


def _field(module: str, name: str, annotation: ast.expr | None, default: Any) -> tuple:
    """(name, type, default) of one parameter or dataclass field, for ``make_dataclass``."""
    if annotation is None:
        raise SchemaError(f"{module}: {name} has no type annotation")
    kind = _config_type(module, annotation)
    if dataclasses.is_dataclass(kind):
        if not (
            default is _REQUIRED or (isinstance(default, ast.Constant) and default.value is None)
        ):
            raise SchemaError(f"{module}: {name} defaults to its settings dataclass (None)")
        return name, kind, dataclasses.field(default_factory=kind)
    if default is _REQUIRED:
        return name, kind, MISSING
    enum = _enum_of(kind)
    if isinstance(default, ast.Attribute) and isinstance(default.value, ast.Name):
        value: Any = _named_type(module, default.value.id)[default.attr]  # Alignment.cross
    else:
        try:
            value = ast.literal_eval(default)
        except ValueError:
            raise SchemaError(
                f"{module}: the default of {name} ({ast.unparse(default)}) is not a literal"
            ) from None
        if enum is not None and value is not None:
            value = enum(value)
    if isinstance(value, tuple | list | dict):
        frozen = list(value) if isinstance(value, tuple) else value
        return name, kind, dataclasses.field(default_factory=lambda: copy.deepcopy(frozen))
    return name, kind, value


def _dataclass(name: str, module: str, fields: list[tuple[str, ast.expr | None, Any]]) -> type:
    made = [_field(module, *f) for f in fields]
    return _keep(dataclasses.make_dataclass(name, made), module)


def _parameters(source: str) -> tuple[str, list[tuple[str, ast.expr | None, Any]]]:
    """(module, [(name, annotation, default), ...]) of the constructor of the class ``source``
    (``package.module.Class``), read from its file."""
    module, _, cls = source.rpartition(".")
    where, node = _class_node(module, cls)
    init = next(
        (f for f in node.body if isinstance(f, ast.FunctionDef) and f.name == "__init__"), None
    )
    if init is None:
        raise SchemaError(f"{where}.{cls}: the schema needs the class's own __init__")
    args = init.args
    if args.vararg or args.kwarg or args.posonlyargs:
        raise SchemaError(f"{where}.{cls}.__init__: *args, **kwargs and / have no config keys")
    positional = args.args[1:]  # self
    defaults = [_REQUIRED] * (len(positional) - len(args.defaults)) + list(args.defaults)
    pairs = [
        *zip(positional, defaults, strict=True),
        *zip(args.kwonlyargs, args.kw_defaults, strict=True),
    ]
    return where, [
        (arg.arg, arg.annotation, _REQUIRED if default is None else default)
        for arg, default in pairs
    ]


def builds(
    target: str,
    name: str,
    *,
    source: str | None = None,
    exclude: tuple[str, ...] = (),
    extra: tuple[tuple[str, Any, Any], ...] = (),
) -> type:
    """A structured config (dataclass) for the class ``target`` (``_target_`` as the YAML
    names it; ``source``, where it is defined, if elsewhere): ``_target_`` and one field per
    constructor parameter (but ``exclude``), typed and defaulted from its signature, then
    ``extra`` fields. Parameters named in :data:`NESTED_ARGUMENTS` are nested configs of
    another class's keyword arguments."""
    where, parameters = _parameters(source or target)
    fields: list[tuple] = [("_target_", str, target)]
    for key, annotation, default in parameters:
        if key in exclude:
            continue
        if key in NESTED_ARGUMENTS:
            nested = _nested(*NESTED_ARGUMENTS[key])
            fields.append((key, nested, dataclasses.field(default_factory=nested)))
        else:
            fields.append(_field(where, key, annotation, default))
    return _keep(dataclasses.make_dataclass(name, [*fields, *extra]), where)


@functools.cache
def _nested(source: str, name: str) -> type:
    where, parameters = _parameters(source)
    return _dataclass(name, where, parameters)


def _module_constant(module: str, name: str) -> Any:
    """The literal value a module-level ``name = ...`` of ``module`` assigns (from its source)."""
    for node in _source(module).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise SchemaError(f"{module}: no module-level {name} = <literal>")


@functools.cache
def layout_only_keys() -> dict[str, tuple[str, ...]]:
    """Every data layout -> the data module's keys only it uses."""
    keys: dict[str, tuple[str, ...]] = {}
    for member in _named_type(_DATA_MODULE, "Layout"):  # type: ignore[attr-defined]
        layout = str(member.value)
        if layout == "folder":
            keys[layout] = tuple(_module_constant(_DATA_MODULE, "_FOLDER_ONLY"))
        else:
            keys[layout] = (layout,) if layout in _GENERATED_LAYOUTS else ()
    return keys


@functools.cache
def schemas() -> dict[str, type]:
    """ConfigStore name -> structured config: ``schema_model_<variant>`` and
    ``schema_data_<layout>``."""
    found = {
        f"schema_model_{key}": builds(target, f"{target.rpartition('.')[2]}Config")
        for key, target in MODEL_SCHEMAS.items()
    }
    layout_keys = layout_only_keys()
    others = {key for keys in layout_keys.values() for key in keys}
    for layout in layout_keys:
        found[f"schema_data_{layout}"] = builds(
            DATA_TARGET,
            f"{layout.capitalize()}DataConfig",
            source=f"{_DATA_MODULE}.AnomalyDataModule",
            exclude=tuple(sorted(others - set(layout_keys[layout]))),
            extra=(("download", bool, MISSING),) if layout in _DOWNLOAD_LAYOUTS else (),
        )
    return found


def register_schemas() -> None:
    """Put the schemas into Hydra's ConfigStore (again if it was emptied)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, schema in schemas().items():
        if f"{name}.yaml" not in store.repo:
            store.store(name=name, node=schema, provider="kdad")


def __getattr__(name: str) -> Any:
    # ``CONFIG_DIR`` with the schemas registered (see above), and the schema's classes by name,
    # so that a config holding them pickles by reference (a launcher sends it to its jobs).
    if name == "CONFIG_DIR":
        register_schemas()
        return _CONFIG_DIR
    if not name.startswith("_"):
        schemas()
        if name in _TYPES:
            return _TYPES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- defaults read from YAML, flattening ------------------------------------------------------
@functools.cache
def _load(relative: str) -> dict[str, Any]:
    path = Path(_CONFIG_DIR) / relative
    if not path.is_file():
        raise KDADError(f"kdad's config {path} is missing (a broken installation?)")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)  # type: ignore[return-value]


def defaults(relative: str, key: str) -> dict[str, Any]:
    """The mapping at ``key`` (dotted) of the shipped YAML ``relative``, e.g.
    ``defaults("train.yaml", "thresholds")``; a fresh copy each call."""
    node: Any = _load(relative)
    for part in key.split("."):
        node = node[part]
    return dict(node)


def merge_settings(name: str, given: Any, base: dict[str, Any]) -> dict[str, Any]:
    """``given`` over ``base``; keys ``base`` does not have are a one-line error naming them."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(base))
    if unknown:
        raise KDADError(f"{name}: unknown key(s) {unknown}; valid: {sorted(base)}")
    return {**base, **given}


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"model.backbone": ..., "data.category": ...} (loggers' columns,
    kdad-aggregate's keys). Lists of scalars stay one value; other lists are indexed; a
    choice is its plain string."""
    container = (
        OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        if isinstance(cfg, DictConfig | ListConfig)
        else cfg
    )
    flat: dict[str, Any] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, list | tuple) and not all(
            isinstance(v, str | int | float | bool) for v in value
        ):
            for i, v in enumerate(value):
                walk(v, f"{key}.{i}")
        elif isinstance(value, list | tuple):
            flat[key] = [v.value if isinstance(v, Enum) else v for v in value]
        else:
            flat[key] = value.value if isinstance(value, Enum) else value

    walk(container, prefix)
    return flat
