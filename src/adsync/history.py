"""Run history as people and machines read it (``adsync status``, ``adsync runs show``).

Pure rendering: run records and their failures in, rich output on the given console
or JSON-ready dicts out. Reading the store and choosing where to print is the CLI's job.

Error texts and failure reasons are scrubbed on the way out, in text and JSON alike,
by the ``scrub`` function the caller passes (the CLI passes its redactor's): they
come from exceptions, and a DSN password or a token must never reach a terminal or
a monitoring pipeline through them. Which secrets there are is the caller's
knowledge, not this module's. In text, whatever came from outside (ids, reasons,
errors) is shown with its control characters escaped: a terminal would obey them.
JSON keeps it as it came; its encoder escapes what needs it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from adsync.models import CampaignFailure, RunRecord, RunStatus
from adsync.printable import visible

__all__ = [
    "FAILURES_IN_STATUS",
    "SHORT_ID",
    "Scrub",
    "format_duration",
    "format_time",
    "order_runs",
    "render_run",
    "render_status",
    "run_document",
    "run_to_dict",
    "status_document",
]

SHORT_ID: Final = 12
FAILURES_IN_STATUS: Final = 5

# RunRecord fields in the JSON, in this order. ``resumed`` is left out on purpose: it
# only says whether *this process's* claim_run took the run over, is always False when
# read back, and would contradict ``resumes`` for a consumer.
_RECORD_FIELDS: Final = (
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
)

_STATUS_STYLE: Final = {
    RunStatus.SUCCEEDED: "green",
    RunStatus.PARTIAL: "yellow",
    RunStatus.FAILED: "bold red",
    RunStatus.INTERRUPTED: "magenta",
    RunStatus.RUNNING: "cyan",
    RunStatus.ABANDONED: "dim",
}

Failures = Mapping[str, Sequence[CampaignFailure]]
# Takes the secrets out of a stored text (an error, a reason) before it is shown.
Scrub = Callable[[str], str]


# --- small formatters ------------------------------------------------------------------


def _utc(value: datetime) -> datetime:
    # The store hands out aware UTC; naive values (hand-made records) are UTC by contract.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def format_time(value: datetime | None) -> str:
    """UTC ISO-8601 to the second, ``Z``-suffixed; ``-`` for no time."""
    if value is None:
        return "-"
    return _utc(value).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def format_duration(seconds: float | None) -> str:
    """``4.2s``, ``1m05s``, ``2h03m10s``; ``-`` for an unfinished run."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{max(0.0, seconds):.1f}s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _seconds(run: RunRecord) -> float | None:
    duration = run.duration
    return None if duration is None else duration.total_seconds()


def _status_label(run: RunRecord, now: datetime | None) -> str:
    # A "running" run whose lease has lapsed belongs to a dead process: say so, since
    # that is exactly what the person on call is looking for.
    if run.status is RunStatus.RUNNING and now is not None and _utc(run.lease_until) < _utc(now):
        return "running (lease expired)"
    return run.status.value


def _campaign(failure: CampaignFailure) -> str:
    return visible(failure.campaign_id) if failure.campaign_id else "(no id)"


def _said(text: str, scrub: Scrub) -> str:
    """A stored text (an error, a reason) as a terminal may show it."""
    return visible(scrub(text))


# --- ordering and JSON -------------------------------------------------------------------


def order_runs(runs: Sequence[RunRecord]) -> list[RunRecord]:
    """Runs grouped by client (latest-active client first), newest first within each."""
    ordered = sorted(runs, key=lambda r: (_utc(r.started_at), r.id), reverse=True)
    rank: dict[str, int] = {}
    for run in ordered:
        rank.setdefault(run.client_id, len(rank))
    # sorted() is stable, so newest-first survives inside each client's group.
    return sorted(ordered, key=lambda r: rank[r.client_id])


def run_to_dict(
    run: RunRecord, failures: Sequence[CampaignFailure], *, scrub: Scrub
) -> dict[str, Any]:
    """One run as JSON-ready data: the record's fields, ``duration_seconds``, ``failures``."""
    doc: dict[str, Any] = {}
    for name in _RECORD_FIELDS:
        value = getattr(run, name)
        if isinstance(value, datetime):
            value = _utc(value).isoformat()
        elif isinstance(value, RunStatus):
            value = value.value
        doc[name] = value
    if run.error is not None:
        doc["error"] = scrub(run.error)
    doc["duration_seconds"] = _seconds(run)
    doc["failures"] = [
        {
            # The store keeps "no usable id" as an empty string; JSON says null.
            "campaign_id": f.campaign_id or None,
            "kind": f.kind,
            "reason": scrub(f.reason),
        }
        for f in failures
    ]
    return doc


def status_document(
    runs: Sequence[RunRecord], failures: Failures, *, scrub: Scrub
) -> dict[str, Any]:
    """``{"runs": [...]}`` for ``adsync status --json``, in :func:`order_runs` order."""
    return {"runs": [run_to_dict(r, failures.get(r.id, ()), scrub=scrub) for r in order_runs(runs)]}


