"""What every Hydra entry point shares: resolvers, user-error handling, sweep report, DDP wiring.

User errors (:class:`kdad.errors.KDADError`) never show a traceback: the job prints one line
``kdad: error: ...`` to stderr, leaves a ``FAILED`` file with that line in its run folder (so a
sweep's folder says which jobs failed and why), and the command exits with status 2 once all
jobs have run. One failing job of a multirun does not stop the others. Mistakes Hydra finds
before any job runs (an unknown option or key, a malformed override, a YAML syntax error) are
one line and exit status 2 as well (:func:`config_errors_in_one_line`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kdad.engine import wandb as kdad_wandb
from kdad.errors import Interrupted, KDADError, disk_full, one_line
from kdad.io import run_folder
from kdad.io.run_folder import RunFolder, SweepFolder

log = logging.getLogger("kdad")

FAILED: list[str] = []


def _gpu_slot(num_gpus: int = 1) -> int:
    """The GPU of this job when a sweep runs ``num_gpus`` jobs side by side (job number mod N)."""
    try:
        return int(HydraConfig.get().job.num) % max(int(num_gpus), 1)
    except Exception:  # no Hydra job (composing with --cfg, a single run): the first GPU
        return 0


def is_multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def prepare_ddp_relaunch() -> None:
    """Make Lightning's DDP re-launch of this script start *this job* in *this folder*.

    For ``strategy=ddp`` Lightning starts ranks 1..N-1 by re-running ``sys.argv`` with
    ``hydra.run.dir=<hydra.run.dir>`` appended. In a multirun that would re-run the whole sweep
    into a fresh folder; here each job narrows ``sys.argv`` to its own overrides and points
    ``hydra.run.dir`` at its own output folder, so one run stays one folder.
    """
    if not is_multirun():
        return
    from omegaconf import read_write

    hydra_cfg = HydraConfig.get()
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]
    with read_write(hydra_cfg.run):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir


RESOLVERS = {
    "kdad_gpu_slot": _gpu_slot,
    "kdad_run_name": kdad_wandb.run_name,
    "kdad_run_group": kdad_wandb.run_group,
    "kdad_sweep": kdad_wandb.sweep_id,
    "kdad_tags": kdad_wandb.tags,
    "kdad_wandb_id": kdad_wandb.run_id,
}


def register_resolvers() -> None:
    for name, function in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function)


def output_dir() -> Path:
    """This job's run folder; outside a Hydra job (or where Hydra set none, as with ``--cfg``)
    the working folder."""
    from omegaconf.errors import MissingMandatoryValue

    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except (ValueError, MissingMandatoryValue):
        return Path.cwd()


def guarded(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Run ``task``; turn a user error into one line, a FAILED file and a later exit code 2."""

    def run(cfg: DictConfig) -> Any:
        try:
            result = task(cfg)
        except Interrupted as exc:
            kdad_wandb.finish(exit_code=Interrupted.EXIT_CODE)
            message = one_line(exc)
            print(f"kdad: interrupted: {message}", file=sys.stderr, flush=True)
            with contextlib.suppress(OSError):
                RunFolder(output_dir()).mark(run_folder.INTERRUPTED, message)
            if is_multirun():  # the process is being stopped: start no further job
                with contextlib.suppress(Exception):
                    write_sweep_status(Path(HydraConfig.get().sweep.dir))
            if exc.hand_over is not None:
                exc.hand_over()  # the scheduler requeues the job and exits
            sys.exit(Interrupted.EXIT_CODE)
        except Exception as exc:
            message = user_error_message(exc)
            if message is None:
                kdad_wandb.finish(exit_code=1)
                if not is_multirun():
                    raise  # a bug: keep the traceback
                # In a sweep one crashing job must not take the others down: log it, record it.
                log.error("job crashed:\n%s", traceback.format_exc())
                message = f"crashed: {type(exc).__name__}: {one_line(exc)[:300]} (traceback in the job's log)"
            else:
                kdad_wandb.finish(exit_code=2)
        else:
            kdad_wandb.finish()
            return result
        print(f"kdad: error: {message}", file=sys.stderr, flush=True)
        with contextlib.suppress(OSError):
            RunFolder(output_dir()).mark(run_folder.FAILED, message)
        FAILED.append(message)
        return float("nan")

    def wrapper(cfg: DictConfig) -> Any:
        try:
            return run(cfg)
        finally:
            RunFolder(output_dir()).unlock()  # the folder's lock ends with the job

    wrapper.__name__ = getattr(task, "__name__", "task")
    return wrapper


