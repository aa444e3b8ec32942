"""kdad's config tree: where its YAML lives, defaults read from it, and config flattening.

The YAML under the top-level ``conf/`` is the one home of every default. It ships inside the
package as ``kdad.conf`` (``pyproject.toml`` maps ``conf/`` onto it), so an installed wheel
composes exactly as a checkout does; Python code that needs a default (a model built without
Hydra, a threshold setting left out) reads it from that YAML through :func:`defaults`.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from kdad.errors import KDADError


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

# An absolute folder, given to ``hydra.main(config_path=...)``; users add their own config
# folders in front of it with ``--config-dir`` or ``hydra.searchpath`` (README, configs).
CONFIG_DIR = str(_config_dir())


@functools.cache
def _load(relative: str) -> dict[str, Any]:
    path = Path(CONFIG_DIR) / relative
    if not path.is_file():
        raise KDADError(f"kdad's config {path} is missing (a broken installation?)")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)  # type: ignore[return-value]


def defaults(relative: str, key: str) -> dict[str, Any]:
    """The mapping at ``key`` (dotted) of the shipped YAML ``relative``, e.g.
    ``defaults("model/nferd.yaml", "model.nfb")``; a fresh copy each call."""
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
    kdad-aggregate's keys). Lists of scalars stay one value; other lists are indexed."""
    container = (
        OmegaConf.to_container(cfg, resolve=True)
        if isinstance(cfg, DictConfig | ListConfig)
        else cfg
    )
    flat: dict[str, Any] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, list | tuple) and not all(
            isinstance(v, str | int | float | bool) for v in value
        ):
            for i, v in enumerate(value):
                walk(v, f"{key}.{i}")
        else:
            flat[key] = list(value) if isinstance(value, tuple) else value

    walk(container, prefix)
    return flat
