"""``python -m adsync.cli``: the same as the ``adsync`` command."""

from adsync.cli import main

main()
