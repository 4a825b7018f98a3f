"""Rendering of the run history from hand-made records: no database, no CLI."""

from __future__ import annotations

import dataclasses
import io
import json
import unicodedata
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from adsync.history import (
    format_duration,
    format_time,
    order_runs,
    render_run,
    render_status,
    run_document,
    run_to_dict,
    status_document,
)
from adsync.models import CampaignFailure, RunRecord, RunStatus
from adsync.redact import Redactor

T0 = datetime(2025, 3, 1, 12, 0, 0, 250_000, tzinfo=UTC)
# A redactor of the test's own: it knows no secret, and scrubs what looks like one.
SCRUB = Redactor().scrub

EXPECTED_KEYS = [
    "id",
    "client_id",
    "status",
    "started_at",
    "finished_at",
    "heartbeat_at",
    "lease_until",
    "owner",
    "resumes",
    "seen",
    "synced",
    "failed",
    "requests",
    "retries",
    "rate_limited",
    "pages",
    "listing_complete",
    "resumable",
    "error",
    "run_seq",
    "active_seconds",
    "duration_seconds",
    "failures",
]


def run(
    run_id: str,
    client_id: str = "acme",
    *,
    start: datetime = T0,
    seconds: float | None = 65.0,
    status: RunStatus = RunStatus.SUCCEEDED,
    **over: Any,
) -> RunRecord:
    finished = None if seconds is None else start + timedelta(seconds=seconds)
    values: dict[str, Any] = {
        "id": run_id,
        "client_id": client_id,
        "status": status,
        "started_at": start,
        "finished_at": finished,
        "heartbeat_at": finished or start,
        "lease_until": (finished or start) + timedelta(seconds=30),
        "owner": "host:1:abc",
        "resumes": 1,
        "seen": 100,
        "synced": 93,
        "failed": 7,
        "requests": 251,
        "retries": 17,
        "rate_limited": 4,
        "pages": 10,
        "listing_complete": True,
        "resumable": False,
        "error": None,
    }
    values.update(over)
    return RunRecord(**values)


def fails(n: int, prefix: str = "c") -> list[CampaignFailure]:
    return [CampaignFailure(f"{prefix}-{i}", f"reason number {i}", "sync") for i in range(n)]


def capture(render: Any, *args: Any, **kw: Any) -> str:
    buf = io.StringIO()
    kw.setdefault("scrub", SCRUB)
    render(Console(file=buf, width=200), *args, **kw)
    return buf.getvalue()


def row_of(text: str, run_id: str) -> list[str]:
    """The table row of a run, split into cells."""
    [line] = [ln for ln in text.splitlines() if ln.startswith(run_id[:12] + " ")]
    return line.split()


# --- formatters ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "-"),
        (0.0, "0.0s"),
        (4.24, "4.2s"),
        (59.9, "59.9s"),
        (65.0, "1m05s"),
        (665.4, "11m05s"),
        (3600.0, "1h00m00s"),
        (7390.0, "2h03m10s"),
    ],
)
def test_format_duration(seconds: float | None, text: str) -> None:
    assert format_duration(seconds) == text


def test_format_time_is_utc_to_the_second_and_treats_naive_as_utc() -> None:
    aware = datetime(2025, 3, 1, 13, 0, 5, 999_999, tzinfo=UTC)
    assert format_time(aware) == "2025-03-01T13:00:05Z"
    other_zone = aware.astimezone(timezone(timedelta(hours=-5)))
    assert format_time(other_zone) == "2025-03-01T13:00:05Z"
    assert format_time(datetime(2025, 3, 1, 13, 0, 5)) == "2025-03-01T13:00:05Z"
    assert format_time(None) == "-"


# --- ordering --------------------------------------------------------------------------


