"""The worker's settings, from the environment and ``.env``, and the job queue's URL."""

from __future__ import annotations

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from adsync.config import MAX_SECONDS
from adsync.errors import ConfigError
from adsync.validation import describe_problems
from adsync.worker.policy import JobRetryPolicy
from adsync.worker.schedule import recovery_cron, schedule_cron

__all__ = ["WorkerSettings", "load_worker_settings", "queue_conninfo"]


class WorkerSettings(BaseSettings):
    """The worker's knobs, from the environment and ``.env``."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    schedule_minutes: int = Field(default=60, validation_alias="ADSYNC_SCHEDULE_MINUTES", ge=0)
    heartbeat_seconds: float = Field(
        default=10.0, validation_alias="ADSYNC_WORKER_HEARTBEAT_SECONDS", gt=0, le=MAX_SECONDS
    )
    stalled_after_seconds: float = Field(
        default=60.0, validation_alias="ADSYNC_STALLED_AFTER_SECONDS", gt=0, le=MAX_SECONDS
    )
    recovery_every_seconds: int = Field(
        default=60, validation_alias="ADSYNC_RECOVERY_EVERY_SECONDS", ge=1
    )
    poll_seconds: float = Field(
        default=5.0, validation_alias="ADSYNC_WORKER_POLL_SECONDS", gt=0, le=MAX_SECONDS
    )
    grace_seconds: float = Field(
        default=60.0, validation_alias="ADSYNC_WORKER_GRACE_SECONDS", ge=0, le=MAX_SECONDS
    )
    retry_attempts: int = Field(default=6, validation_alias="ADSYNC_RETRY_ATTEMPTS", ge=1)
    retry_initial_seconds: float = Field(
        default=30.0, validation_alias="ADSYNC_RETRY_INITIAL_SECONDS", ge=0, le=MAX_SECONDS
    )
    retry_max_seconds: float = Field(
        default=900.0, validation_alias="ADSYNC_RETRY_MAX_SECONDS", ge=0, le=MAX_SECONDS
    )
    # How long a sync's writes wait for a database that does not answer before its
    # attempt fails (it is then resumed): campaigns synced meanwhile are not lost.
    db_patience_seconds: float = Field(
        default=300.0, validation_alias="ADSYNC_WORKER_DB_PATIENCE_SECONDS", ge=0, le=MAX_SECONDS
    )
    # The jitter margin the worker's rate budgets start from, as for `adsync sync`:
    # one for the process, whichever account runs first.
    rate_margin: float = Field(
        default=0.01, validation_alias="AD_PLATFORM_RATE_MARGIN", ge=0, le=0.5
    )
    # Finished jobs (and their events) older than this are deleted, hourly.
    job_retention_hours: int = Field(
        default=72, validation_alias="ADSYNC_JOB_RETENTION_HOURS", ge=1, le=87_600
    )

    @model_validator(mode="after")
    def _coherent(self) -> WorkerSettings:
        # A live worker whose heartbeat is merely late must never look dead: its
        # jobs would be handed to another worker while still running.
        if self.stalled_after_seconds < 3 * self.heartbeat_seconds:
            raise ValueError(
                "ADSYNC_STALLED_AFTER_SECONDS must be at least 3 x ADSYNC_WORKER_HEARTBEAT_SECONDS"
            )
        return self

    def retry_policy(self) -> JobRetryPolicy:
        """The backoff of failed sync attempts."""
        return JobRetryPolicy(
            max_attempts=self.retry_attempts,
            initial=self.retry_initial_seconds,
            maximum=self.retry_max_seconds,
        )


def load_worker_settings() -> WorkerSettings:
    """Read the worker settings; :class:`ConfigError` names each bad variable."""
    try:
        settings = WorkerSettings()
    except ValidationError as exc:
        problems = describe_problems(exc, whole="worker settings")
        raise ConfigError(f"invalid worker settings: {problems}") from None
    schedule_cron(settings.schedule_minutes)
    recovery_cron(settings.recovery_every_seconds)
    return settings


def queue_conninfo(database_url: str) -> str:
    """The libpq URL for Procrastinate; SQLite gets a :class:`ConfigError` saying why."""
    if database_url.startswith("sqlite"):
        raise ConfigError(
            "adsync worker, enqueue, jobs and schedule --once need PostgreSQL "
            "(Procrastinate's job queue does not run on SQLite): set "
            "DATABASE_URL=postgresql://USER@HOST/DB"
        )
    scheme, sep, rest = database_url.partition("://")
    if not sep or not scheme.startswith(("postgresql", "postgres")):
        raise ConfigError("DATABASE_URL must be postgresql://USER@HOST/DB for the job queue")
    # libpq knows postgresql:// and postgres://, not SQLAlchemy's +driver suffix.
    return f"{scheme.partition('+')[0]}://{rest}"
