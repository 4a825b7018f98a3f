"""What ``--help`` shows: flags as flags, every variable name whole, no file that is not there."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
import typer.main
from typer.testing import CliRunner

from adsync.cli import app

ROOT = Path(__file__).resolve().parents[2]


def _commands() -> list[list[str]]:
    found: list[list[str]] = []

    def walk(command: click.Command, path: list[str]) -> None:
        found.append(path)
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, [*path, name])

    walk(typer.main.get_group(app), [])
    return found


def _help(path: list[str], width: int = 80) -> str:
    result = CliRunner().invoke(
        app, [*path, "--help"], env={"COLUMNS": str(width)}, terminal_width=width
    )
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("path", _commands(), ids=lambda p: " ".join(p) or "adsync")
def test_flags_are_shown_without_a_value(path: list[str]) -> None:
    text = _help(path)
    # A flag takes no value: `--json true` is refused, so `--json <bool>` must not be shown.
    assert "<bool>" not in text
    assert not re.search(r"--(json|verbose|help|all|once)\s+(BOOLEAN|<)", text), text


def test_simulate_help_shows_every_variable_name_whole_at_80_columns() -> None:
    text = _help(["simulate"], 80)
    names = set(
        re.findall(r"ADSYNC_SIM_[A-Z_]+", (ROOT / "src/adsync/simulator/cli.py").read_text())
    )
    names |= {
        f"ADSYNC_SIM_{n.upper()}"
        for n in re.findall(
            r'envvar=_env\("([a-z_]+)"\)', (ROOT / "src/adsync/simulator/cli.py").read_text()
        )
    }
    assert len(names) >= 19
    shown = set(re.findall(r"ADSYNC_SIM_[A-Z_]+", text))
    assert shown == names
    assert "…" not in text


def test_simulate_help_names_no_file_missing_from_the_package() -> None:
    text = _help(["simulate"], 200)
    assert "PLATFORM_API.md" not in text
    for name in re.findall(r"\b[\w/.-]+\.md\b", text):
        assert (ROOT / name).exists(), name


def test_every_markdown_file_the_code_names_is_in_the_repository() -> None:
    named = {
        name
        for path in (ROOT / "src").rglob("*.py")
        for name in re.findall(r"\b[\w/-]+\.md\b", path.read_text(encoding="utf-8"))
    }
    assert "docs/platform-api.md" in named
    assert {name for name in named if not (ROOT / name).exists()} == set()
