"""Prometheus metrics of adsync, and the one HTTP server that serves them.

The metrics live on a registry of their own (never the global one); the server
also answers a worker's ``/healthz``. Labels are bounded: client id, endpoint,
outcome (an HTTP status or a failure kind), run status. Never a campaign id, a
token or anything secret.
"""

from __future__ import annotations

import errno
import json
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from adsync.errors import ConfigError
from adsync.events import RequestEvent, RunTotals

NAMESPACE = "adsync"


class Metrics:
    """Every metric adsync exports."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "requests",
            "Requests sent to the platform, by endpoint and outcome.",
            ["client_id", "endpoint", "outcome"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.request_seconds = Histogram(
            "request_seconds",
            "Time from send to answer (or giving up), by endpoint.",
            ["endpoint"],
            namespace=NAMESPACE,
            registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 30),
        )
        self.retries = Counter(
            "retries", "Retried requests.", ["client_id"], namespace=NAMESPACE, registry=r
        )
        self.rate_limited = Counter(
            "rate_limited",
            "Requests the platform refused with 429.",
            ["client_id"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.rate_wait_seconds = Counter(
            "rate_wait_seconds",
            "Time requests waited on the client-side rate budget.",
            ["client_id"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.token_refreshes = Counter(
            "token_refreshes",
            "Bearer tokens obtained.",
            ["client_id"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.campaigns_synced = Counter(
            "campaigns_synced",
            "Campaigns synced and written.",
            ["client_id"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.campaigns_failed = Counter(
            "campaigns_failed",
            "Campaigns recorded as failed.",
            ["client_id"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.runs = Counter(
            "runs",
            "Finished runs, by status.",
            ["client_id", "status"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.run_seconds = Gauge(
            "run_duration_seconds",
            "Duration of the last finished run.",
            ["client_id"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.last_success = Gauge(
            "last_success_timestamp_seconds",
            "Unix time of the last run that synced every campaign.",
            ["client_id"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.in_progress = Gauge(
            "runs_in_progress",
            "Runs this process is carrying out now.",
            namespace=NAMESPACE,
            registry=r,
        )

    def run_observer(self, client_id: str) -> RunMetrics:
        """The observer of one run of ``client_id``."""
        return RunMetrics(self, client_id)

    def observe_request(self, client_id: str, event: RequestEvent) -> None:
        """One attempt, as the client reports it."""
        self.requests.labels(client_id, event.endpoint, event.outcome).inc()
        self.request_seconds.labels(event.endpoint).observe(event.seconds)
        if event.outcome == "429":
            self.rate_limited.labels(client_id).inc()


class WorkerMetrics:
    """Metrics of the worker itself, on the same registry as the sync metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.jobs = Counter(
            "worker_sync_jobs",
            "Sync jobs ended, by what the worker decided (done, retry, continue, give_up).",
            ["decision"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.recovered = Counter(
            "worker_stalled_jobs",
            "Jobs of dead workers put back in the queue (retried) or closed for a waiting one.",
            ["action"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.loop_time = Gauge(
            "worker_loop_timestamp_seconds",
            "Unix time the worker's event loop last ticked.",
            namespace=NAMESPACE,
            registry=registry,
        )
        self.database_up = Gauge(
            "worker_database_up",
            "1 when the worker's last database check succeeded, else 0.",
            namespace=NAMESPACE,
            registry=registry,
        )
        self.unservable = Gauge(
            "worker_unservable_accounts",
            "Enabled accounts this worker cannot serve (a secret it cannot read).",
            namespace=NAMESPACE,
            registry=registry,
        )


class RunMetrics:
    """The metrics of one account's run: a :class:`~adsync.events.RunObserver`.

    Turns the run's growing totals into counter increments (counters only ever go up).
    """

    def __init__(self, metrics: Metrics, client_id: str) -> None:
        self._metrics = metrics
        self._client_id = client_id
        self._seen = RunTotals()

    def run_started(self) -> None:
        """One more run in progress."""
        self._metrics.in_progress.inc()

    def run_progressed(self, totals: RunTotals) -> None:
        """Add what grew since the last call."""
        m, client_id, seen = self._metrics, self._client_id, self._seen
        m.retries.labels(client_id).inc(max(0, totals.retries - seen.retries))
        m.token_refreshes.labels(client_id).inc(max(0, totals.refreshes - seen.refreshes))
        m.rate_wait_seconds.labels(client_id).inc(
            max(0.0, totals.waited_seconds - seen.waited_seconds)
        )
        m.campaigns_synced.labels(client_id).inc(max(0, totals.synced - seen.synced))
        m.campaigns_failed.labels(client_id).inc(max(0, totals.failed - seen.failed))
        self._seen = totals

    def run_finished(self, status: str, seconds: float, finished_at: float) -> None:
        """The run's end: its status, duration and (on success) when."""
        m = self._metrics
        m.in_progress.dec()
        m.runs.labels(self._client_id, status).inc()
        m.run_seconds.labels(self._client_id).set(seconds)
        if status == "succeeded":
            m.last_success.labels(self._client_id).set(finished_at)


def check_port(port: int, option: str) -> None:
    """Refuse a port number no socket can have, naming the option it came from."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"{option} {port} is not a port number: use 1-65535")


def listen_error(exc: OSError, port: int, addr: str, options: tuple[str, str]) -> ConfigError:
    """Why a listener could not bind, as one line naming the option to change.

    ``options`` names the port and the address options, e.g. ``("--metrics-port",
    "--metrics-addr")``.
    """
    port_option, addr_option = options
    if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
        return ConfigError(
            f"{addr_option} {addr!r} is not an address of this machine: "
            f"{exc.strerror or type(exc).__name__}"
        )
    if exc.errno == errno.EADDRINUSE:
        return ConfigError(
            f"{port_option} {port}: {addr}:{port} is already in use (by another adsync?): "
            "choose another port"
        )
    return ConfigError(
        f"{port_option} {port}: cannot listen on {addr}:{port}: "
        f"{exc.strerror or type(exc).__name__}"
    )


# A health check: (healthy, the JSON body that says why).
HealthCheck = Callable[[], tuple[bool, Mapping[str, Any]]]


class MetricsServer:
    """``/metrics`` over HTTP in a background thread, stopped on close.

    Given a ``health`` check (a worker's), the same server answers ``/healthz`` too,
    with its JSON body: 200 when healthy, 503 when not. Only those two paths are
    served then; without it, every path serves the metrics.
    """

    def __init__(
        self,
        metrics: Metrics,
        port: int,
        addr: str = "127.0.0.1",
        *,
        options: tuple[str, str] = ("--metrics-port", "--metrics-addr"),
        health: HealthCheck | None = None,
    ) -> None:
        check_port(port, options[0])
        app = make_wsgi_app(metrics.registry)
        if health is not None:
            app = _with_health(app, health)
        try:
            self._server = _listen(addr, port, app)
        except OSError as exc:
            raise listen_error(exc, port, addr, options) from exc
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="adsync-metrics", daemon=True
        )
        self._thread.start()
        self.port: int = self._server.server_port

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        # Scrapes and probes every few seconds would drown adsync's own log lines.
        return


def _listen(addr: str, port: int, app: WSGIApplication) -> WSGIServer:
    # The address family is the address's own (``::1`` needs IPv6), as in
    # prometheus_client's start_http_server.
    family, _, _, _, sockaddr = socket.getaddrinfo(addr, port)[0]

    class Server(_ThreadingServer):
        address_family = family

    return make_server(str(sockaddr[0]), port, app, Server, handler_class=_QuietHandler)


def _with_health(metrics_app: WSGIApplication, health: HealthCheck) -> WSGIApplication:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics_app(environ, start_response)
        if path == "/healthz":
            ok, body = health()
            status = "200 OK" if ok else "503 Service Unavailable"
            return _reply(start_response, status, "application/json", json.dumps(body).encode())
        return _reply(
            start_response,
            "404 Not Found",
            "text/plain; charset=utf-8",
            b"not found: try /healthz or /metrics\n",
        )

    return app


def _reply(
    start_response: StartResponse, status: str, content_type: str, payload: bytes
) -> list[bytes]:
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(payload)))])
    return [payload]
