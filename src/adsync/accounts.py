"""The accounts file: which client accounts to sync, each with its own credentials.

TOML, one ``[[accounts]]`` table per account. A password is never written in
the file: each account names an environment variable (``password_env``) or a
file (``password_file``, e.g. a mounted secret) that holds it::

    [[accounts]]
    client_id = "acme"
    email = "ads@acme.example"
    password_env = "ACME_PLATFORM_PASSWORD"
    rate_limit = 10          # optional, else AD_PLATFORM_RATE_LIMIT

Everything not given per account comes from the usual settings (environment
and ``.env``).
"""

from __future__ import annotations

import logging
import os
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from adsync.config import CLIENT_ID_PATTERN, MAX_SECONDS, Settings, load_settings
from adsync.errors import ConfigError
from adsync.validation import describe_problems

# stdlib logging, not structlog: accounts are read before logging is set up, and
# stdlib's last-resort handler still prints a warning to stderr then.
log = logging.getLogger(__name__)


class AccountEntry(BaseModel):
    """One ``[[accounts]]`` table, as written."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    client_id: str = Field(min_length=1, max_length=128, pattern=CLIENT_ID_PATTERN)
    email: str = Field(min_length=3)
    password_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    password_file: Path | None = None
    api_url: str | None = None
    # Strict: TOML has real numbers and booleans, so `rate_limit = true` or
    # `rate_window = "60"` is a mistake to point out, not a value to convert.
    rate_limit: int | None = Field(default=None, ge=1, strict=True)
    rate_window: float | None = Field(default=None, gt=0, le=MAX_SECONDS, strict=True)
    enabled: bool = Field(default=True, strict=True)

    @model_validator(mode="after")
    def _one_password_source(self) -> AccountEntry:
        if (self.password_env is None) == (self.password_file is None):
            raise ValueError("give exactly one of password_env or password_file")
        return self


@dataclass(frozen=True, slots=True)
class Account:
    """An account as configured, without its secret."""

    client_id: str
    email: str
    password_source: str  # "env:NAME" or "file:PATH": where, never what
    rate_limit: int | None
    rate_window: float | None
    api_url: str | None
    enabled: bool
    entry: AccountEntry

    def settings(self, **base: Any) -> Settings:
        """The full settings of this account: its own values over the usual settings.

        Reads the password now, from its environment variable or file.
        """
        overrides: dict[str, Any] = dict(base)
        overrides.update(
            AD_PLATFORM_CLIENT_ID=self.client_id,
            AD_PLATFORM_EMAIL=self.email,
            AD_PLATFORM_PASSWORD=self._password(),
        )
        if self.api_url is not None:
            overrides["AD_PLATFORM_API_URL"] = self.api_url
        if self.rate_limit is not None:
            overrides["AD_PLATFORM_RATE_LIMIT"] = self.rate_limit
        if self.rate_window is not None:
            overrides["AD_PLATFORM_RATE_WINDOW"] = self.rate_window
        try:
            return load_settings(**overrides)
        except ConfigError as exc:
            raise ConfigError(f"account {self.client_id!r}: {exc}") from None

    def password_problem(self) -> str | None:
        """Why this account's password cannot be read here (unset, missing, unsafe), or None."""
        try:
            self._password()
        except ConfigError as exc:
            return str(exc)
        return None

    def _password(self) -> str:
        entry = self.entry
        if entry.password_env is not None:
            value = os.environ.get(entry.password_env)
            if not value:
                raise ConfigError(
                    f"account {self.client_id!r}: environment variable "
                    f"{entry.password_env} (its password_env) is not set"
                )
            return value
        assert entry.password_file is not None  # noqa: S101 - guaranteed by the validator
        path = entry.password_file
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
            exposure = password_file_exposure(mode)
            if exposure == "refused":
                raise ConfigError(
                    f"account {self.client_id!r}: its password_file {path} is writable by "
                    f"anyone (mode {mode:04o}): chmod 600 it"
                )
            if exposure == "warn":
                log.warning(
                    "account %r: its password_file %s is open to its group or others "
                    "(mode %04o): chmod 600 it",
                    self.client_id,
                    path,
                    mode,
                )
            value = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"account {self.client_id!r}: cannot read its password_file "
                f"{path}: {exc.strerror or type(exc).__name__}"
            ) from None
        if not value:
            raise ConfigError(
                f"account {self.client_id!r}: its password_file {entry.password_file} is empty"
            )
        return value


def password_file_exposure(mode: int) -> Literal["private", "warn", "refused"]:
    """What a password file's permission bits call for, as ssh judges private keys.

    Anyone may rewrite a world-writable file (and so choose the password sent):
    refused. One its group or others can read (or its group write) still works,
    with a warning: mounted secrets are often 0644.
    """
    if mode & stat.S_IWOTH:
        return "refused"
    if mode & (stat.S_IRGRP | stat.S_IWGRP | stat.S_IROTH):
        return "warn"
    return "private"


def parse_accounts(
    data: dict[str, Any], source: str = "accounts file", base: Path | None = None
) -> list[Account]:
    """Validate the parsed TOML; every problem names the entry it is in.

    A relative ``password_file`` is taken relative to ``base`` (the accounts
    file's folder), never to whatever the working directory happens to be.
    """
    unknown = set(data) - {"accounts"}
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s): {', '.join(sorted(unknown))}")
    raw = data.get("accounts")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{source}: no [[accounts]] entries")
    accounts: list[Account] = []
    seen: set[str] = set()
    for index, item in enumerate(raw, start=1):
        label = f"{source}: account #{index}"
        if isinstance(item, dict) and isinstance(item.get("client_id"), str):
            label += f" ({item['client_id']!r})"
        try:
            entry = AccountEntry.model_validate(item)
        except ValidationError as exc:
            raise ConfigError(f"{label}: {describe_problems(exc, whole='entry')}") from None
        if entry.client_id in seen:
            raise ConfigError(f"{label}: client_id {entry.client_id!r} appears twice")
        seen.add(entry.client_id)
        if entry.password_file is not None and base is not None:
            entry = entry.model_copy(update={"password_file": base / entry.password_file})
        source_text = (
            f"env:{entry.password_env}"
            if entry.password_env is not None
            else f"file:{entry.password_file}"
        )
        accounts.append(
            Account(
                client_id=entry.client_id,
                email=entry.email,
                password_source=source_text,
                rate_limit=entry.rate_limit,
                rate_window=entry.rate_window,
                api_url=entry.api_url,
                enabled=entry.enabled,
                entry=entry,
            )
        )
    return accounts


def load_accounts(path: Path) -> list[Account]:
    """Read and validate the accounts file at ``path``."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"accounts file {path} not found: create it or set ADSYNC_ACCOUNTS_FILE"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read accounts file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"accounts file {path} is not valid TOML: {exc}") from None
    return parse_accounts(data, str(path), base=path.absolute().parent)


def select(accounts: list[Account], client_ids: list[str]) -> list[Account]:
    """The accounts named by ``client_ids`` (all enabled ones when empty)."""
    if not client_ids:
        return [a for a in accounts if a.enabled]
    by_id = {a.client_id: a for a in accounts}
    missing = [c for c in client_ids if c not in by_id]
    if missing:
        raise ConfigError(
            f"no account with client_id {', '.join(map(repr, missing))} in the accounts file"
        )
    return [by_id[c] for c in dict.fromkeys(client_ids)]
