"""Many accounts in one process: each with its own credentials, token, budget and run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from adsync.simulator.testing import running_simulator
from adsync.store import SqlStore

pytestmark = pytest.mark.slow

ACCOUNTS = 20
LIMIT = 20
WINDOW = 0.5


def write_accounts(tmp_path: Path, env: dict[str, str]) -> Path:
    lines = []
    for i in range(ACCOUNTS):
        env[f"ACCT_{i}_PASSWORD"] = f"pw-{i}-secret" if i != 3 else "definitely-wrong"
        lines += [
            "[[accounts]]",
            f'client_id = "client-{i:02d}"',
            f'email = "user{i}@agency.example"',
            f'password_env = "ACCT_{i}_PASSWORD"',
            "",
        ]
    path = tmp_path / "accounts.toml"
    path.write_text("\n".join(lines))
    return path


def test_twenty_accounts_in_one_process(tmp_path: Path) -> None:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("AD_PLATFORM_", "DATABASE_URL"))
    }
    accounts_file = write_accounts(tmp_path, env)
    sim_accounts = [
        {
            "email": f"user{i}@agency.example",
            "password": f"pw-{i}-secret",
            "campaigns": 30,
            # One account whose platform side is down for good.
            "always_503": i == 7,
        }
        for i in range(ACCOUNTS)
    ]
    db = tmp_path / "many.db"
    with running_simulator(
        process=True,
        accounts=sim_accounts,
        rate_limit=LIMIT,
        rate_window=WINDOW,
        sync_delay=0.01,
        seed=9,
    ) as sim:
        env.update(
            {
                "AD_PLATFORM_API_URL": sim.url,
                "AD_PLATFORM_RATE_LIMIT": str(LIMIT),
                "AD_PLATFORM_RATE_WINDOW": str(WINDOW),
                "AD_PLATFORM_RATE_MARGIN": "0.04",
                "AD_PLATFORM_REQUEST_TIMEOUT": "0.3",
                "AD_PLATFORM_REQUEST_DEADLINE": "1",
                "AD_PLATFORM_BACKOFF_INITIAL": "0.01",
                "AD_PLATFORM_BACKOFF_MAX": "0.1",
                "AD_PLATFORM_MAX_ATTEMPTS": "4",
                "DATABASE_URL": f"sqlite:///{db}",
                "ADSYNC_ACCOUNTS_FILE": str(accounts_file),
            }
        )
        listed = subprocess.run(
            [sys.executable, "-m", "adsync.cli", "accounts", "list", "--json"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        result = subprocess.run(
            [sys.executable, "-m", "adsync.cli", "sync", "--all", "--log-level", "ERROR"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=240,
        )
        stats = sim.stats()["clients"]

    assert listed.returncode == 0, listed.stderr
    shown = json.loads(listed.stdout)["accounts"]
    assert len(shown) == ACCOUNTS
    assert shown[3]["password_from"] == "env:ACCT_3_PASSWORD"
    assert "pw-0-secret" not in listed.stdout + result.stdout + result.stderr

    assert result.returncode == 1, result.stderr[-3000:]
    lines = result.stderr.splitlines()

    def summary_of(client_id: str) -> str:
        i = next(n for n, line in enumerate(lines) if f"client {client_id} " in line)
        return " ".join(lines[i : i + 2])

    assert summary_of("client-03").startswith("failed")
    assert "refused the credentials" in summary_of("client-03")
    assert summary_of("client-07").startswith("failed")
    assert "503" in summary_of("client-07")
    assert summary_of("client-05").startswith("succeeded client client-05")
    assert "18 of 20 accounts fully synced" in result.stderr

    store = SqlStore.from_url(f"sqlite:///{db}")
    try:
        good = [f"client-{i:02d}" for i in range(ACCOUNTS) if i not in (3, 7)]
        for client_id in good:
            assert store.count_campaigns(client_id) == 30, client_id
            assert stats[client_id]["rate_limited"] == 0, client_id
            assert stats[client_id]["max_in_window"] <= LIMIT
            assert all(n == 1 for n in stats[client_id]["sync_ok"].values())
            runs = store.recent_runs(client_id)
            assert [r.status for r in runs] == ["succeeded"]
        assert store.count_campaigns("client-03") == 0
        assert store.count_campaigns("client-07") == 0
        (down,) = store.recent_runs("client-07")
        assert down.status == "failed"
        assert "503" in (down.error or "")
        with store.engine.connect() as conn:
            dupes = conn.execute(
                sa.text(
                    "SELECT count(*) FROM (SELECT client_id, id FROM campaigns GROUP BY 1, 2 HAVING count(*) > 1) d"
                )
            ).scalar_one()
        assert dupes == 0
    finally:
        store.dispose()
    # The wrong password was refused once, not hammered.
    assert "client-03" not in stats or stats["client-03"]["requests"] == 0
