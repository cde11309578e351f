"""The local API's bearer token: none on loopback, one always beyond it, as the openai
client and Prometheus send it."""

import os
import stat
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from agent import localauth
from agent.config import AgentConfig, ConfigError
from agent.serving import LocalApi, Serving
from tests.agent.test_queue import HeldWorker, staged


def test_on_loopback_no_token_beyond_it_one_is_made_once_readable_by_its_owner_only(
        tmp_path: Path) -> None:
    for host in ("127.0.0.1", "localhost", "[::1]"):
        assert localauth.token(AgentConfig(tmp_path, inference_listen=f"{host}:8787")) is None
    exposed = AgentConfig(tmp_path, inference_listen="0.0.0.0:8787")
    made = localauth.token(exposed)
    path = tmp_path / localauth.TOKEN_FILE
    assert made is not None
    assert len(made) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert localauth.token(exposed) == made  # kept, not made again


def test_a_token_file_others_can_read_or_without_a_token_is_refused_with_what_to_do(
        tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("x" * 40)
    os.chmod(path, 0o644)
    config = AgentConfig(tmp_path, inference_token_file=path)
    with pytest.raises(ConfigError, match=f"chmod 600 {path}"):
        localauth.token(config)
    os.chmod(path, 0o600)
    assert localauth.token(config) == "x" * 40  # asked for on loopback too, if named
    path.write_text("short")
    with pytest.raises(ConfigError, match="no token of at least 16 characters"):
        localauth.token(config)
    with pytest.raises(ConfigError, match="No such file"):
        localauth.token(AgentConfig(tmp_path, inference_token_file=tmp_path / "nope"))


def test_with_a_token_every_route_asks_for_it_and_the_openai_client_sends_it(
        tmp_path: Path) -> None:
    serving = Serving(worker=HeldWorker)  # type: ignore[arg-type]
    serving.activate(staged(tmp_path))
    HeldWorker.last.release.set()
    secret = "s3cret-token-of-enough-length"
    local = LocalApi(serving, "127.0.0.1", 0, token=secret)
    local.start()
    base = f"http://127.0.0.1:{local.port}"
    try:
        wrong = openai.OpenAI(base_url=f"{base}/v1", api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="Authorization: Bearer"):
            wrong.completions.create(model="llm", prompt="x")
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        right = openai.OpenAI(base_url=f"{base}/v1", api_key=secret, max_retries=0)
        assert right.completions.create(model="llm", prompt="x").choices[0].text == "ok"
        assert [m.id for m in right.models.list()] == ["llm"]
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{base}/metrics", timeout=10)  # noqa: S310
        assert refused.value.code == 401
        assert refused.value.headers["WWW-Authenticate"] == "Bearer"
        scrape = urllib.request.Request(f"{base}/metrics",  # noqa: S310
                                        headers={"Authorization": f"Bearer {secret}"})
        with urllib.request.urlopen(scrape, timeout=10) as resp:  # noqa: S310
            assert b"edgefleet_agent_client_errors_total" in resp.read()
    finally:
        serving.activate(None)
        local.stop()
