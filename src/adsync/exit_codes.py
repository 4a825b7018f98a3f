"""The exit codes of ``adsync`` commands, as a scheduler reads them (the README's table).

A module of their own, importing nothing: every command needs them, most of
them without loading the pipeline.
"""

from __future__ import annotations

from typing import Final

EXIT_OK: Final = 0
EXIT_FAILURES: Final = 1
EXIT_CONFIG: Final = 2
EXIT_AUTH: Final = 3
EXIT_SIGINT: Final = 130
EXIT_SIGTERM: Final = 143
