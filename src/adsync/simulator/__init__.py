"""A faithful, hostile simulator of the ad platform of ``docs/platform-api.md``.

It stands alone: nothing here imports the client side of adsync, so a bug the
client and its test double might share cannot hide.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from adsync.simulator.config import (
    AccountSpec,
    SimulatorConfig,
    SimulatorConfigError,
    build_config,
    load_accounts,
)

__all__ = [
    "AccountSpec",
    "Simulator",
    "SimulatorConfig",
    "SimulatorConfigError",
    "build_config",
    "build_server",
    "create_app",
    "load_accounts",
]

if TYPE_CHECKING:
    from adsync.simulator.app import Simulator, build_server, create_app

# The web stack (Starlette, uvicorn) loads when one of these is first asked for,
# not with the package: ``adsync`` imports the package for its ``simulate`` command.
_FROM_APP = frozenset({"Simulator", "build_server", "create_app"})


def __getattr__(name: str) -> Any:
    if name in _FROM_APP:
        from adsync.simulator import app  # noqa: PLC0415 - loaded when asked for

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
