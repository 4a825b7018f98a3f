"""Every knob of the simulator, and the accounts it serves.

Defaults equal the production platform of ``docs/platform-api.md``; tests make it
faster (small windows, short delays) or more hostile (extra fault kinds).
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, cast, get_args

RetryAfterHeader = Literal["none", "seconds", "http-date"]
RETRY_AFTER_MODES: tuple[str, ...] = get_args(RetryAfterHeader)

DEFAULT_EMAIL = "admin@mixoads.com"
# The simulator's documented demo credentials, not a secret of anything real.
DEFAULT_PASSWORD = "SuperSecret123!"  # noqa: S105

_DEFAULT_CAMPAIGNS = 100
_ACCOUNT_KEYS = frozenset({"email", "password", "campaigns", "error_rate", "always_503"})


class SimulatorConfigError(ValueError):
    """A knob or the accounts file is invalid; the message says which and how to fix it."""


@dataclass(frozen=True, slots=True)
class AccountSpec:
    """One platform account: its credentials, campaign count and fault overrides."""

    email: str
    password: str = field(repr=False)
    campaigns: int = _DEFAULT_CAMPAIGNS
    # None: the global error_rate applies to this account's list requests.
    error_rate: float | None = None
    always_503: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.email, str) or not self.email:
            raise SimulatorConfigError("account email must be a non-empty string")
        if not isinstance(self.password, str):
            raise SimulatorConfigError(f"account {self.email}: password must be a string")
        _check_int("campaigns", self.campaigns, minimum=0, where=f"account {self.email}: ")
        if self.error_rate is not None:
            _check_rate("error_rate", self.error_rate, where=f"account {self.email}: ")
        if not isinstance(self.always_503, bool):
            raise SimulatorConfigError(f"account {self.email}: always_503 must be true or false")


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """All simulator knobs; each is also a flag of ``adsync simulate`` and an env var."""

    host: str = "127.0.0.1"
    port: int = 3001
    rate_limit: int = 10
    rate_window: float = 60.0
    error_rate: float = 0.2
    hang_rate: float = 0.1
    sync_delay: float = 2.0
    token_ttl: float = 3600.0
    campaigns: int = _DEFAULT_CAMPAIGNS
    # None: a random seed is drawn at start-up (and logged, so a run can be replayed).
    seed: int | None = None
    retry_after_header: RetryAfterHeader = "none"
    # Empty: the single default account with ``campaigns`` campaigns.
    accounts: tuple[AccountSpec, ...] = ()
    sync_error_rate: float = 0.0
    reset_rate: float = 0.0
    bad_json_rate: float = 0.0
    invalidate_old_tokens: bool = False
    fail_sync_ids: frozenset[str] = frozenset()
    malformed_ids: frozenset[str] = frozenset()
    max_page_size: int = 100

    def __post_init__(self) -> None:
        _check_int("port", self.port, minimum=0)
        _check_int("rate_limit", self.rate_limit, minimum=1)
        _check_int("campaigns", self.campaigns, minimum=0)
        _check_int("max_page_size", self.max_page_size, minimum=1)
        # Stamps are whole milliseconds, so a shorter window could not hold one request.
        _check_number("rate_window", self.rate_window, minimum=0.001)
        _check_number("sync_delay", self.sync_delay, minimum=0.0)
        _check_number("token_ttl", self.token_ttl, minimum=0.001)
        for name in ("error_rate", "hang_rate", "sync_error_rate", "reset_rate", "bad_json_rate"):
            _check_rate(name, getattr(self, name))
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0)
        if self.retry_after_header not in RETRY_AFTER_MODES:
            raise SimulatorConfigError(
                f"retry_after_header must be one of {', '.join(RETRY_AFTER_MODES)} "
                f"(got {self.retry_after_header!r})"
            )
        emails = [account.email for account in self.accounts]
        duplicates = sorted({email for email in emails if emails.count(email) > 1})
        if duplicates:
            raise SimulatorConfigError(f"accounts: duplicate email(s) {', '.join(duplicates)}")

    @property
    def effective_accounts(self) -> tuple[AccountSpec, ...]:
        """The accounts served: the configured ones, or the default demo account."""
        if self.accounts:
            return self.accounts
        return (AccountSpec(DEFAULT_EMAIL, DEFAULT_PASSWORD, self.campaigns),)


def build_config(**knobs: Any) -> SimulatorConfig:
    """Build a config from loosely typed knobs, as tests and the CLI give them.

    ``accounts`` may be a path to a TOML/JSON file or a sequence of
    :class:`AccountSpec` / mappings; ``fail_sync_ids`` and ``malformed_ids`` may be
    a comma-separated string or any iterable of ids.
    """
    known = {f.name for f in fields(SimulatorConfig)}
    unknown = sorted(set(knobs) - known)
    if unknown:
        raise SimulatorConfigError(f"unknown simulator knob(s): {', '.join(unknown)}")
    values = dict(knobs)
    campaigns = values.get("campaigns", _DEFAULT_CAMPAIGNS)
    accounts = values.get("accounts")
    if isinstance(accounts, str | Path):
        values["accounts"] = load_accounts(Path(accounts), default_campaigns=campaigns)
    elif accounts is None:
        values.pop("accounts", None)
    else:
        values["accounts"] = tuple(
            _account_from(item, campaigns, f"accounts[{index}]")
            for index, item in enumerate(cast(Iterable[Any], accounts))
        )
    for name in ("fail_sync_ids", "malformed_ids"):
        if name in values:
            values[name] = parse_ids(values[name])
    try:
        return SimulatorConfig(**values)
    except TypeError as exc:  # a wrongly typed value that the checks above let through
        raise SimulatorConfigError(str(exc)) from exc


def parse_ids(value: str | Iterable[str] | None) -> frozenset[str]:
    """Campaign ids from ``"campaign_1,campaign_2"`` or an iterable; blanks dropped."""
    if value is None:
        return frozenset()
    items = value.split(",") if isinstance(value, str) else value
    return frozenset(item.strip() for item in items if item.strip())


def load_accounts(
    path: Path, *, default_campaigns: int = _DEFAULT_CAMPAIGNS
) -> tuple[AccountSpec, ...]:
    """Read accounts from a TOML file (``[[accounts]]`` tables) or a JSON file.

    JSON may be a list of accounts or ``{"accounts": [...]}``. Each account has
    ``email``, ``password``, optional ``campaigns`` (default: the campaigns knob),
    ``error_rate`` and ``always_503``.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SimulatorConfigError(f"cannot read accounts file {path}: {exc.strerror}") from exc
    document: Any
    try:
        if path.suffix.lower() == ".json":
            document = json.loads(text)
        elif path.suffix.lower() == ".toml":
            document = tomllib.loads(text)
        else:
            raise SimulatorConfigError(
                f"accounts file {path} must end in .toml or .json to say its format"
            )
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SimulatorConfigError(f"accounts file {path} is not valid: {exc}") from exc
    if isinstance(document, Mapping):
        document = document.get("accounts")
    if not isinstance(document, list) or not document:
        raise SimulatorConfigError(
            f"accounts file {path} must hold a non-empty list of accounts "
            '(TOML: [[accounts]] tables; JSON: a list or {"accounts": [...]})'
        )
    return tuple(
        _account_from(item, default_campaigns, f"{path}: account #{index + 1}")
        for index, item in enumerate(document)
    )