def run_document(
    run: RunRecord, failures: Sequence[CampaignFailure], *, scrub: Scrub
) -> dict[str, Any]:
    """``{"run": {...}}`` for ``adsync runs show --json``."""
    return {"run": run_to_dict(run, failures, scrub=scrub)}


# --- text ----------------------------------------------------------------------------------


def render_status(
    console: Console,
    runs: Sequence[RunRecord],
    failures: Failures,
    *,
    scrub: Scrub,
    now: datetime | None = None,
    client_id: str | None = None,
    max_failures: int = FAILURES_IN_STATUS,
) -> None:
    """Print the runs table, then each run's error and first failures.

    ``now`` marks running runs with a lapsed lease; ``client_id`` only words the
    empty case.
    """
    if not runs:
        console.print("no runs yet" + (f" for client {client_id!r}" if client_id else ""))
        return
    ordered = order_runs(runs)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    table.add_column("run", no_wrap=True)
    table.add_column("client")
    table.add_column("status")
    table.add_column("started (UTC)", no_wrap=True)
    for name in (
        "duration",
        "seen",
        "synced",
        "failed",
        "requests",
        "retries",
        "429s",
        "resumes",
    ):
        table.add_column(name, justify="right", no_wrap=True)
    for i, run in enumerate(ordered):
        last_of_client = i + 1 == len(ordered) or ordered[i + 1].client_id != run.client_id
        table.add_row(
            run.id[:SHORT_ID],
            Text(visible(run.client_id)),
            Text(_status_label(run, now), style=_STATUS_STYLE[run.status]),
            format_time(run.started_at),
            format_duration(_seconds(run)),
            str(run.seen),
            str(run.synced),
            str(run.failed),
            str(run.requests),
            str(run.retries),
            str(run.rate_limited),
            str(run.resumes),
            end_section=last_of_client,
        )
    console.print(table)

    for run in ordered:
        listed = failures.get(run.id, ())
        if not listed and not run.error:
            continue
        console.print()
        head = Text(f"run {run.id[:SHORT_ID]} ", style="bold")
        head.append(Text(visible(run.client_id)))
        head.append(" ")
        head.append(run.status.value, style=_STATUS_STYLE[run.status])
        if listed:
            head.append(f": {len(listed)} failed campaign{'s' if len(listed) != 1 else ''}")
        console.print(head)
        # soft_wrap: one line per failure however long, so the output greps well.
        if run.error:
            console.print(Text(f"  error: {_said(run.error, scrub)}"), soft_wrap=True)
        for failure in listed[:max_failures]:
            reason = _said(failure.reason, scrub)
            line = f"  failed {_campaign(failure)} [{failure.kind}]: {reason}"
            console.print(Text(line), soft_wrap=True)
        if len(listed) > max_failures:
            console.print(
                Text(f"  ... {len(listed) - max_failures} more: adsync runs show {run.id}"),
                soft_wrap=True,
            )


def render_run(
    console: Console,
    run: RunRecord,
    failures: Sequence[CampaignFailure],
    *,
    scrub: Scrub,
    now: datetime | None = None,
) -> None:
    """Print one run's details and every failed campaign with its reason."""
    details = Table.grid(padding=(0, 2))
    details.add_column(style="bold", no_wrap=True)
    details.add_column()
    rows: list[tuple[str, Text | str]] = [
        ("run", run.id),
        ("client", Text(visible(run.client_id))),
        ("status", Text(_status_label(run, now), style=_STATUS_STYLE[run.status])),
        ("started", format_time(run.started_at)),
        ("finished", format_time(run.finished_at)),
        ("duration", format_duration(_seconds(run))),
        ("heartbeat", format_time(run.heartbeat_at)),
        ("lease until", format_time(run.lease_until)),
        ("owner", Text(visible(run.owner))),
        ("resumes", str(run.resumes)),
        ("campaigns", f"seen {run.seen}, synced {run.synced}, failed {run.failed}"),
        (
            "requests",
            f"{run.requests} (retries {run.retries}, 429s {run.rate_limited}), pages {run.pages}",
        ),
        ("listing", "complete" if run.listing_complete else "incomplete"),
        ("resumable", "yes" if run.resumable else "no"),
    ]
    if run.error:
        rows.append(("error", Text(_said(run.error, scrub))))
    for key, value in rows:
        details.add_row(key, value)
    console.print(details)
    console.print()

    if not failures:
        console.print("no failed campaigns")
        return
    table = Table(
        title=f"{len(failures)} failed campaign{'s' if len(failures) != 1 else ''}",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        show_edge=False,
    )
    table.add_column("campaign id")
    table.add_column("kind", no_wrap=True)
    table.add_column("reason", overflow="fold")
    for failure in failures:
        table.add_row(
            Text(_campaign(failure)), Text(failure.kind), Text(_said(failure.reason, scrub))
        )
    console.print(table)