_JOB_CODE = guarded(print).__code__  # the code every guarded task runs in


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message if ``exc`` is (or wraps) a :class:`KDADError` or a write that
    found the disk full, else None.

    Hydra's ``instantiate`` chains our error as the cause of its own; DataLoader workers and
    some libraries re-raise it as a new exception whose text holds the original.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, KDADError):
            return one_line(seen)
        seen = seen.__cause__ or seen.__context__
    text = f"{type(exc).__name__}: {exc}"
    return one_line(exc) if "KDADError" in text else disk_full(exc)


def _hydra_text(text: str) -> str:
    """Hydra's multi-line message as one line: indented option lists joined by commas, the
    config search path and the pointer to HYDRA_FULL_ERROR left out."""
    lines: list[str] = []
    for raw in text.split("Config search path:")[0].splitlines():
        line = raw.strip()
        if not line or line.startswith("Set the environment variable HYDRA_FULL_ERROR"):
            continue
        if raw.startswith(("\t", "  ")) and lines and not lines[-1].endswith(":"):
            lines[-1] += f", {line}"
        elif lines and not lines[-1].endswith((".", ":")):
            lines[-1] += f"; {line}"
        else:
            lines.append(line)
    return " ".join(lines)


def _unknown_key(exc: BaseException) -> str | None:
    """``data.nosuchkey=1`` (a key the config does not have): name it, the closest keys and
    the ``+`` that adds a new one."""
    import difflib

    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    cause = exc.__cause__
    if not isinstance(cause, ConfigAttributeError | ConfigKeyError) or not cause.full_key:
        return None
    parent = cause.parent_node
    keys = [str(k) for k in parent if not str(k).startswith("_")] if parent is not None else []
    group, _, key = str(cause.full_key).rpartition(".")
    where = group or "the config"
    close = difflib.get_close_matches(key, keys, n=1)
    hint = f"did you mean {group + '.' if group else ''}{close[0]}? " if close else ""
    shown = ", ".join(keys[:40]) + (", ..." if len(keys) > 40 else "")
    return (
        f"{cause.full_key}: {where} has no key {key!r} ({hint}its keys: {shown}); to add a new "
        f"key, prefix it with +: +{cause.full_key}=..."
    )


def _wrong_type(exc: BaseException) -> str | None:
    """``model.cbam=flase``, ``data.batch_size=1.5`` (a value the typed config refuses): the
    key, the value and what it expects, from OmegaConf's validation error."""
    from omegaconf.errors import ValidationError

    cause = exc.__cause__
    if not isinstance(cause, ValidationError) or not cause.full_key:
        return None
    reason = " ".join(str(cause).split("full_key:")[0].split())
    value = re.search(r"Value '([^']*)'", reason) or re.search(r"Invalid value '([^']*)'", reason)
    shown = f"{cause.full_key}={value.group(1)}" if value else str(cause.full_key)
    return f"{shown}: refused by the config's type ({reason})"


