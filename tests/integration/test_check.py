"""``adsync check`` against the simulator: one line per check, the exit code of what failed."""

from __future__ import annotations

from pathlib import Path

import pytest
from _proc import EMAIL, PASSWORD, adsync, calm_simulator
from _workers import free_port

from adsync.simulator.testing import SimulatorHandle

pytestmark = pytest.mark.slow


def env_for(sim: SimulatorHandle, tmp_path: Path, **over: str) -> dict[str, str]:
    env = {
        "AD_PLATFORM_API_URL": sim.url,
        "AD_PLATFORM_EMAIL": EMAIL,
        "AD_PLATFORM_PASSWORD": PASSWORD,
        "AD_PLATFORM_CLIENT_ID": "checked",
        "AD_PLATFORM_RATE_WINDOW": "1",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'adsync.db'}",
    }
    env.update(over)
    return env


def lines(text: str) -> dict[str, str]:
    """``{check name: the whole line}`` of a check's output."""
    found = {}
    for line in text.splitlines():
        mark, rest = line.split(None, 1)
        assert mark in ("ok", "FAIL"), line
        found[rest.partition(":")[0]] = line
    return found


def test_good_credentials_pass_with_one_uncounted_token_request(tmp_path: Path) -> None:
    with calm_simulator(campaigns=3) as sim:
        done = adsync("check", env=env_for(sim, tmp_path), cwd=tmp_path)
        stats = sim.stats()
    assert done.returncode == 0, done.stdout + done.stderr
    got = lines(done.stdout)
    assert list(got) == ["configuration", "database", "credentials checked"]
    assert got["configuration"].startswith("ok ")
    assert "10 requests per 1 s" in got["configuration"]
    assert "does not exist yet: the first sync creates it" in got["database"]
    assert got["credentials checked"].startswith("ok ")
    assert not (tmp_path / "adsync.db").exists()  # checking creates nothing
    assert stats["accounts"][EMAIL]["tokens_issued"] == 1
    # Nothing counted against the limit, for any client id.
    assert stats["accounts"][EMAIL]["requests"] == 0
    assert all(c["requests"] == 0 for c in stats["clients"].values())
    assert PASSWORD not in done.stdout + done.stderr


def test_a_migrated_database_says_its_revision(tmp_path: Path) -> None:
    with calm_simulator(campaigns=3) as sim:
        env = env_for(sim, tmp_path)
        assert adsync("db", "upgrade", env=env, cwd=tmp_path).returncode == 0
        done = adsync("check", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "answers; schema current (revision" in lines(done.stdout)["database"]


def test_a_wrong_password_is_one_failed_line_and_exit_3(tmp_path: Path) -> None:
    with calm_simulator(campaigns=3) as sim:
        env = env_for(sim, tmp_path, AD_PLATFORM_PASSWORD="not-the-password")
        done = adsync("check", env=env, cwd=tmp_path)
    assert done.returncode == 3, done.stdout + done.stderr
    got = lines(done.stdout)
    assert got["configuration"].startswith("ok ")
    assert got["database"].startswith("ok ")
    assert got["credentials checked"].startswith("FAIL ")
    assert "refused the credentials of admin@mixoads.com" in got["credentials checked"]
    assert "not-the-password" not in done.stdout + done.stderr


def test_a_platform_down_names_its_url_and_exits_1(tmp_path: Path) -> None:
    with calm_simulator(campaigns=3) as sim:
        env = env_for(sim, tmp_path)
    # The simulator has stopped: nothing listens at its URL any more.
    done = adsync("check", env=env, cwd=tmp_path, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    line = lines(done.stdout)["credentials checked"]
    assert line.startswith("FAIL ")
    assert f"the platform at {sim.url} did not answer" in line
    assert "ConnectError" in line


def test_a_database_down_is_one_failed_line_and_exit_1(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    with calm_simulator(campaigns=3) as sim:
        env = env_for(
            sim, tmp_path, DATABASE_URL=f"postgresql://adsync:dbsecret@127.0.0.1:{port}/x"
        )
        done = adsync("check", env=env, cwd=tmp_path, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    got = lines(done.stdout)
    assert got["database"].startswith("FAIL ")
    assert f"127.0.0.1:{port}" in got["database"]
    assert "Connection refused" in got["database"]
    assert got["credentials checked"].startswith("ok ")  # the others are still checked
    assert "dbsecret" not in done.stdout + done.stderr


def test_bad_configuration_is_exit_2_and_the_database_is_still_checked(tmp_path: Path) -> None:
    with calm_simulator(campaigns=3) as sim:
        env = env_for(sim, tmp_path, AD_PLATFORM_RATE_WINDOW="-1")
        done = adsync("check", env=env, cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    got = lines(done.stdout)
    assert got["configuration"].startswith("FAIL ")
    assert "AD_PLATFORM_RATE_WINDOW" in got["configuration"]
    assert got["database"].startswith("ok ")


def test_accounts_file_checks_each_account_and_its_password_source(tmp_path: Path) -> None:
    (tmp_path / "accounts.toml").write_text(
        '[[accounts]]\nclient_id = "good"\nemail = "admin@mixoads.com"\n'
        'password_env = "GOOD_PASSWORD"\n'
        '[[accounts]]\nclient_id = "unset"\nemail = "admin@mixoads.com"\n'
        'password_env = "UNSET_PASSWORD"\n',
        encoding="utf-8",
    )
    with calm_simulator(campaigns=3) as sim:
        env = {
            "AD_PLATFORM_API_URL": sim.url,
            "GOOD_PASSWORD": PASSWORD,
            "DATABASE_URL": f"sqlite:///{tmp_path / 'adsync.db'}",
        }
        done = adsync("check", "--all", env=env, cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    got = lines(done.stdout)
    assert got["configuration good"].startswith("ok ")
    assert "password from env:GOOD_PASSWORD" in got["configuration good"]
    assert got["configuration unset"].startswith("FAIL ")
    assert "UNSET_PASSWORD" in got["configuration unset"]
    assert got["credentials good"].startswith("ok ")
    assert "credentials unset" not in got
