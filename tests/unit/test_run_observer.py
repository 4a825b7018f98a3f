"""The run observer of the metrics: growing totals become counter increments."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from adsync.events import RequestEvent, RunTotals
from adsync.metrics import Metrics


def value(metrics: Metrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(f"adsync_{name}", labels)
    return 0.0 if found is None else found


def test_a_runs_totals_are_added_once_and_its_end_recorded() -> None:
    metrics = Metrics(CollectorRegistry())
    run = metrics.run_observer("acme")
    run.run_started()
    assert value(metrics, "runs_in_progress") == 1

    run.run_progressed(RunTotals(retries=2, refreshes=1, waited_seconds=0.5, synced=3))
    run.run_progressed(RunTotals(retries=3, refreshes=1, waited_seconds=1.5, synced=7, failed=1))

    assert value(metrics, "retries_total", client_id="acme") == 3
    assert value(metrics, "token_refreshes_total", client_id="acme") == 1
    assert value(metrics, "rate_wait_seconds_total", client_id="acme") == 1.5
    assert value(metrics, "campaigns_synced_total", client_id="acme") == 7
    assert value(metrics, "campaigns_failed_total", client_id="acme") == 1

    run.run_finished("partial", 12.5, 1_700_000_000.0)
    assert value(metrics, "runs_in_progress") == 0
    assert value(metrics, "runs_total", client_id="acme", status="partial") == 1
    assert value(metrics, "run_duration_seconds", client_id="acme") == 12.5
    # Only a run that synced everything is a success.
    assert value(metrics, "last_success_timestamp_seconds", client_id="acme") == 0

    again = metrics.run_observer("acme")
    again.run_started()
    again.run_progressed(RunTotals(synced=2))
    again.run_finished("succeeded", 3.0, 1_700_000_100.0)
    assert value(metrics, "campaigns_synced_total", client_id="acme") == 9
    assert value(metrics, "last_success_timestamp_seconds", client_id="acme") == 1_700_000_100.0


def test_a_request_event_is_counted_by_endpoint_and_outcome() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.observe_request("acme", RequestEvent("sync", "429", 0.1))
    metrics.observe_request("acme", RequestEvent("list", "200", 0.2))
    assert value(metrics, "requests_total", client_id="acme", endpoint="sync", outcome="429") == 1
    assert value(metrics, "rate_limited_total", client_id="acme") == 1
    assert value(metrics, "request_seconds_count", endpoint="list") == 1