def test_runs_are_grouped_by_client_newest_first() -> None:
    runs = [
        run("a-old", "acme", start=T0),
        run("g-new", "globex", start=T0 + timedelta(hours=3)),
        run("a-new", "acme", start=T0 + timedelta(hours=2)),
        run("g-old", "globex", start=T0 + timedelta(hours=1)),
        run("i-only", "initech", start=T0 + timedelta(minutes=30)),
    ]
    ordered = [r.id for r in order_runs(runs)]
    # globex ran last, so it comes first; inside each client newest first.
    assert ordered == ["g-new", "g-old", "a-new", "a-old", "i-only"]
    assert [r["id"] for r in status_document(runs, {}, scrub=SCRUB)["runs"]] == ordered


def test_table_rows_follow_the_same_order() -> None:
    runs = [
        run("aaaaaaaaaaaa1", "acme", start=T0),
        run("bbbbbbbbbbbb2", "acme", start=T0 + timedelta(hours=1)),
    ]
    text = capture(render_status, runs, {})
    assert text.index("bbbbbbbbbbbb") < text.index("aaaaaaaaaaaa")


# --- JSON ------------------------------------------------------------------------------


def test_json_has_every_field_iso_datetimes_duration_and_failures() -> None:
    record = run(
        "0123456789abcdef",
        status=RunStatus.PARTIAL,
        seconds=665.5,
        resumable=True,
        error="boom",
    )
    failures = [
        CampaignFailure("c-1", "platform answered 500", "sync"),
        CampaignFailure("", "id: field required", "payload"),
    ]
    doc = run_to_dict(record, failures, scrub=SCRUB)
    assert list(doc) == EXPECTED_KEYS
    # Every stored field of RunRecord is there (``resumed`` is per-process, not history).
    stored = {f.name for f in dataclasses.fields(RunRecord)} - {"resumed"}
    assert stored <= set(doc)
    assert doc["id"] == "0123456789abcdef"
    assert doc["status"] == "partial"
    assert doc["started_at"] == "2025-03-01T12:00:00.250000+00:00"
    assert datetime.fromisoformat(doc["finished_at"]) == T0 + timedelta(seconds=665.5)
    assert doc["duration_seconds"] == 665.5
    assert (doc["seen"], doc["synced"], doc["failed"]) == (100, 93, 7)
    assert (doc["requests"], doc["retries"], doc["rate_limited"]) == (251, 17, 4)
    assert doc["resumes"] == 1
    assert doc["listing_complete"] is True
    assert doc["resumable"] is True
    assert doc["error"] == "boom"
    assert doc["failures"] == [
        {"campaign_id": "c-1", "kind": "sync", "reason": "platform answered 500"},
        {"campaign_id": None, "kind": "payload", "reason": "id: field required"},
    ]
    assert json.loads(json.dumps(doc)) == doc


def test_json_of_an_unfinished_run_has_null_finish_and_duration() -> None:
    doc = run_to_dict(run("r1", seconds=None, status=RunStatus.RUNNING), [], scrub=SCRUB)
    assert doc["finished_at"] is None
    assert doc["duration_seconds"] is None
    assert doc["status"] == "running"
    assert doc["failures"] == []


def test_status_document_lists_all_failures_of_each_run() -> None:
    runs = [run("r1"), run("r2", start=T0 + timedelta(minutes=1))]
    doc = status_document(runs, {"r1": fails(9)}, scrub=SCRUB)
    by_id = {r["id"]: r for r in doc["runs"]}
    assert len(by_id["r1"]["failures"]) == 9  # no truncation for machines
    assert by_id["r2"]["failures"] == []
    assert status_document([], {}, scrub=SCRUB) == {"runs": []}


def test_run_document_wraps_one_run() -> None:
    doc = run_document(run("r1"), fails(2), scrub=SCRUB)
    assert list(doc) == ["run"]
    assert doc["run"]["id"] == "r1"
    assert len(doc["run"]["failures"]) == 2


def test_secrets_are_scrubbed_from_errors_and_reasons_in_json_and_text() -> None:
    record = run(
        "r1",
        status=RunStatus.FAILED,
        error="database unavailable (postgresql://adsync:hunter22pw@db/adsync)",
    )
    failures = [CampaignFailure("c-1", "sent Authorization: Bearer abc.def.ghi123", "sync")]
    dumped = json.dumps(run_to_dict(record, failures, scrub=SCRUB))
    text = capture(render_status, [record], {"r1": failures}) + capture(
        render_run, record, failures
    )
    for output in (dumped, text):
        assert "hunter22pw" not in output
        assert "abc.def.ghi123" not in output
        assert "postgresql://adsync:***@db/adsync" in output


