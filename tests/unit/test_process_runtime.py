"""One runtime per process: the margin, the rate log's batcher and the run writer."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from adsync.config import load_settings
from adsync.errors import ConfigError
from adsync.metrics import Metrics, WorkerMetrics
from adsync.runner import process_rate_margin
from adsync.runtime import ProcessRuntime
from adsync.store import SqlStore
from adsync.store.memory import InMemoryStore
from adsync.worker.policy import JobRetryPolicy
from adsync.worker.runtime import PatientStore, WorkerRuntime
from adsync.worker.settings import load_worker_settings


async def test_the_process_runtime_starts_from_the_configured_margin() -> None:
    runtime = ProcessRuntime(InMemoryStore(), rate_margin=0.04)
    try:
        assert runtime.margin.fraction == 0.04
        # One margin for every account: what one learns, all see.
        runtime.margin.widen()
        assert runtime.margin.fraction > 0.04
    finally:
        await runtime.aclose()


def test_a_process_margin_is_the_widest_its_accounts_ask_for() -> None:
    base = {"AD_PLATFORM_EMAIL": "me@x.io", "AD_PLATFORM_PASSWORD": "pw"}
    narrow = load_settings(**base, AD_PLATFORM_RATE_MARGIN=0.01)
    wide = load_settings(**base, AD_PLATFORM_RATE_MARGIN=0.05)
    assert process_rate_margin([narrow, wide]) == 0.05
    assert process_rate_margin([wide, narrow]) == 0.05
    assert process_rate_margin([]) == 0.01


def test_the_worker_reads_the_margin_from_the_process_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AD_PLATFORM_RATE_MARGIN", "0.07")
    assert load_worker_settings().rate_margin == 0.07
    monkeypatch.setenv("AD_PLATFORM_RATE_MARGIN", "0.9")
    with pytest.raises(ConfigError, match="AD_PLATFORM_RATE_MARGIN"):
        load_worker_settings()


async def test_a_worker_has_its_process_runtime_before_any_job(tmp_path: Path) -> None:
    store = SqlStore.from_url(f"sqlite:///{tmp_path / 'w.db'}")
    metrics = Metrics(CollectorRegistry())
    runtime = WorkerRuntime(
        store=store,
        accounts_file=tmp_path / "accounts.toml",
        policy=JobRetryPolicy(max_attempts=2, initial=1.0, maximum=2.0),
        stalled_after=60.0,
        metrics=metrics,
        worker_metrics=WorkerMetrics(metrics.registry),
        rate_margin=0.06,
        db_patience=5.0,
    )
    try:
        assert runtime.process.margin.fraction == 0.06
        # The runs' writes wait out an outage; the rate log does not.
        assert isinstance(runtime.runs_store, PatientStore)
    finally:
        await runtime.aclose()
        store.dispose()
