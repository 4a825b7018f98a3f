"""Settings, from the environment and ``.env`` only.

Names stay compatible with the first script (``AD_PLATFORM_*``, ``DATABASE_URL``).
Secrets are ``SecretStr`` so that no ``repr``, log line or error message shows them.
"""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import quote

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from adsync.errors import ConfigError
from adsync.validation import describe_problems

DEFAULT_DATABASE_URL = "sqlite:///adsync.db"

# A PostgreSQL schema name that needs no quoting anywhere (unquoted, lower case).
DB_SCHEMA_PATTERN = r"^[a-z_][a-z0-9_]{0,62}$"


def db_schema_problem(database_url: str, schema: str | None) -> str | None:
    """Why ``schema`` cannot apply to ``database_url``, or None."""
    if schema is None:
        return None
    if not database_url.startswith(("postgresql", "postgres:")):
        return "is for PostgreSQL only (SQLite has no schemas): unset it"
    if "options=" in database_url.partition("?")[2]:
        return "cannot be combined with an options parameter in DATABASE_URL: use one of them"
    return None


def with_db_schema(database_url: str, schema: str | None) -> str:
    """``database_url`` with its connections' search_path set to ``schema`` (None: as it is).

    libpq's ``options`` parameter, so every connection, SQLAlchemy's and
    Procrastinate's alike, finds and creates its tables there.
    """
    problem = db_schema_problem(database_url, schema)
    if problem is not None:
        raise ConfigError(f"invalid configuration: ADSYNC_DB_SCHEMA {problem}")
    if schema is None:
        return database_url
    joiner = "&" if "?" in database_url else "?"
    return f"{database_url}{joiner}options={quote(f'-csearch_path={schema}', safe='')}"


def _env(name: str) -> Any:
    return Field(validation_alias=AliasChoices(name, name.lower()))


CLIENT_ID_PATTERN = r"^[A-Za-z0-9._:@-]+$"

# The longest any duration setting may be. Nothing adsync waits for takes longer,
# and a value no one means (1e12 s) would overflow a date or a timer far from
# where it was set instead of being refused by name.
MAX_SECONDS = 86_400


