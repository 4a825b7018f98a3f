"""The progress bar, read off a pseudo-terminal: on a terminal only, counting up to 100%."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pexpect
import pytest
from _proc import SIM_FAST, child_env, platform_env, run_sync

from adsync.simulator.testing import running_simulator

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

TOTAL = 100
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# "ops ━━━━╺━━━━  37/100  37% failed 0 requests 53 429s 0 ETA 1s"
FRAME = re.compile(
    r"^ops\s.*?(?P<done>\d+)/(?P<total>\d+)\s+(?P<pct>\d+)%\s+failed (?P<failed>\d+)"
    r"\s+requests (?P<requests>\d+)\s+429s (?P<rl>\d+)\s+ETA (?P<eta>\S+)"
)


def _on_a_terminal(env: dict[str, str], cwd: Path, *args: str) -> tuple[int, str]:
    """Run ``adsync sync`` on a pty; its exit code and everything it wrote, ANSI removed."""
    child = pexpect.spawn(
        sys.executable,
        ["-m", "adsync.cli", "sync", *args],
        env={**child_env(env), "TERM": "xterm-256color"},
        cwd=str(cwd),
        dimensions=(40, 160),
        encoding="utf-8",
        codec_errors="replace",
        timeout=60,
    )
    try:
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus is not None, f"killed by signal {child.signalstatus}"
    return child.exitstatus, ANSI.sub("", child.before or "")


def _frames(screen: str) -> list[re.Match[str]]:
    # A live display redraws its line after a carriage return.
    return [m for part in re.split(r"[\r\n]+", screen) if (m := FRAME.search(part.strip()))]


def test_the_progress_line_counts_up_to_100_percent_on_a_terminal(tmp_path: Path) -> None:
    with running_simulator(**SIM_FAST) as sim:
        env = platform_env(sim, f"sqlite:///{tmp_path / 'adsync.db'}")
        code, screen = _on_a_terminal(env, tmp_path)

    assert code == 0, screen[-3000:]
    frames = _frames(screen)
    assert frames, screen[-3000:]
    done = [int(f["done"]) for f in frames]
    # Seen while it runs, not only at the end, and never counting backwards.
    assert any(0 < n < TOTAL for n in done), done
    assert done == sorted(done)
    assert all(int(f["total"]) == TOTAL for f in frames)
    assert all(int(f["pct"]) == int(f["done"]) for f in frames)  # out of 100
    last = frames[-1]
    assert (last["done"], last["pct"], last["failed"], last["eta"]) == ("100", "100", "0", "done")
    assert int(last["requests"]) >= 110  # 10 pages and 100 sync calls at least
    assert any(f["eta"] not in ("?", "done") for f in frames), "an ETA while it runs"
    # The bar is left in place and the summary follows it.
    assert screen.index("succeeded client ops") > screen.rindex("100/100")


def test_no_progress_bar_without_a_terminal(tmp_path: Path) -> None:
    with running_simulator(**SIM_FAST) as sim:
        env = platform_env(sim, f"sqlite:///{tmp_path / 'adsync.db'}")
        result = run_sync(env, tmp_path)

    assert result.code == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "100 synced, 0 failed of 100 seen" in result.said
    assert _frames(output) == []
    assert "/100" not in output
    assert "━" not in output
    assert "\r" not in output
    assert "\x1b[" not in output


def test_no_progress_flag_hides_the_bar_on_a_terminal(tmp_path: Path) -> None:
    with running_simulator(**SIM_FAST) as sim:
        env = platform_env(sim, f"sqlite:///{tmp_path / 'adsync.db'}")
        code, screen = _on_a_terminal(env, tmp_path, "--no-progress")

    assert code == 0, screen[-3000:]
    assert "succeeded client ops" in screen
    assert _frames(screen) == []
    assert "━" not in screen
