"""A command's console on a terminal: each log line once, above the progress bar, not in it."""

from __future__ import annotations

import io
import logging
import os
import pty
import re
import subprocess
import sys
import threading
from pathlib import Path

from clirun import TINY

from kdad.engine.console import ConsoleHandler

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_the_console_handler_writes_to_stdout_as_it_is_now(monkeypatch) -> None:
    handler = ConsoleHandler(stream=sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    record = logging.LogRecord("kdad", logging.INFO, __file__, 1, "a line", None, None)
    replaced = io.StringIO()  # what Rich puts in sys.stdout while its progress bar is live
    monkeypatch.setattr(sys, "stdout", replaced)
    handler.emit(record)
    assert replaced.getvalue() == "a line\n"


def _run_on_a_terminal(args: list[str], env: dict[str, str], cwd: Path) -> str:
    """The command with a pseudo-terminal as stdout and stderr; what the terminal got."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kdad.cli.train", *args],
        cwd=cwd,
        env={**env, "COLUMNS": "160", "TERM": "xterm"},
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the terminal closed: the process has ended
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    assert proc.wait(timeout=600) == 0, b"".join(chunks).decode(errors="replace")[-3000:]
    reader.join(timeout=30)
    os.close(leader)
    return b"".join(chunks).decode(errors="replace")


def test_log_lines_print_once_and_never_inside_the_progress_bar(
    env: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    screen = _run_on_a_terminal(
        [*TINY, "trainer.max_epochs=2", "logger=none", f"hydra.run.dir={out}"], env, tmp_path
    )
    text = ANSI.sub("", screen)
    assert "Epoch 1/1" in text  # the progress bar was drawn (a terminal)
    # Lightning's lines once (its package's own "INFO: ..." handler is not used as well).
    assert text.count("Seed set to 111") == 1, text[-3000:]
    assert "INFO: " not in text
    # Every log line starts a line of its own: nothing of the bar before it on its line.
    records = [m.start() for m in re.finditer(r"\[\d{4}-\d\d-\d\d [\d:,]+\]\[", text)]
    assert len(records) >= 5
    for start in records:
        line_start = max(text.rfind("\r", 0, start), text.rfind("\n", 0, start)) + 1
        assert text[line_start:start].strip() == "", repr(text[line_start - 200 : start + 100])
