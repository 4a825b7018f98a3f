"""What a hostile platform says reaches no terminal raw and breaks no run; no echo of a secret stays.

``adsync`` runs as a user runs it (a subprocess with its settings in the environment)
against a stand-in platform that puts control sequences in campaign ids and error
messages, hands out tokens that cannot go into a header, or echoes the token back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from _proc import adsync
from _standin import Script, StandIn, campaign, standin_platform
from typer.testing import CliRunner

from adsync.cli import app
from adsync.config import sqlalchemy_url
from adsync.models import CampaignFailure, RunCounters, RunStatus
from adsync.observability import REDACTOR
from adsync.store import SqlStore

pytestmark = pytest.mark.timeout(120)

# A window title, a cleared screen and a green "ALL GOOD", then a right-to-left override.
HOSTILE = "\x1b]0;pwned\x07\x1b[2J\x1b[32mALL GOOD\x1b[0m\u202e"
EVIL_ID = f"evil{HOSTILE}"
# Characters that must never reach a terminal from the platform.
RAW = ("\x1b", "\x07", "\u202e", "\x9b")


def sync_env(standin: StandIn, database_url: str, **over: str) -> dict[str, str]:
    env = {
        "AD_PLATFORM_API_URL": standin.url,
        "AD_PLATFORM_EMAIL": "ops@agency.example",
        "AD_PLATFORM_PASSWORD": "pw-Of-the-agency-7",
        "AD_PLATFORM_CLIENT_ID": "hostile",
        "AD_PLATFORM_RATE_LIMIT": "100",
        "AD_PLATFORM_RATE_WINDOW": "1",
        "AD_PLATFORM_REQUEST_TIMEOUT": "2",
        "AD_PLATFORM_REQUEST_DEADLINE": "5",
        "AD_PLATFORM_MAX_ATTEMPTS": "2",
        "AD_PLATFORM_BACKOFF_INITIAL": "0.01",
        "AD_PLATFORM_BACKOFF_MAX": "0.05",
        "DATABASE_URL": database_url,
    }
    env.update(over)
    return env


def assert_no_raw_controls(text: str) -> None:
    for char in RAW:
        assert char not in text, f"raw {char!r} in output:\n{text[-3000:]}"
    # A carriage return rewrites the line it is on; the only newlines are our own.
    assert "\r" not in text


def runs(database_url: str) -> list[dict[str, Any]]:
    engine = sa.create_engine(sqlalchemy_url(database_url))
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT * FROM sync_runs ORDER BY started_at")).mappings()
            return [dict(r) for r in rows]
    finally:
        engine.dispose()


def every_text_value(database_url: str) -> list[str]:
    """Every string stored in any column of any table."""
    engine = sa.create_engine(sqlalchemy_url(database_url))
    found: list[str] = []
    try:
        meta = sa.MetaData()
        meta.reflect(engine)
        with engine.connect() as conn:
            for table in meta.sorted_tables:
                for row in conn.execute(sa.select(table)):
                    found.extend(str(v) for v in row if isinstance(v, str))
    finally:
        engine.dispose()
    return found


@pytest.mark.slow
def test_platform_control_characters_reach_no_terminal(tmp_path: Path, database_url: str) -> None:
    script = Script(
        campaigns=[
            campaign("c-1"),
            campaign(EVIL_ID, name=None),  # malformed: no name
            campaign("c-400"),
        ],
        sync_answer=lambda cid, _token: (
            (
                400,
                {
                    "error": f"Bad request{HOSTILE}",
                    "message": f"\r\x1b[2K\x9b31m [bold red]markup[/bold red] {HOSTILE}",
                },
            )
            if cid == "c-400"
            else None
        ),
    )
    with standin_platform(script) as standin:
        env = sync_env(standin, database_url)
        result = adsync(
            "sync", "--log-format", "console", "--log-level", "DEBUG", env=env, cwd=tmp_path
        )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "1 synced, 2 failed of 3 seen" in result.stderr
    assert_no_raw_controls(result.stdout + result.stderr)
    # The summary and the console log lines show what came, escaped; markup stays text.
    summary = [line for line in result.stderr.splitlines() if line.startswith("  failed")]
    assert any(r"evil\x1b]0;pwned\x07\x1b[2J\x1b[32mALL GOOD" in line for line in summary)
    assert any("[bold red]markup[/bold red]" in line for line in summary)
    assert any(r"\r\x1b[2K\x9b31m" in line for line in summary)
    logged = [line for line in result.stderr.splitlines() if "campaign failed" in line]
    assert any(r"\x1b]0;pwned\x07" in line for line in logged), result.stderr[-3000:]

    env = {"DATABASE_URL": database_url, "COLUMNS": "1000"}
    status = adsync("status", env=env, cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert_no_raw_controls(status.stdout + status.stderr)
    assert r"evil\x1b]0;pwned\x07" in status.stdout
    assert "[bold red]markup[/bold red]" in status.stdout

    document = adsync("status", "--json", env=env, cwd=tmp_path)
    (run,) = json.loads(document.stdout)["runs"]
    # JSON keeps the platform's text as it came: a machine reads it, not a terminal.
    assert {f["campaign_id"] for f in run["failures"]} == {EVIL_ID, "c-400"}

    show = adsync("runs", "show", run["id"], env=env, cwd=tmp_path)
    assert show.returncode == 0, show.stderr
    assert_no_raw_controls(show.stdout + show.stderr)
    assert r"evil\x1b]0;pwned\x07" in show.stdout


@pytest.mark.slow
@pytest.mark.parametrize("token", ["tök-123456789", "tok-1\r\nX-Injected: 1", ""])
def test_a_token_that_cannot_go_in_a_header_fails_the_run_cleanly(
    tmp_path: Path, database_url: str, token: str
) -> None:
    with standin_platform(Script([campaign("c-1")], token=lambda: token)) as standin:
        result = adsync("sync", env=sync_env(standin, database_url), cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "access token" in result.stderr
    if token:
        assert token not in result.stderr
    (run,) = runs(database_url)
    assert run["status"] == "failed"
    assert run["resumable"]
    assert "access token" in run["error"]


@pytest.mark.slow
def test_an_unexpected_error_in_a_run_fails_it_and_exits_1(
    tmp_path: Path, database_url: str
) -> None:
    # A stand-in for a bug: something the pipeline does not expect, raised mid-run.
    boom = (
        "import adsync.client\n"
        "async def boom(self, campaign_id):\n"
        "    raise RuntimeError('boom in ' + campaign_id)\n"
        "adsync.client.PlatformClient.sync_campaign = boom"
    )
    with standin_platform(Script([campaign("c-1"), campaign("c-2")])) as standin:
        env = sync_env(standin, database_url)
        quiet = adsync("sync", env=env, cwd=tmp_path, python=boom)
        (failed,) = runs(database_url)
        verbose = adsync("sync", "--verbose", env=env, cwd=tmp_path, python=boom)
        (resumed,) = runs(database_url)
    assert quiet.returncode == 1, quiet.stderr[-3000:]
    assert "Traceback" not in quiet.stderr
    assert "error: unexpected RuntimeError: boom in c-" in quiet.stderr
    assert "--verbose" in quiet.stderr
    assert failed["status"] == "failed"
    assert failed["resumable"]
    assert failed["error"].startswith("unexpected RuntimeError: boom in c-")
    # Left resumable, so the next run took it up again.
    assert verbose.returncode == 1, verbose.stderr[-3000:]
    assert "Traceback (most recent call last)" in verbose.stderr
    assert (resumed["id"], resumed["status"], resumed["resumes"]) == (failed["id"], "failed", 1)


@pytest.mark.slow
def test_a_token_echoed_by_the_platform_is_kept_and_shown_nowhere(
    tmp_path: Path, database_url: str
) -> None:
    def scope_error(token: str) -> tuple[int, dict[str, Any]]:
        return 403, {"error": "Forbidden", "message": f"token {token} lacks scope"}

    script = Script(
        [campaign(f"c-{i}") for i in range(1, 4)],
        sync_answer=lambda cid, token: scope_error(token) if cid == "c-2" else None,
    )
    with standin_platform(script) as standin:
        env = sync_env(standin, database_url)
        args = ("sync", "--log-level", "DEBUG", "--log-format", "json")
        partial = adsync(*args, env=env, cwd=tmp_path)
        assert partial.returncode == 1, partial.stderr[-3000:]
        # Then the listing itself is refused with the echo: the run fails with it.
        script.list_answer = lambda _page, token: scope_error(token)
        failed = adsync(*args, env=env, cwd=tmp_path)
        assert failed.returncode == 1, failed.stderr[-3000:]
        logs = partial.stdout + partial.stderr + failed.stdout + failed.stderr
        tokens = list(standin.issued)
    assert len(tokens) == 2
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    assert any(line.get("event") == "campaign failed" for line in lines)
    assert "lacks scope" in logs

    (first, second) = runs(database_url)
    assert first["status"] == "partial"
    assert second["status"] == "failed"
    assert "lacks scope" in second["error"]
    stored = every_text_value(database_url)
    assert any("lacks scope" in value for value in stored)

    env = {"DATABASE_URL": database_url, "COLUMNS": "1000"}
    shown = [
        adsync("status", env=env, cwd=tmp_path),
        adsync("status", "--json", env=env, cwd=tmp_path),
        adsync("runs", "show", first["id"], env=env, cwd=tmp_path),
        adsync("runs", "show", second["id"], "--json", env=env, cwd=tmp_path),
    ]
    for result in shown:
        assert result.returncode == 0, result.stderr
    printed = "".join(r.stdout + r.stderr for r in shown)
    assert "lacks scope" in printed
    for token in tokens:
        assert token not in logs
        assert [value for value in stored if token in value] == []
        assert token not in printed


def test_what_is_stored_is_redacted_and_bounded(store: SqlStore) -> None:
    token = "tok-stored-5a4b3c2d1e"
    REDACTOR.register_recent(token)
    run = store.claim_run("acme", "host:1:a", 30.0)
    megabyte = "x" * 1_000_000
    store.write_failures(
        run.id, "acme", [CampaignFailure("c1", f"token {token} lacks scope {megabyte}", "sync")]
    )
    store.finish_run(
        run.id,
        "host:1:a",
        RunStatus.FAILED,
        RunCounters(),
        f"HTTP 403: token {token} lacks scope {megabyte}",
        resumable=True,
    )
    (failure,) = store.run_failures(run.id)
    assert failure.reason.startswith("token *** lacks scope xxx")
    assert len(failure.reason) < 2_100
    stored = store.get_run(run.id)
    assert stored is not None
    assert stored.error is not None
    assert stored.error.startswith("HTTP 403: token *** lacks scope xxx")
    assert len(stored.error) < 2_100


def test_accounts_list_shows_control_characters_as_escapes(tmp_path: Path) -> None:
    accounts = tmp_path / "accounts.toml"
    accounts.write_text(
        "[[accounts]]\n"
        'client_id = "acme"\n'
        'email = "ads\\u001b]0;pwned\\u0007@acme.example"\n'
        'password_file = "/run/secrets/\\u001b[2J[bold]acme[/bold]"\n'
        'api_url = "http://x\\u202e.example"\n'
    )
    result = CliRunner().invoke(
        app, ["accounts", "list", "--accounts", str(accounts)], env={"COLUMNS": "300"}
    )
    assert result.exit_code == 0, result.output
    for raw in ("\x1b", "\x07", "\u202e"):
        assert raw not in result.stdout
    assert r"ads\x1b]0;pwned\x07@acme.example" in result.stdout
    assert r"\x1b[2J[bold]acme[/bold]" in result.stdout
    listed = CliRunner().invoke(app, ["accounts", "list", "--json", "--accounts", str(accounts)])
    assert json.loads(listed.stdout)["accounts"][0]["email"] == "ads\x1b]0;pwned\x07@acme.example"
