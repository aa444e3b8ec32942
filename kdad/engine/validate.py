"""Config checks that run before any work starts, so a typing mistake costs seconds, not a run.

Every key a user types reaches one of: :func:`resolve` (missing required values, broken
interpolations), the typed checks below (numbers where numbers are expected, in range), the
constructors (models and data modules raise :class:`~kdad.errors.KDADError` for their own
keys; anything else they raise while being built from the config is turned into one line
naming the group), the trainer's constructor (wrapped the same way), or :func:`check_input_size`
(a dry forward pass: the smallest image the chosen network accepts; kdad-eval runs it too).
Each problem is one line. Mistakes Hydra finds while composing (an unknown key or option, a
malformed override, a YAML syntax error) are made one line by :mod:`kdad.engine.hydra`.
"""

from __future__ import annotations

import copy
import logging
import math
import re
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    InterpolationResolutionError,
    MissingMandatoryValue,
    OmegaConfBaseException,
)
from torch.utils.data import DataLoader

from kdad.errors import KDADError, one_line

T = TypeVar("T")

# key -> (kind, lowest allowed value, why); None keys are skipped (optional settings).
_NUMBERS: dict[str, tuple[type, float, str]] = {
    "seed": (int, -math.inf, "an integer"),
    "trainer.max_epochs": (
        int,
        1,
        "an integer >= 1 (0 trains nothing: test a checkpoint with kdad-eval instead)",
    ),
    "trainer.check_val_every_n_epoch": (int, 1, "an integer >= 1"),
    "trainer.log_every_n_steps": (int, 1, "an integer >= 1"),
    "trainer.accumulate_grad_batches": (int, 1, "an integer >= 1"),
    "data.image_size": (int, 1, "an integer number of pixels"),
    "data.crop_size": (int, 1, "an integer number of pixels"),
    "data.batch_size": (int, 1, "an integer >= 1"),
    "data.eval_batch_size": (int, 1, "an integer >= 1"),
    "data.num_workers": (int, 0, "an integer >= 0"),
    "data.val_fraction": (float, 0, "a fraction in [0, 1)"),
    "data.cache_max_gb": (float, 0, "a number of GB >= 0"),
    "teacher_cache_max_gb": (float, 0, "a number of GB >= 0"),
    "callbacks.model_checkpoint.every_n_epochs": (int, 0, "an integer >= 0"),
    "callbacks.heatmaps.num_images": (int, 0, "an integer >= 0"),
    # The smallest positive float as an inclusive bound: the learning rate must be > 0.
    "optimizer.lr": (float, math.nextafter(0.0, 1.0), "a number > 0 (the learning rate)"),
    "optimizer.weight_decay": (float, 0, "a number >= 0"),
    "optimizer.momentum": (float, 0, "a number >= 0"),
}


