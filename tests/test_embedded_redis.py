"""The embedded Redis is locked down: a password no other process is shown, the commands that
rewrite its configuration, write files or load code disabled, and its files private."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest
import redis

from memserve.memory_store.redis_server import DISABLED_COMMANDS, RedisServer
from memserve.memory_store.redis_store import RedisStore, redacted


@pytest.fixture
def embedded(tmp_path: Path):
    (tmp_path / "data").mkdir(mode=0o755)
    (tmp_path / "data" / "appendonly.aof").write_text("")  # left 0644 by an older version
    (tmp_path / "data" / "appendonly.aof").chmod(0o644)
    (tmp_path / "data" / "notes.txt").write_text("a user's file")
    (tmp_path / "data" / "notes.txt").chmod(0o644)
    with RedisServer(tmp_path / "data", lock=True) as server:
        yield server


def test_a_client_without_the_password_is_refused(embedded):
    with redis.Redis(port=embedded.port) as stranger, pytest.raises(redis.AuthenticationError):
        stranger.get("anything")
    with (
        redis.Redis(port=embedded.port, password="guess") as guesser,
        pytest.raises(redis.AuthenticationError),
    ):
        guesser.ping()
    with embedded.client() as owner:
        assert owner.ping()
    store = RedisStore.from_url(embedded.url)  # what the server connects with
    assert store.versions("nothing") == []


@pytest.mark.parametrize("command", [*DISABLED_COMMANDS, "CONFIG SET dir /tmp", "DEBUG SLEEP 0"])
def test_dangerous_commands_are_gone_even_with_the_password(embedded, command):
    with embedded.client() as owner, pytest.raises(redis.ResponseError, match="unknown command"):
        owner.execute_command(*command.split())


def test_the_password_is_never_on_a_command_line_or_on_disk(embedded):
    assert embedded.password and embedded.password in embedded.url
    cmdline = Path(f"/proc/{embedded.process.pid}/cmdline").read_bytes()
    assert embedded.password.encode() not in cmdline
    for path in embedded.data_dir.iterdir():
        if path.is_file():
            assert embedded.password.encode() not in path.read_bytes(), path


def test_its_files_are_private_and_a_users_files_are_left_alone(embedded):
    with embedded.client() as owner:
        owner.set("key", "value")
    assert stat.S_IMODE(embedded.data_dir.stat().st_mode) == 0o700
    for name in ("appendonly.aof", "redis.log", "memserve.lock"):
        assert stat.S_IMODE((embedded.data_dir / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE((embedded.data_dir / "notes.txt").stat().st_mode) == 0o644


def test_loopback_only(embedded):
    with embedded.client() as owner:
        # CONFIG is disabled, so ask INFO: the bound address is in the server section's tcp_port
        # and the listening socket is checked from outside instead.
        assert owner.info("server")["tcp_port"] == embedded.port
    listening = Path("/proc/net/tcp").read_text().splitlines()[1:]
    local = {line.split()[1] for line in listening if line.split()[3] == "0A"}  # 0A = LISTEN
    assert f"0100007F:{embedded.port:04X}" in local
    assert f"00000000:{embedded.port:04X}" not in local


def test_a_restart_keeps_the_password_and_the_data(embedded):
    with embedded.client() as owner:
        owner.set("kept", "yes")
    embedded.stop()
    embedded.start()
    with embedded.client() as owner:
        assert owner.get("kept") == b"yes"


def test_passwords_are_redacted_in_logs(caplog, tmp_path):
    assert redacted("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert redacted("rediss://user:s3cret@host:6380") == "rediss://user:***@host:6380"
    assert redacted("redis://host:6379") == "redis://host:6379"
    with caplog.at_level(logging.INFO), RedisServer(tmp_path / "r") as server:
        pass
    assert server.password not in caplog.text
