"""Agent config and identity files."""

import stat
from pathlib import Path

import pytest

from agent.config import AgentConfig, ConfigError, Identity


def test_config_round_trips_through_toml(tmp_path: Path) -> None:
    config = AgentConfig(state_dir=tmp_path / "state", controller="http://c:8080",
                         labels={"site": 'l"yon', "rack": "3"}, health_interval_s=2.5)
    path = tmp_path / "agent.toml"
    path.write_text(config.dump())
    assert AgentConfig.load(path, env={}) == config


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(AgentConfig(state_dir=tmp_path).dump())
    config = AgentConfig.load(path, env={"EDGEFLEET_MQTT_URL": "mqtt://b:1884",
                                         "EDGEFLEET_AGENT_HEALTH_INTERVAL": "7"})
    assert (config.mqtt_url, config.health_interval_s) == ("mqtt://b:1884", 7.0)


def test_missing_or_broken_config_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="edgefleet agent enroll"):
        AgentConfig.load(tmp_path / "nope.toml", env={})
    (tmp_path / "bad.toml").write_text("state_dir = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        AgentConfig.load(tmp_path / "bad.toml", env={})
    with pytest.raises(ConfigError, match="edgefleet agent enroll"):
        Identity.load(tmp_path)


def test_identity_is_stored_private(tmp_path: Path) -> None:
    identity = Identity(device_id="dev-1", mqtt_url="mqtt://x:1", mqtt_username="dev-1",
                        mqtt_password="secret", topic_root="ef/v1", keepalive_s=5,
                        health_interval_s=1, desired_state_key="k")
    identity.save(tmp_path / "state")
    path = tmp_path / "state" / "identity.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Identity.load(tmp_path / "state") == identity
    assert "secret" not in repr(identity)


def test_onnx_parallel_is_a_count_or_auto_and_the_token_file_a_path(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    base = f'state_dir = "{tmp_path}"\n'
    for given, want in (("", 1), ("onnx_parallel = 3\n", 3), ('onnx_parallel = "auto"\n', None)):
        path.write_text(base + given)
        assert AgentConfig.load(path, env={}).onnx_parallel == want
    for bad in ("0", '"many"', "true"):
        path.write_text(base + f"onnx_parallel = {bad}\n")
        with pytest.raises(ConfigError, match='positive integer or "auto"'):
            AgentConfig.load(path, env={})
    config = AgentConfig(state_dir=tmp_path, inference_token_file=tmp_path / "token")
    path.write_text(config.dump())
    assert AgentConfig.load(path, env={}).inference_token_file == tmp_path / "token"