def resolve(cfg: DictConfig) -> None:
    """Every value resolvable and present: ``???`` left unset and broken ``${...}`` are errors."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as exc:
        key = exc.full_key or "a key"
        raise KDADError(f"{key} is required but not set: pass {key}=...") from None
    except (InterpolationResolutionError, OmegaConfBaseException) as exc:
        key = getattr(exc, "full_key", None)
        reason = str(exc).split("full_key:")[0]  # OmegaConf's trailer repeats the key
        raise KDADError(f"config{f' key {key}' if key else ''}: {reason}") from None


def check_numbers(cfg: DictConfig) -> None:
    for key, (kind, low, what) in _NUMBERS.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        ok = not isinstance(value, bool) and isinstance(value, int | float)
        if ok and kind is int:
            ok = isinstance(value, int) or float(value).is_integer()
        if ok:
            ok = math.isfinite(float(value)) and float(value) >= low
            if key == "data.val_fraction":
                ok = ok and float(value) < 1
        if not ok:
            raise KDADError(f"{key}={value!r}: expected {what}")


# What each config group may instantiate (``_target_`` prefixes): a value typed on the command
# line or in a user's --config-dir cannot make kdad call an arbitrary function. More modules
# are opted in explicitly with ``allow_targets=[my_package.]``.
TARGETS = {
    "model": ("kdad.models.",),
    "data": ("kdad.data.",),
    "trainer": ("lightning.pytorch.", "lightning.fabric.", "torch.distributed."),
    "callbacks": ("kdad.lightning.callbacks.", "lightning.pytorch.callbacks."),
    "logger": ("lightning.pytorch.loggers.", "kdad.engine.wandb."),
    "optimizer": ("torch.optim.",),
    "scheduler": ("torch.optim.lr_scheduler.",),
}


def _targets(node: Any, path: str) -> list[tuple[str, str]]:
    """(dotted key, value) of every ``_target_`` under ``node``."""
    found: list[tuple[str, str]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            if key == "_target_":
                found.append((where, str(value)))
            else:
                found += _targets(value, where)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _targets(value, f"{path}.{index}")
    return found


def check_targets(cfg: DictConfig) -> None:
    """Every ``_target_`` is one its group may instantiate (:data:`TARGETS`), or opted in by
    ``allow_targets``; checked before anything is instantiated."""
    extra = cfg.get("allow_targets") or []
    if isinstance(extra, str) or not all(isinstance(p, str) and p for p in extra):
        raise KDADError(f"allow_targets={extra!r}: expected a list of module prefixes")
    container = OmegaConf.to_container(cfg, resolve=True)
    for where, target in _targets(container, ""):
        group = where.split(".", 1)[0]
        allowed = (*TARGETS.get(group, ()), *extra)
        if not target.startswith(tuple(p if p.endswith(".") else p + "." for p in allowed)):
            shown = ", ".join(TARGETS.get(group, ())) or "none"
            raise KDADError(
                f"{where}={target}: {group} may instantiate only {shown}; to use another "
                f"module, opt in with allow_targets=[{target.rsplit('.', 1)[0]}]"
            )


def check_layers(cfg: DictConfig) -> None:
    """``model.layers`` given as stage indices are feature stages of ``model.backbone`` (timm's
    ``features_only`` stages, read from the network built on the meta device: no weights).
    Stages given by module name are checked where the teacher is built."""
    layers = OmegaConf.select(cfg, "model.layers", default=None)
    backbone = OmegaConf.select(cfg, "model.backbone", default=None)
    if not isinstance(layers, ListConfig) or not isinstance(backbone, str):
        return
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in layers):
        return
    import timm

    try:
        with torch.device("meta"):
            stages = timm.create_model(backbone, features_only=True).feature_info.module_name()
    except Exception:  # an unknown backbone: its constructor says so, with the reason
        return
    bad = [v for v in layers if not -len(stages) <= v < len(stages)]
    if bad:
        valid = ", ".join(f"{i}={name}" for i, name in enumerate(stages))
        raise KDADError(
            f"model.layers={list(layers)}: {', '.join(map(str, bad))} not a feature stage of "
            f"model.backbone={backbone}; valid: 0..{len(stages) - 1} ({valid})"
        )


def check_train(cfg: DictConfig) -> None:
    """What kdad-train checks before loading any data."""
    resolve(cfg)
    check_numbers(cfg)
    check_targets(cfg)
    check_layers(cfg)
    for key, valid in (("test_ckpt", ("last", "best")), ("resume", ("auto", "never"))):
        if cfg.get(key) not in valid:
            raise KDADError(f"{key}={cfg.get(key)!r}: expected {' or '.join(valid)}")


def built(what: str, build: Callable[[], T]) -> T:
    """``build()``; what it raises because of a config value becomes one line naming ``what``
    (and the key, for a setting the constructor does not take)."""
    try:
        return build()
    except KDADError:
        raise
    except InstantiationException as exc:
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, KDADError):
            raise KDADError(f"{what}: {one_line(cause)}") from None
        raise _not_built(what, cause or exc) from None
    except (TypeError, ValueError, IndexError, KeyError, AssertionError) as exc:
        raise _not_built(what, exc) from None


def _not_built(what: str, exc: BaseException) -> KDADError:
    detail = f"{type(exc).__name__}: {one_line(exc)}"[:300]
    unknown = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
    if isinstance(exc, TypeError) and unknown:  # a +group.key=... the constructor does not take
        key = f"{what.split('=', 1)[0]}.{unknown.group(1)}"
        return KDADError(
            f"{what}: cannot be built from the config: {key} is not one of its settings ({detail})"
        )
    return KDADError(f"{what}: cannot be built from the config ({detail})")


def _forward_ok(probe: Any, size: int, train: bool = True) -> str | None:
    """The passes a run makes, on zeros: the training loss (train mode, a batch of 2:
    BatchNorm needs more than one value per channel), after the model's ``before_fit`` (NFERD
    fills its bank) from zero images, unless ``train`` is false; the test prediction (eval
    mode). Returns why they fail, or None."""
    images = torch.zeros(2, 3, size, size)
    previous = logging.getLogger("kdad").level
    logging.getLogger("kdad").setLevel(logging.ERROR)  # "the bank holds all of them", etc.
    try:
        if train:
            # top_k + 1 distinct images: with exclude_self the zeros recall from the others
            top_k = max(int(getattr(probe, "nfb_top_k", 1) or 1), 1)
            bank = [torch.full_like(images[0], i / (top_k + 1)) for i in range(top_k + 1)]
            probe.before_fit(DataLoader(bank, batch_size=top_k + 1))
            probe.train()
            probe.loss(probe(images))
        probe.eval()
        probe.predict(images[:1])
    except (KDADError, RuntimeError, ValueError, IndexError, ZeroDivisionError) as exc:
        return f"{type(exc).__name__}: {one_line(exc)[:160]}"
    finally:
        logging.getLogger("kdad").setLevel(previous)
    return None


@torch.no_grad()
def check_input_size(net: Any, size: int, what: str, train: bool = True) -> None:
    """Dry passes at the network's input size (``data.crop_size`` or ``data.image_size``), on a
    copy (the run's weights, buffers and BatchNorm statistics are untouched); if they fail,
    name the smallest size that works (16-px steps). ``train=False`` (kdad-eval): the test
    prediction only."""
    probe = copy.deepcopy(net)
    reason = _forward_ok(probe, size, train)
    if reason is None:
        return
    smallest = next((s for s in range(16, 1025, 16) if _forward_ok(probe, s, train) is None), None)
    if smallest is None:
        raise KDADError(f"{what} cannot run at data.image_size/crop_size={size} ({reason})")
    raise KDADError(
        f"data.image_size/crop_size={size} does not fit {what}: the smallest that works is "
        f"{smallest} px (tried in 16-px steps; the papers use 256)"
    )


__all__ = [
    "built",
    "check_input_size",
    "check_layers",
    "check_numbers",
    "check_train",
    "resolve",
]