def test_the_callers_scrub_is_the_only_one_applied_to_errors_and_reasons() -> None:
    # What is a secret is the caller's knowledge: the rendering applies the function it
    # is given to every stored text, in text and JSON, and has no redactor of its own.
    record = run("r1", status=RunStatus.FAILED, error="lost s3cr3t-dsn, Bearer abc.def.ghi123")
    failures = [CampaignFailure("c-1", "echoed s3cr3t-dsn", "sync")]

    def scrub(text: str) -> str:
        return text.replace("s3cr3t-dsn", "[gone]")

    doc = run_document(record, failures, scrub=scrub)["run"]
    text = capture(render_status, [record], {"r1": failures}, scrub=scrub) + capture(
        render_run, record, failures, scrub=scrub
    )
    assert doc["error"] == "lost [gone], Bearer abc.def.ghi123"
    assert doc["failures"][0]["reason"] == "echoed [gone]"
    assert status_document([record], {"r1": failures}, scrub=scrub)["runs"][0] == doc
    assert "s3cr3t-dsn" not in text
    assert "error: lost [gone], Bearer abc.def.ghi123" in text
    assert "failed c-1 [sync]: echoed [gone]" in text


def test_control_characters_from_outside_are_shown_as_escapes() -> None:
    hostile = "\x1b]0;pwned\x07\x1b[2J\x1b[32mALL GOOD\x1b[0m\u202e"
    record = run(
        "r1",
        f"acme{hostile}",
        status=RunStatus.FAILED,
        error=f"HTTP 400: {hostile}",
        owner=f"host{hostile}",
    )
    failures = [CampaignFailure(f"c{hostile}", f"reason {hostile}", "sync")]
    text = capture(render_status, [record], {"r1": failures}) + capture(
        render_run, record, failures
    )
    for raw in ("\x1b", "\x07", "\u202e"):
        assert raw not in text
    assert r"failed c\x1b]0;pwned\x07" in text
    assert r"reason \x1b]0;pwned\x07\x1b[2J\x1b[32mALL GOOD\x1b[0m\u202e" in text
    assert r"error: HTTP 400: \x1b]0;pwned\x07" in text
    # JSON keeps the text as it came: a machine reads it, not a terminal.
    assert run_to_dict(record, failures, scrub=SCRUB)["failures"][0]["campaign_id"] == f"c{hostile}"


# --- status text -----------------------------------------------------------------------


def test_status_text_shows_the_numbers_of_each_run() -> None:
    record = run("0123456789abcdef", status=RunStatus.PARTIAL, seconds=665.0)
    text = capture(render_status, [record], {})
    cells = row_of(text, record.id)
    assert cells == [
        "0123456789ab",  # the short id, not the full one
        "acme",
        "partial",
        "2025-03-01T12:00:00Z",
        "11m05s",
        "100",  # seen
        "93",  # synced
        "7",  # failed
        "251",  # requests
        "17",  # retries
        "4",  # 429s
        "1",  # resumes
    ]
    header = text.splitlines()[0].split()
    assert header[-4:] == ["requests", "retries", "429s", "resumes"]
    assert "0123456789abcdef" not in text


def test_status_text_lists_five_failures_then_points_to_runs_show() -> None:
    record = run("0123456789abcdef", status=RunStatus.PARTIAL)
    text = capture(render_status, [record], {record.id: fails(8)})
    for i in range(5):
        assert f"failed c-{i} [sync]: reason number {i}" in text
    for i in range(5, 8):
        assert f"c-{i}" not in text
    assert "... 3 more: adsync runs show 0123456789abcdef" in text
    assert "8 failed campaigns" in text


def test_status_text_with_exactly_five_failures_has_no_more_line() -> None:
    record = run("r1", status=RunStatus.PARTIAL)
    text = capture(render_status, [record], {"r1": fails(5)})
    assert "failed c-4 [sync]: reason number 4" in text
    assert "more:" not in text