def config_error_message(exc: BaseException) -> str | None:
    """The one line for a mistake Hydra or OmegaConf found in the command line or a config
    file while composing, before any job runs (an unknown option or key, a malformed override,
    a YAML syntax error, a run folder that cannot be made), or None for anything else."""
    import yaml
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    seen: BaseException | None = exc
    while seen is not None:  # a YAML syntax error, wrapped or not: the file, line and column
        if isinstance(seen, yaml.MarkedYAMLError) and seen.problem_mark is not None:
            mark = seen.problem_mark
            context = (
                f" ({seen.context}, line {seen.context_mark.line + 1})"
                if (seen.context and seen.context_mark is not None)
                else ""
            )
            return (
                f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}: invalid YAML: "
                f"{seen.problem}{context}"
            )
        seen = seen.__cause__ or seen.__context__
    message = user_error_message(exc)
    if message is not None:
        return message
    if isinstance(exc, OverrideParseException):
        override = exc.override or "an empty argument"
        reason = exc.message.splitlines()[0] if exc.message else "cannot be parsed"
        return (
            f"{override}: not a valid override ({reason}); the syntax: "
            "https://hydra.cc/docs/advanced/override_grammar/basic/"
        )
    if isinstance(exc, MissingConfigException) and exc.options and exc.missing_cfg_file:
        group, _, name = str(exc.missing_cfg_file).rpartition("/")
        return f"{group}={name}: no such option; available: {', '.join(exc.options)}"
    if isinstance(exc, HydraException):
        unknown = _unknown_key(exc)
        if unknown is not None:
            return unknown
        typed = _wrong_type(exc)
        if typed is not None:
            return typed
        text = _hydra_text(str(exc))
        if isinstance(exc.__cause__, OmegaConfBaseException):
            text += f" ({_hydra_text((str(exc.__cause__).splitlines() or [''])[0])})"
        return text or type(exc).__name__
    if isinstance(exc, OmegaConfBaseException):
        key = getattr(exc, "full_key", None)
        return (
            f"config{f' key {key}' if key else ''}: {_hydra_text(str(exc).split('full_key:')[0])}"
        )
    if isinstance(exc, OSError) and exc.filename:
        folder = ""
        if isinstance(exc, FileExistsError | NotADirectoryError):
            folder = "; the run folder (hydra.run.dir, hydra.sweep.dir with -m) must be a folder"
        return f"cannot create or write {exc.filename}: {exc.strerror}{folder}"
    return None


def exit_if_failed() -> None:
    if FAILED:
        if len(FAILED) > 1:
            print(
                f"kdad: {len(FAILED)} job(s) failed (see {run_folder.FAILED} files in the sweep "
                "folder)",
                file=sys.stderr,
            )
        sys.exit(2)


def write_sweep_status(sweep: Path) -> list[dict[str, str]]:
    """``sweep_status.json`` (:meth:`~kdad.io.run_folder.SweepFolder.write_status`): how many
    jobs have a folder, which finished, which failed and why, which were interrupted; returns
    the failed ones."""
    status = SweepFolder(sweep).write_status()
    interrupted = status.get("interrupted", [])
    log.info(
        "sweep %s: %d jobs, %d finished, %d failed%s",
        sweep,
        status["jobs"],
        status["finished"],
        len(status["failed"]),
        f", {len(interrupted)} interrupted" if interrupted else "",
    )
    return status["failed"]


