"""The README's "Using it" lines, run as written, so the README cannot drift from adsync.

The block marked ``sh first-run`` is read from README.md itself and each line is
run by bash in a directory laid out like the checkout (``.venv``,
``.env.example``). A line ending in ``&`` is started in the background, as a
shell would, and waited for until it listens. The one change: the simulator's
port and the platform URL come from the environment (which wins over ``.env``),
so that the test never needs port 3001 free.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _proc import track
from _workers import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
_BLOCK = re.compile(r"^```sh first-run\n(.*?)^```", re.MULTILINE | re.DOTALL)
_COMMENT = re.compile(r"\s+#.*$")


def first_run_lines() -> list[str]:
    """The commands of the README's first-run block, comments left out."""
    found = _BLOCK.findall((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(found) == 1, "README.md has exactly one ```sh first-run block"
    lines = [_COMMENT.sub("", line).strip() for line in found[0].splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _checkout(tmp_path: Path) -> Path:
    """A directory with what the first-run lines use of a checkout: the venv and .env.example."""
    home = tmp_path / "adsync"
    home.mkdir()
    (home / ".venv").symlink_to(Path(sys.executable).parent.parent)
    shutil.copy(ROOT / ".env.example", home / ".env.example")
    return home


def test_first_run_block_names_the_steps_a_newcomer_needs() -> None:
    lines = first_run_lines()
    assert any(
        line.startswith(".venv/bin/adsync simulate") and line.endswith("&") for line in lines
    )
    assert "cp .env.example .env" in lines
    assert ".venv/bin/adsync check" in lines
    assert ".venv/bin/adsync sync" in lines


@pytest.mark.timeout(240)
def test_first_run_block_works_as_written(tmp_path: Path) -> None:
    home = _checkout(tmp_path)
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AD_PLATFORM_", "ADSYNC_")) and k != "DATABASE_URL"
    }
    env.update(
        ADSYNC_SIM_PORT=str(port),
        AD_PLATFORM_API_URL=f"http://127.0.0.1:{port}",
        COLUMNS="200",
    )
    outputs: dict[str, str] = {}
    for line in first_run_lines():
        if line.endswith("&"):
            # exec: the process the test kills afterwards is the command itself.
            proc = subprocess.Popen(
                ["bash", "-c", "exec " + line.removesuffix("&").strip()],
                cwd=home,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            track(proc)
            deadline = time.monotonic() + 30
            while not _listening(port):
                assert proc.poll() is None, f"{line!r} ended with {proc.returncode}"
                assert time.monotonic() < deadline, f"{line!r} never listened"
                time.sleep(0.1)
            continue
        done = subprocess.run(
            ["bash", "-c", line],
            cwd=home,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        assert done.returncode == 0, f"{line!r} exited {done.returncode}: {done.stderr[-2000:]}"
        outputs[line] = done.stdout + done.stderr
    assert "succeeded client default" in outputs[".venv/bin/adsync sync"]
    assert "100 synced, 0 failed of 100 seen" in outputs[".venv/bin/adsync sync"]
    assert "FAIL" not in outputs[".venv/bin/adsync check"]
    status = outputs[".venv/bin/adsync status"]
    assert re.search(r"default\s+succeeded\s", status), status