class Settings(BaseSettings):
    """Everything adsync needs to sync one account."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
        # An infinite timeout or window is no setting: it overflows or never ends.
        allow_inf_nan=False,
    )

    api_url: str = Field(default="http://127.0.0.1:3001", validation_alias="AD_PLATFORM_API_URL")
    email: str = Field(validation_alias="AD_PLATFORM_EMAIL", min_length=3)
    password: SecretStr = Field(validation_alias="AD_PLATFORM_PASSWORD", min_length=1)
    # Sent as a header: printable ASCII only, as in the accounts file.
    client_id: str = Field(
        default="default",
        validation_alias="AD_PLATFORM_CLIENT_ID",
        min_length=1,
        max_length=128,
        pattern=CLIENT_ID_PATTERN,
    )
    rate_limit: int = Field(default=10, validation_alias="AD_PLATFORM_RATE_LIMIT", ge=1)
    rate_window: float = Field(
        default=60.0, validation_alias="AD_PLATFORM_RATE_WINDOW", gt=0, le=MAX_SECONDS
    )
    rate_margin: float = Field(
        default=0.01, validation_alias="AD_PLATFORM_RATE_MARGIN", ge=0, le=0.5
    )
    page_size: int = Field(default=10, validation_alias="AD_PLATFORM_PAGE_SIZE", ge=1, le=1000)
    max_pages: int = Field(default=10_000, validation_alias="AD_PLATFORM_MAX_PAGES", ge=1)
    connect_timeout: float = Field(
        default=5.0, validation_alias="AD_PLATFORM_CONNECT_TIMEOUT", gt=0, le=MAX_SECONDS
    )
    request_timeout: float = Field(
        default=15.0, validation_alias="AD_PLATFORM_REQUEST_TIMEOUT", gt=0, le=MAX_SECONDS
    )
    request_deadline: float = Field(
        default=30.0, validation_alias="AD_PLATFORM_REQUEST_DEADLINE", gt=0, le=MAX_SECONDS
    )
    max_attempts: int = Field(default=8, validation_alias="AD_PLATFORM_MAX_ATTEMPTS", ge=1)
    retry_budget_seconds: float = Field(
        default=600.0, validation_alias="AD_PLATFORM_RETRY_BUDGET_SECONDS", gt=0, le=MAX_SECONDS
    )
    backoff_initial: float = Field(
        default=1.0, validation_alias="AD_PLATFORM_BACKOFF_INITIAL", ge=0, le=MAX_SECONDS
    )
    backoff_max: float = Field(
        default=30.0, validation_alias="AD_PLATFORM_BACKOFF_MAX", ge=0, le=MAX_SECONDS
    )
    token_refresh_margin: float = Field(
        default=60.0, validation_alias="AD_PLATFORM_TOKEN_REFRESH_MARGIN", ge=0, le=MAX_SECONDS
    )
    max_concurrency: int = Field(
        default=32, validation_alias="AD_PLATFORM_MAX_CONCURRENCY", ge=1, le=1000
    )
    # Keep the rate budget's sends in the database too, so that every process
    # syncing this client id (and a restarted one) shares one window.
    shared_budget: bool = Field(default=True, validation_alias="AD_PLATFORM_SHARED_BUDGET")
    database_url: SecretStr = Field(
        default=SecretStr(DEFAULT_DATABASE_URL), validation_alias="DATABASE_URL"
    )
    # Where adsync's tables (and the job queue's) live on PostgreSQL; unset, the
    # server's search_path decides (public, normally).
    db_schema: str | None = Field(
        default=None, validation_alias="ADSYNC_DB_SCHEMA", pattern=DB_SCHEMA_PATTERN
    )
    db_retry_attempts: int = Field(
        default=5, validation_alias="ADSYNC_DB_RETRY_ATTEMPTS", ge=1, le=100
    )
    db_retry_wait: float = Field(
        default=0.5, validation_alias="ADSYNC_DB_RETRY_WAIT", ge=0, le=MAX_SECONDS
    )
    # An unfinished run is resumed only if it last ran this recently; an older one
    # is closed as abandoned and a new run starts.
    resume_within_seconds: float = Field(
        default=3600.0, validation_alias="ADSYNC_RESUME_WITHIN_SECONDS", gt=0, le=MAX_SECONDS
    )

    @field_validator("api_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("db_schema")
    @classmethod
    def _db_schema(cls, value: str | None, info: ValidationInfo) -> str | None:
        url = info.data.get("database_url")
        if isinstance(url, SecretStr):
            problem = db_schema_problem(url.get_secret_value(), value)
            if problem is not None:
                raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _db_url_in_schema(self) -> Settings:
        url = self.database_url.get_secret_value()
        self.database_url = SecretStr(with_db_schema(url, self.db_schema))
        return self

    @field_validator("database_url")
    @classmethod
    def _db_url(cls, value: SecretStr) -> SecretStr:
        raw = value.get_secret_value()
        if not raw.startswith(("sqlite:", "postgresql:", "postgresql+", "postgres:")):
            raise ValueError("must be sqlite:///PATH or postgresql://USER@HOST/DB")
        return value

    def concurrency(self) -> int:
        """How many requests may be in flight at once.

        A sliding window lets ``rate_limit`` requests go out together, and each
        request may hold its worker for up to ``request_timeout`` (a hang), so
        that many more keep the window's free slots busy meanwhile; capped.
        """
        held = math.ceil(self.rate_limit * self.request_timeout / self.rate_window)
        return max(1, min(self.max_concurrency, self.rate_limit + held))


# The environment variable behind each field, for error messages.
ENV_NAMES: dict[str, str] = {
    name: str(field.validation_alias)
    for name, field in Settings.model_fields.items()
    if isinstance(field.validation_alias, str)
}


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming each bad setting by its environment variable, never its value."""
    return "invalid configuration: " + describe_problems(exc, whole="settings", env_names=ENV_NAMES)


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment and ``.env``; raise :class:`ConfigError`."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None


def sqlalchemy_url(database_url: str) -> str:
    """Map a user-facing database URL to the driver adsync ships (psycopg 3)."""
    for prefix in ("postgresql://", "postgres://"):
        if database_url.startswith(prefix):
            return "postgresql+psycopg://" + database_url[len(prefix) :]
    return database_url
