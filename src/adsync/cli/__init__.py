"""The ``adsync`` command line: the app, its command groups, the entry point.

One module per command group (``sync``, ``check``, ``demo``, ``history``, ``accounts``,
``db``, ``worker``; ``simulate`` is the simulator's own), each adding its commands
to :data:`app`. Building the app imports only typer, rich's console and the light
shared pieces of :mod:`adsync.cli.common`: every command imports the libraries it
uses (SQLAlchemy, Alembic, httpx, Procrastinate, Prometheus, the simulator's
server) when it runs, so that ``adsync --help`` and ``adsync status`` do not pay
for the others.
"""

from __future__ import annotations

import sys

import typer

from adsync.cli import accounts, check, db, demo, history, sync, worker
from adsync.exit_codes import EXIT_SIGINT
from adsync.simulator.cli import simulate

__all__ = ["app", "main"]

app = typer.Typer(
    name="adsync",
    help="Keep the agency's database in step with the ad platform.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Click's plain help: a flag is shown as a flag (rich's panels show `--json
    # <bool>`, a value the option refuses), and an option's help wraps whole
    # words instead of cutting a variable name at the column's edge.
    rich_markup_mode=None,
)
db.register(app)
accounts.register(app)
sync.register(app)
check.register(app)
demo.register(app)
app.command("simulate")(simulate)
history.register(app)
worker.register(app)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover - signals are handled inside commands
        sys.exit(EXIT_SIGINT)