def _account_from(item: object, default_campaigns: int, where: str) -> AccountSpec:
    if isinstance(item, AccountSpec):
        return item
    if not isinstance(item, Mapping):
        raise SimulatorConfigError(f"{where} must be a table/object with email and password")
    unknown = sorted(set(item) - _ACCOUNT_KEYS)
    if unknown:
        raise SimulatorConfigError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}")
    missing = [key for key in ("email", "password") if key not in item]
    if missing:
        raise SimulatorConfigError(f"{where}: missing {' and '.join(missing)}")
    try:
        return AccountSpec(
            email=item["email"],
            password=item["password"],
            campaigns=item.get("campaigns", default_campaigns),
            error_rate=item.get("error_rate"),
            always_503=item.get("always_503", False),
        )
    except SimulatorConfigError as exc:
        raise SimulatorConfigError(f"{where}: {exc}") from exc


def _check_int(name: str, value: object, *, minimum: int, where: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SimulatorConfigError(f"{where}{name} must be an integer >= {minimum} (got {value!r})")


def _check_number(name: str, value: object, *, minimum: float, where: str = "") -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < minimum
    ):
        raise SimulatorConfigError(f"{where}{name} must be a number >= {minimum} (got {value!r})")


def _check_rate(name: str, value: object, *, where: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise SimulatorConfigError(
            f"{where}{name} must be a probability between 0 and 1 (got {value!r})"
        )