class SweepReport(Callback):
    """Hydra callback: at the end of a multirun, list failed jobs and make the command fail.

    Works with every launcher (in-process, submitit local or Slurm) because it reads the
    ``FAILED`` files the jobs leave in their folders. Writes ``sweep_status.json`` into the
    sweep folder: how many jobs ran, which finished, which failed and why.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        failed = write_sweep_status(Path(str(config.hydra.sweep.dir)))
        for item in failed:
            print(f"kdad: failed job {item['folder']}: {item['reason']}", file=sys.stderr)
            if item["reason"] not in FAILED:
                FAILED.append(item["reason"])


def instantiate_group(
    group: DictConfig | None, what: str, overrides: dict[str, dict[str, Any]] | None = None
) -> list[Any]:
    """Instantiate every entry of a callbacks/logger group that names a ``_target_``
    (``overrides``: keyword arguments per entry name, e.g. ``{"wandb": {"log_model": False}}``)."""
    objects: list[Any] = []
    if not group:
        return objects
    if not isinstance(group, DictConfig):
        raise KDADError(f"{what} must be a mapping of name -> config, got {type(group).__name__}")
    for name, conf in group.items():
        if isinstance(conf, DictConfig) and "_target_" in conf:
            objects.append(instantiate(conf, **((overrides or {}).get(str(name), {}))))
        elif isinstance(conf, DictConfig):
            log.debug("%s.%s has no _target_; skipped", what, name)
    return objects


# Config choices that need an optional extra: (group, option prefix) -> (module, extra).
EXTRAS = {
    ("hparams_search", ""): ("hydra_plugins.hydra_optuna_sweeper", "sweep"),
    ("hydra/sweeper", "optuna"): ("hydra_plugins.hydra_optuna_sweeper", "sweep"),
    ("launcher", ""): ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    ("hydra/launcher", "submitit"): ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    ("logger", "tensorboard"): ("tensorboard", "tensorboard"),
}


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def missing_extra(arguments: list[str]) -> str | None:
    """One line naming the extra to install when an argument selects a config group whose
    package is not installed (the optional extras: ``[sweep]``, ``[slurm]``, ``[tensorboard]``)."""
    for argument in arguments:
        key, _, value = argument.lstrip("+~").partition("=")
        for (group, prefix), (module, extra) in EXTRAS.items():
            selected = key == group and value not in ("", "null") and value.startswith(prefix)
            if selected and not _importable(module):
                return f"{argument} needs the optional extra: pip install 'kdad[{extra}]'"
    return None


def _deferred(path: str) -> Callable[[DictConfig], Any]:
    """The function ``"package.module:name"``, imported on its first call."""
    import importlib

    module_name, _, name = path.partition(":")

    def call(cfg: DictConfig) -> Any:
        function = getattr(importlib.import_module(module_name), name)
        from kdad.engine.console import one_console_for_lightning

        one_console_for_lightning()  # the task's module has imported Lightning
        return function(cfg)

    call.__name__ = name
    return call


def entry_point(
    task: str | Callable[[DictConfig], Any], config_name: str, module: str
) -> Callable[[], None]:
    """A command's ``main``: compose ``config_name`` (the shipped conf/ and any user config
    folder), run ``task`` under :func:`guarded`, exit 2 if any job failed. ``module`` is the
    command's module (its ``__spec__.name``), from which Hydra names the job (``train``, ...).

    ``task`` may be given as ``"package.module:function"``: it is imported when a job runs, so
    that ``--help``, ``--cfg``, ``--version`` and shell completion (a TAB) do not wait for
    Lightning and torch to import."""
    import hydra

    from kdad.config import CONFIG_DIR

    register_resolvers()
    if isinstance(task, str):
        task = _deferred(task)
    job = guarded(task)  # a new function: naming its module does not touch ``task``
    job.__module__ = module
    composed = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=config_name)(job)

    def main() -> None:
        if "--version" in sys.argv[1:]:
            from kdad import __version__

            print(f"kdad {__version__}")
            return
        message = missing_extra(sys.argv[1:])
        if message is not None:
            print(f"kdad: error: {message}", file=sys.stderr)
            sys.exit(2)
        try:
            with config_errors_in_one_line():
                composed()
        except ValueError as exc:  # Hydra's check of its mode flags, before it reports anything
            if not str(exc).startswith("Only one of --run"):
                raise
            print(
                f"kdad: error: {exc}: e.g. `--cfg job` prints one run's config without -m",
                file=sys.stderr,
            )
            sys.exit(2)
        exit_if_failed()

    return main


def _from_a_job(exc: BaseException) -> bool:
    """Whether ``exc`` came out of a job (a task run by :func:`guarded`): a bug, whose
    traceback Hydra prints as usual."""
    return any(frame.f_code is _JOB_CODE for frame, _ in traceback.walk_tb(exc.__traceback__))


@contextlib.contextmanager
def config_errors_in_one_line() -> Iterator[None]:
    """While Hydra runs a command: a mistake it finds before any job runs (composing the
    config, making the run folder) is one line ``kdad: error: ...`` and exit status 2, as
    kdad's own errors are, instead of Hydra's multi-line report (exit status 1).

    Hydra prints such errors itself, inside ``hydra.main``, from every step it runs through
    ``hydra._internal.utils.run_and_report``: that function is wrapped for the duration.
    ``HYDRA_FULL_ERROR=1`` keeps Hydra's full traceback; errors out of a job are Hydra's too.
    """
    from hydra._internal import utils as hydra_utils

    report = getattr(hydra_utils, "run_and_report", None)
    if report is None:  # another Hydra: its own reports (tests/cli/test_errors.py would say)
        yield
        return

    def one_line_first(func: Callable[[], Any]) -> Any:
        def step() -> Any:
            try:
                return func()
            except Exception as exc:
                message = None
                if os.environ.get("HYDRA_FULL_ERROR") != "1" and not _from_a_job(exc):
                    with contextlib.suppress(Exception):  # if in doubt, Hydra's own report
                        message = config_error_message(exc)
                if message is None:
                    raise
                print(f"kdad: error: {message}", file=sys.stderr, flush=True)
                sys.exit(2)

        return report(step)

    hydra_utils.run_and_report = one_line_first
    try:
        yield
    finally:
        hydra_utils.run_and_report = report
