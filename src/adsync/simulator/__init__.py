"""A faithful, hostile simulator of the ad platform of ``PLATFORM_API.md``.

It stands alone: nothing here imports the client side of adsync, so a bug the
client and its test double might share cannot hide.
"""

from adsync.simulator.app import Simulator, build_server, create_app
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
