"""The metrics endpoint: names present, counts that match the simulator's own stats."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from adsync.config import load_settings
from adsync.metrics import Metrics, MetricsServer
from adsync.runner import sync_account
from adsync.simulator.testing import running_simulator
from adsync.store import SqlStore


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def total(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **match: str) -> float:
    return sum(
        value
        for labels, value in samples.get(name, [])
        if all(labels.get(k) == v for k, v in match.items())
    )


def test_metrics_match_the_simulator(tmp_path: Path) -> None:
    metrics = Metrics()
    server = MetricsServer(metrics, 0)
    store = SqlStore.from_url(f"sqlite:///{tmp_path / 'm.db'}")
    store.upgrade()
    try:
        with running_simulator(
            rate_limit=40,
            rate_window=0.5,
            sync_delay=0.01,
            seed=21,
            token_ttl=0.5,
            fail_sync_ids="campaign_9",
        ) as sim:
            settings = load_settings(
                AD_PLATFORM_API_URL=sim.url,
                AD_PLATFORM_EMAIL="admin@mixoads.com",
                AD_PLATFORM_PASSWORD="SuperSecret123!",
                AD_PLATFORM_CLIENT_ID="metered",
                AD_PLATFORM_RATE_LIMIT=40,
                AD_PLATFORM_RATE_WINDOW=0.5,
                AD_PLATFORM_RATE_MARGIN=0.04,
                AD_PLATFORM_REQUEST_TIMEOUT=0.3,
                AD_PLATFORM_REQUEST_DEADLINE=1,
                AD_PLATFORM_BACKOFF_INITIAL=0.01,
                AD_PLATFORM_BACKOFF_MAX=0.1,
                AD_PLATFORM_MAX_ATTEMPTS=3,
            )
            outcome = asyncio.run(sync_account(settings, store, metrics=metrics))
            stats = sim.stats()
        sim_client = stats["clients"]["metered"]
        samples = scrape(server.port)
    finally:
        server.close()
        store.dispose()

    for name in (
        "adsync_requests_total",
        "adsync_request_seconds_count",
        "adsync_retries_total",
        "adsync_rate_wait_seconds_total",
        "adsync_token_refreshes_total",
        "adsync_campaigns_synced_total",
        "adsync_campaigns_failed_total",
        "adsync_runs_total",
        "adsync_run_duration_seconds",
    ):
        assert name in samples, name
    # One campaign failed: the run is partial, not a success to report.
    assert "adsync_last_success_timestamp_seconds" not in samples
    # Every request the platform counted is one we counted (429s and 401s it does not count).
    counted = (
        total(samples, "adsync_requests_total", client_id="metered")
        - total(samples, "adsync_requests_total", outcome="429")
        - total(samples, "adsync_requests_total", outcome="401")
    )
    assert counted == sim_client["requests"]
    assert total(samples, "adsync_requests_total", outcome="503") == sim_client["errors_503"]
    assert total(samples, "adsync_requests_total", outcome="timeout") == sim_client["hangs"]
    assert total(samples, "adsync_campaigns_synced_total") == 99 == outcome.counters.synced
    assert total(samples, "adsync_campaigns_failed_total") == 1
    assert (
        total(samples, "adsync_token_refreshes_total")
        == stats["accounts"]["admin@mixoads.com"]["tokens_issued"]
    )
    assert total(samples, "adsync_retries_total") == outcome.counters.retries
    assert total(samples, "adsync_runs_total", status="partial") == 1
    # No campaign id, token or password in any label.
    labels = {v for series in samples.values() for lab, _ in series for v in lab.values()}
    assert not any(v.startswith("campaign_") for v in labels)
    assert "SuperSecret123!" not in labels


def test_one_server_answers_health_and_metrics() -> None:
    metrics = Metrics()
    metrics.in_progress.set(2)
    state = {"healthy": True}

    def health() -> tuple[bool, dict[str, object]]:
        return state["healthy"], {"status": "ok" if state["healthy"] else "unhealthy"}

    server = MetricsServer(metrics, 0, health=health)
    base = f"http://127.0.0.1:{server.port}"
    try:
        ok = httpx.get(f"{base}/healthz", timeout=5)
        state["healthy"] = False
        sick = httpx.get(f"{base}/healthz?verbose=1", timeout=5)
        samples = scrape(server.port)
        other = httpx.get(f"{base}/", timeout=5)
    finally:
        server.close()
    assert (ok.status_code, ok.json()) == (200, {"status": "ok"})
    assert ok.headers["content-type"] == "application/json"
    assert (sick.status_code, sick.json()) == (503, {"status": "unhealthy"})
    assert samples["adsync_runs_in_progress"] == [({}, 2.0)]
    assert other.status_code == 404
    assert "/healthz" in other.text
