"""The ``adsync simulate`` command: every knob a flag and an ``ADSYNC_SIM_*`` env var.

The server (Starlette, uvicorn) is imported when the command runs: ``adsync``
registers this command, and its other commands must not load them.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from adsync.simulator.config import SimulatorConfig, SimulatorConfigError, build_config

if TYPE_CHECKING:
    from adsync.simulator.app import SimulatorServer


class RetryAfterHeaderChoice(StrEnum):
    """Values of ``--retry-after-header``."""

    none = "none"
    seconds = "seconds"
    http_date = "http-date"


def build_server(config: SimulatorConfig) -> SimulatorServer:
    """The server for ``config``, its web stack imported now."""
    from adsync.simulator.app import build_server as build  # noqa: PLC0415 - see the docstring

    return build(config)


def _env(name: str) -> str:
    return f"ADSYNC_SIM_{name.upper()}"


def simulate(
    *,
    host: Annotated[str, typer.Option(envvar=_env("host"), help="Interface to bind.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(envvar=_env("port"), min=0, help="Port to bind.")] = 3001,
    rate_limit: Annotated[
        int,
        typer.Option(envvar=_env("rate_limit"), min=1, help="Requests per window per client id."),
    ] = 10,
    rate_window: Annotated[
        float,
        typer.Option(
            envvar=_env("rate_window"), min=0.001, help="Sliding window in seconds (0.5 is fine)."
        ),
    ] = 60.0,
    error_rate: Annotated[
        float,
        typer.Option(
            envvar=_env("error_rate"), min=0.0, max=1.0, help="Share of list requests that 503."
        ),
    ] = 0.2,
    hang_rate: Annotated[
        float,
        typer.Option(
            envvar=_env("hang_rate"),
            min=0.0,
            max=1.0,
            help="Share of /api requests never answered.",
        ),
    ] = 0.1,
    sync_delay: Annotated[
        float, typer.Option(envvar=_env("sync_delay"), min=0.0, help="Seconds a sync call takes.")
    ] = 2.0,
    token_ttl: Annotated[
        float,
        typer.Option(envvar=_env("token_ttl"), min=0.001, help="Token lifetime in seconds."),
    ] = 3600.0,
    campaigns: Annotated[
        int,
        typer.Option(envvar=_env("campaigns"), min=0, help="Campaigns of the default account."),
    ] = 100,
    seed: Annotated[
        int | None,
        typer.Option(envvar=_env("seed"), min=0, help="Fault and data seed (default: random)."),
    ] = None,
    retry_after_header: Annotated[
        RetryAfterHeaderChoice,
        typer.Option(
            envvar=_env("retry_after_header"),
            help="Retry-After header on 429: none (as production), seconds or http-date.",
        ),
    ] = RetryAfterHeaderChoice.none,
    accounts: Annotated[
        Path | None,
        typer.Option(
            envvar=_env("accounts"),
            exists=True,
            dir_okay=False,
            help="TOML or JSON file of accounts (email, password, campaigns, overrides).",
        ),
    ] = None,
    sync_error_rate: Annotated[
        float,
        typer.Option(
            envvar=_env("sync_error_rate"),
            min=0.0,
            max=1.0,
            help="Share of sync calls that 500/502/503.",
        ),
    ] = 0.0,
    reset_rate: Annotated[
        float,
        typer.Option(
            envvar=_env("reset_rate"), min=0.0, max=1.0, help="Share of responses cut off mid-body."
        ),
    ] = 0.0,
    bad_json_rate: Annotated[
        float,
        typer.Option(
            envvar=_env("bad_json_rate"),
            min=0.0,
            max=1.0,
            help="Share of 200s with a truncated body.",
        ),
    ] = 0.0,
    invalidate_old_tokens: Annotated[
        bool,
        typer.Option(
            envvar=_env("invalidate_old_tokens"),
            help="A new token revokes the account's older ones.",
        ),
    ] = False,
    fail_sync_ids: Annotated[
        str,
        typer.Option(
            envvar=_env("fail_sync_ids"), help="Comma-separated ids whose sync always 500s."
        ),
    ] = "",
    malformed_ids: Annotated[
        str,
        typer.Option(
            envvar=_env("malformed_ids"), help="Comma-separated ids listed with broken fields."
        ),
    ] = "",
    max_page_size: Annotated[
        int,
        typer.Option(envvar=_env("max_page_size"), min=1, help="Largest limit a page honours."),
    ] = 100,
) -> None:
    """Run the simulated ad platform, production-like by default.

    The platform's API as production behaves: 10 requests per sliding 60 s
    window per client id (429 beyond, with a fixed retry_after of 60), 2 s
    sync calls, 20% of list requests answered 503, 10% of requests never
    answered, tokens valid for an hour. Every knob below makes it faster or
    more hostile; the README's "The simulator" section has the details.
    """
    try:
        config = build_config(
            host=host,
            port=port,
            rate_limit=rate_limit,
            rate_window=rate_window,
            error_rate=error_rate,
            hang_rate=hang_rate,
            sync_delay=sync_delay,
            token_ttl=token_ttl,
            campaigns=campaigns,
            seed=seed,
            retry_after_header=retry_after_header.value,
            accounts=accounts,
            sync_error_rate=sync_error_rate,
            reset_rate=reset_rate,
            bad_json_rate=bad_json_rate,
            invalidate_old_tokens=invalidate_old_tokens,
            fail_sync_ids=fail_sync_ids,
            malformed_ids=malformed_ids,
            max_page_size=max_page_size,
        )
    except SimulatorConfigError as exc:
        raise typer.BadParameter(str(exc)) from exc
    server = build_server(config)
    typer.echo(startup_line(config, server.simulator.seed), err=True)
    server.run()


def startup_line(config: SimulatorConfig, seed: int) -> str:
    """One line saying what is served; never credentials or tokens."""
    accounts = config.effective_accounts
    faults = ", ".join(
        f"{name} {getattr(config, name):g}"
        for name in ("error_rate", "hang_rate", "sync_error_rate", "reset_rate", "bad_json_rate")
    )
    return (
        f"adsync simulator on http://{config.host}:{config.port}: "
        f"{len(accounts)} account(s), {sum(a.campaigns for a in accounts)} campaigns, "
        f"{config.rate_limit} requests per {config.rate_window:g}s, "
        f"sync delay {config.sync_delay:g}s, token ttl {config.token_ttl:g}s, seed {seed}, "
        f"faults: {faults}"
    )