def test_status_text_shows_the_error_and_a_failure_without_id() -> None:
    record = run("r1", status=RunStatus.FAILED, error="platform unreachable after 8 attempts")
    failures = [CampaignFailure("", "id: field required", "payload")]
    text = capture(render_status, [record], {"r1": failures})
    assert "error: platform unreachable after 8 attempts" in text
    assert "failed (no id) [payload]: id: field required" in text


def test_status_text_prints_markup_literally_and_long_reasons_on_one_line() -> None:
    reason = "[bold red]not markup[/] " + "x" * 300
    record = run("r1", status=RunStatus.PARTIAL)
    text = capture(render_status, [record], {"r1": [CampaignFailure("c-1", reason, "sync")]})
    assert f"  failed c-1 [sync]: {reason}" in [ln.rstrip() for ln in text.splitlines()]


def test_status_text_marks_a_running_run_whose_lease_lapsed() -> None:
    record = run("r1", seconds=None, status=RunStatus.RUNNING)  # lease until T0+30s
    live = capture(render_status, [record], {}, now=T0 + timedelta(seconds=10))
    dead = capture(render_status, [record], {}, now=T0 + timedelta(minutes=5))
    assert "lease expired" not in live
    assert row_of(live, "r1")[2:4] == ["running", "2025-03-01T12:00:00Z"]
    assert "running (lease expired)" in dead
    # "running (lease expired)" is three words, so the duration is the 7th cell.
    assert row_of(dead, "r1")[6] == "-"  # no duration while unfinished


def test_status_text_when_there_are_no_runs() -> None:
    assert capture(render_status, [], {}).strip() == "no runs yet"
    assert capture(render_status, [], {}, client_id="acme").strip() == (
        "no runs yet for client 'acme'"
    )


# --- runs show text ------------------------------------------------------------------


def test_run_text_lists_every_failure_with_its_reason() -> None:
    record = run("0123456789abcdef", status=RunStatus.PARTIAL, error="3 campaigns failed")
    failures = [*fails(12), CampaignFailure("", "id: field required", "payload")]
    text = capture(render_run, record, failures)
    assert "0123456789abcdef" in text  # the full id here
    assert "13 failed campaigns" in text
    for i in range(12):
        assert f"c-{i}" in text
        assert f"reason number {i}" in text
    assert "(no id)" in text
    assert "seen 100, synced 93, failed 7" in text
    assert "251 (retries 17, 429s 4), pages 10" in text
    assert "3 campaigns failed" in text
    assert "1m05s" in text


def test_run_text_without_failures_says_so() -> None:
    text = capture(render_run, run("r1"), [])
    assert "no failed campaigns" in text


# --- inputs from outside ---------------------------------------------------------------


@given(
    client=st.text(min_size=1, max_size=40),
    reasons=st.lists(st.text(max_size=200), max_size=8),
    ids=st.lists(st.text(max_size=30), min_size=8, max_size=8),
)
def test_any_text_round_trips_through_json_and_renders(
    client: str, reasons: Sequence[str], ids: Sequence[str]
) -> None:
    failures = [
        CampaignFailure(cid, reason, "sync") for cid, reason in zip(ids, reasons, strict=False)
    ]
    record = run("r1", client, status=RunStatus.PARTIAL, error=reasons[0] if reasons else None)
    doc = json.loads(json.dumps(status_document([record], {"r1": failures}, scrub=SCRUB)))
    assert doc["runs"][0]["client_id"] == client
    assert len(doc["runs"][0]["failures"]) == len(failures)
    assert [f["campaign_id"] for f in doc["runs"][0]["failures"]] == [
        f.campaign_id or None for f in failures
    ]
    text = capture(render_status, [record], {"r1": failures}) + capture(
        render_run, record, failures
    )
    # Whatever came in, nothing a terminal obeys goes out; line breaks are our own.
    assert [c for c in text if unicodedata.category(c) == "Cc" and c != "\n"] == []
