"""``adsync status`` and ``adsync runs show`` against real SQLite and PostgreSQL databases.

The store is filled through its public API, as the pipeline would; the commands run
through ``CliRunner`` on an app built here from ``adsync.cli.history``, plus one
subprocess test of the installed ``adsync`` once the commands are registered in it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import typer
import typer.main
from _dbclock import DbClock
from _proc import adsync
from click.testing import Result
from typer.testing import CliRunner

from adsync.cli.history import register
from adsync.models import (
    Campaign,
    CampaignFailure,
    RunCounters,
    RunRecord,
    RunStatus,
    SyncedCampaign,
)
from adsync.redact import REDACTOR
from adsync.store import SqlStore

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
LEASE = 30.0
OWNER = "host-a:100:aaaa"


def history_app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def invoke(url: str, *args: str) -> Result:
    return CliRunner().invoke(history_app(), list(args), env={"DATABASE_URL": url})


def campaign(cid: str) -> Campaign:
    return Campaign(
        id=cid,
        name=f"Campaign {cid}",
        status="active",
        budget=10.0,
        impressions=100,
        clicks=5,
        conversions=1,
        created_at=None,
    )


def synced(*ids: str, at: datetime) -> list[SyncedCampaign]:
    return [SyncedCampaign(campaign(cid), at) for cid in ids]


@dataclass(frozen=True)
class History:
    url: str
    older: str  # acme, succeeded
    newer: str  # acme, interrupted then resumed, partial with 8 failures
    failed: str  # globex, failed with an error
    running: str  # initech, never finished


def reason(i: int) -> str:
    return f"sync endpoint answered 500 for c-{i} after 8 attempts"


# The database's clock while the history is written: each step sets it.
DB_CLOCK = DbClock(T0)


def open_test_store(url: str) -> SqlStore:
    DB_CLOCK.at = T0
    store = SqlStore.from_url(url, sleep=lambda _s: None, now=DB_CLOCK)
    store.upgrade()
    return store


def claim(store: SqlStore, client_id: str, now: datetime) -> RunRecord:
    DB_CLOCK.at = now
    return store.claim_run(client_id, OWNER, LEASE)


def finish(store: SqlStore, run_id: str, now: datetime, *args: Any, **kw: Any) -> None:
    """``store.finish_run(run_id, OWNER, *args, **kw)`` at ``now``."""
    DB_CLOCK.at = now
    store.finish_run(run_id, OWNER, *args, **kw)


@pytest.fixture
def history(database_url: str) -> History:
    store = open_test_store(database_url)
    try:
        older = claim(store, "acme", T0)
        store.write_synced(older.id, "acme", synced("c-a", "c-b", "c-c", at=T0))
        finish(
            store,
            older.id,
            T0 + timedelta(seconds=65),
            RunStatus.SUCCEEDED,
            RunCounters(seen=3, synced=3, requests=5, pages=1),
        )

        t1 = T0 + timedelta(minutes=10)
        failed = claim(store, "globex", t1)
        finish(
            store,
            failed.id,
            t1 + timedelta(seconds=3),
            RunStatus.FAILED,
            RunCounters(requests=9, retries=8),
            "platform unreachable after 8 attempts",
            resumable=True,
        )

        t2 = T0 + timedelta(hours=1)
        newer = claim(store, "acme", t2)
        store.record_listed(newer.id, "acme", [f"c-{i}" for i in range(10)])
        store.write_synced(newer.id, "acme", synced("c-8", at=t2))
        finish(store, newer.id, t2, RunStatus.INTERRUPTED, RunCounters(seen=10, synced=1))
        resumed = claim(store, "acme", t2 + timedelta(seconds=40))
        assert resumed.id == newer.id  # the interrupted run is taken over, not restarted
        store.write_synced(newer.id, "acme", synced("c-9", at=t2))
        store.write_failures(
            newer.id,
            "acme",
            [CampaignFailure(f"c-{i}", reason(i), "sync") for i in range(7)]
            + [CampaignFailure("", "id: field required", "payload")],
        )
        finish(
            store,
            newer.id,
            t2 + timedelta(minutes=5),
            RunStatus.PARTIAL,
            RunCounters(seen=11, synced=2, failed=8, requests=30, retries=6, rate_limited=2),
        )

        running = claim(store, "initech", T0 + timedelta(hours=2))
    finally:
        store.dispose()
    return History(database_url, older.id, newer.id, failed.id, running.id)


# --- status -----------------------------------------------------------------------------


def test_status_json_matches_the_database(history: History) -> None:
    result = invoke(history.url, "status", "--json")
    assert result.exit_code == 0, result.output
    runs = json.loads(result.stdout)["runs"]  # stdout is one JSON document, nothing else
    # Grouped by client, latest-active client first; newest first within a client.
    assert [r["id"] for r in runs] == [
        history.running,
        history.newer,
        history.older,
        history.failed,
    ]
    by_id = {r["id"]: r for r in runs}

    newer = by_id[history.newer]
    assert newer["client_id"] == "acme"
    assert newer["status"] == "partial"
    assert datetime.fromisoformat(newer["started_at"]) == T0 + timedelta(hours=1)
    assert datetime.fromisoformat(newer["finished_at"]) == T0 + timedelta(hours=1, minutes=5)
    # Five minutes from start to finish, of which 40 s no process was running it.
    assert newer["duration_seconds"] == 260.0
    assert newer["resumes"] == 1
    assert (newer["seen"], newer["synced"], newer["failed"]) == (11, 2, 8)
    assert (newer["requests"], newer["retries"], newer["rate_limited"]) == (30, 6, 2)
    assert newer["resumable"] is False
    assert newer["error"] is None
    assert newer["failures"] == [
        *({"campaign_id": f"c-{i}", "kind": "sync", "reason": reason(i)} for i in range(7)),
        {"campaign_id": None, "kind": "payload", "reason": "id: field required"},
    ]

    older = by_id[history.older]
    assert (older["status"], older["synced"], older["duration_seconds"]) == ("succeeded", 3, 65.0)
    assert older["failures"] == []

    failed = by_id[history.failed]
    assert failed["status"] == "failed"
    assert failed["error"] == "platform unreachable after 8 attempts"
    assert failed["resumable"] is True
    assert (failed["requests"], failed["retries"]) == (9, 8)

    running = by_id[history.running]
    assert running["status"] == "running"
    assert running["finished_at"] is None
    assert running["duration_seconds"] is None
    assert running["owner"] == OWNER


def test_status_text_shows_counts_errors_and_failure_reasons(history: History) -> None:
    result = invoke(history.url, "status")
    assert result.exit_code == 0, result.output
    text = result.stdout
    [row] = [ln.split() for ln in text.splitlines() if ln.startswith(history.newer[:12])]
    assert row[1:] == [
        "acme",
        "partial",
        "2025-03-01T13:00:00Z",
        "4m20s",
        "11",
        "2",
        "8",
        "30",
        "6",
        "2",
        "1",
    ]
    for i in range(5):
        assert f"failed c-{i} [sync]: {reason(i)}" in text
    assert "c-5" not in text
    assert f"... 3 more: adsync runs show {history.newer}" in text
    assert "error: platform unreachable after 8 attempts" in text
    # A run left "running" by a process long gone is recognisable as dead.
    assert "running (lease expired)" in text


def test_status_filters_by_client_and_limits(history: History) -> None:
    only = json.loads(invoke(history.url, "status", "--client", "globex", "--json").stdout)
    assert [r["id"] for r in only["runs"]] == [history.failed]
    latest = json.loads(invoke(history.url, "status", "--limit", "2", "--json").stdout)
    assert [r["id"] for r in latest["runs"]] == [history.running, history.newer]
    text = invoke(history.url, "status", "--client", "nobody").stdout
    assert text.strip() == "no runs yet for client 'nobody'"


def test_status_of_an_empty_database(database_url: str) -> None:
    open_test_store(database_url).dispose()  # migrated, no runs
    text = invoke(database_url, "status")
    assert text.exit_code == 0, text.output
    assert text.stdout.strip() == "no runs yet"
    doc = invoke(database_url, "status", "--json")
    assert doc.exit_code == 0, doc.output
    assert json.loads(doc.stdout) == {"runs": []}


# --- runs show --------------------------------------------------------------------------


def test_runs_show_by_prefix_lists_every_failure(history: History) -> None:
    result = invoke(history.url, "runs", "show", history.newer[:8])
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert history.newer in text
    assert "8 failed campaigns" in text
    for i in range(7):
        assert reason(i) in text
    assert "(no id)" in text
    assert "id: field required" in text
    assert "seen 11, synced 2, failed 8" in text


def test_runs_show_json_by_full_id_and_prefix(history: History) -> None:
    full = invoke(history.url, "runs", "show", history.failed, "--json")
    assert full.exit_code == 0, full.output
    run = json.loads(full.stdout)["run"]
    assert run["id"] == history.failed
    assert run["error"] == "platform unreachable after 8 attempts"
    assert run["failures"] == []
    # Upper case and surrounding blanks are forgiven, as people paste ids.
    prefix = invoke(history.url, "runs", "show", f" {history.newer[:10].upper()} ", "--json")
    assert prefix.exit_code == 0, prefix.output
    assert len(json.loads(prefix.stdout)["run"]["failures"]) == 8


def test_the_commands_scrub_what_the_process_knows_is_secret(database_url: str) -> None:
    # Stored before the process learned it was a secret (a token the platform echoed,
    # known as one later): the commands take it out as they show the run.
    token = "tok-learned-after-the-write-5e1f"
    store = open_test_store(database_url)
    try:
        run = claim(store, "leaky", T0)
        store.write_failures(run.id, "leaky", [CampaignFailure("c-1", f"{token} refused", "sync")])
        finish(store, run.id, T0, RunStatus.FAILED, RunCounters(failed=1), f"lost {token}")
    finally:
        store.dispose()
    REDACTOR.register_recent(token)
    outputs = [
        invoke(database_url, "status").stdout,
        invoke(database_url, "status", "--json").stdout,
        invoke(database_url, "runs", "show", run.id).stdout,
        invoke(database_url, "runs", "show", run.id, "--json").stdout,
    ]
    for output in outputs:
        assert token not in output
        assert "*** refused" in output
        assert "lost ***" in output


def test_runs_show_of_an_unknown_id_is_exit_1(history: History) -> None:
    result = invoke(history.url, "runs", "show", "not-a-run-id")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "no run with id or id prefix 'not-a-run-id'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_runs_show_of_an_ambiguous_prefix_is_exit_1(database_url: str) -> None:
    store = open_test_store(database_url)
    seen: dict[str, str] = {}
    try:
        # Run ids are random hex: among 17 runs two must share a first character.
        for i in range(17):
            at = T0 + timedelta(minutes=i)
            run = claim(store, "bulk", at)
            finish(store, run.id, at, RunStatus.SUCCEEDED, RunCounters())
            if run.id[0] in seen:
                break
            seen[run.id[0]] = run.id
        prefix = run.id[0]
    finally:
        store.dispose()
    result = invoke(database_url, "runs", "show", prefix)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "matches several runs" in result.stderr
    # One more character may already settle it; the full id always does.
    assert invoke(database_url, "runs", "show", run.id).exit_code == 0


# --- configuration ------------------------------------------------------------------------


def test_database_url_comes_from_a_dotenv_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'from-dotenv.db'}"
    store = open_test_store(url)
    try:
        run = claim(store, "dotenv", T0)
    finally:
        store.dispose()
    (tmp_path / ".env").write_text(f"DATABASE_URL={url}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    result = CliRunner().invoke(history_app(), ["status", "--json"])
    assert result.exit_code == 0, result.output
    assert [r["id"] for r in json.loads(result.stdout)["runs"]] == [run.id]


def test_an_unusable_database_url_is_one_line_without_the_password() -> None:
    result = invoke("mysql://adsync:hunter22pw@db.example/adsync", "status")
    assert result.exit_code == 2  # bad configuration, not a database outage
    assert "DATABASE_URL" in result.stderr
    assert "hunter22pw" not in result.output
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_every_history_command_has_help_text() -> None:
    group = typer.main.get_group(history_app())
    status = group.commands["status"]
    runs = group.commands["runs"]
    show = runs.commands["show"]  # type: ignore[attr-defined]
    for command in (status, runs, show):
        assert (command.help or "").strip()
    help_text = CliRunner().invoke(history_app(), ["status", "--help"]).output
    for option in ("--client", "--limit", "--json"):
        assert option in help_text


# --- the real command line ---------------------------------------------------------------


def _registered() -> bool:
    from adsync.cli import app

    return "status" in typer.main.get_group(app).commands


@pytest.mark.slow
@pytest.mark.skipif(not _registered(), reason="adsync.cli does not register status/runs yet")
def test_adsync_status_and_runs_show_as_a_subprocess(history: History, tmp_path: Path) -> None:
    status = adsync("status", "--json", env={"DATABASE_URL": history.url}, cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert [r["id"] for r in json.loads(status.stdout)["runs"]][:2] == [
        history.running,
        history.newer,
    ]
    text = adsync("status", env={"DATABASE_URL": history.url}, cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    assert f"failed c-0 [sync]: {reason(0)}" in text.stdout
    show = adsync(
        "runs", "show", history.newer[:8], env={"DATABASE_URL": history.url}, cwd=tmp_path
    )
    assert show.returncode == 0, show.stderr
    assert reason(6) in show.stdout
    unknown = adsync("runs", "show", "zzzz", env={"DATABASE_URL": history.url}, cwd=tmp_path)
    assert unknown.returncode == 1
    assert "no run with id" in unknown.stderr
