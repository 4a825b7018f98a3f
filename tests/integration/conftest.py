"""What the integration tests share.

Fixtures live here; plain helpers in the ``_proc`` (``adsync`` processes, the
database as the test sees it, the simulator's counters, a calm simulator) and
``_workers`` (worker processes, their accounts and simulator) modules.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from _proc import reap_all


@pytest.fixture(autouse=True)
def _reap_processes() -> Iterator[None]:
    """Kill what a test left running: a failed assertion skips the test's own cleanup."""
    yield
    reap_all()
