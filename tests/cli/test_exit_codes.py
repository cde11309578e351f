"""Exit codes scripts rely on (cli/api.py) for failures that need no controller."""

import socket

from click.testing import CliRunner

from cli.main import main


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends


def test_an_unreachable_controller_exits_6_and_says_what_to_do() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    for args in (["status"], ["devices", "--json"], ["audit"], ["rollout", "list"]):
        result = CliRunner().invoke(main, [*args, "--controller", url, "--token", "t"])
        assert result.exit_code == 6, (args, result.output)
        assert f"cannot reach the controller at {url}" in result.output
        assert "--controller" in result.output


def test_bad_usage_exits_2() -> None:
    result = CliRunner().invoke(main, ["audit", "--since", "yesterday"])
    assert result.exit_code == 2
    assert "not a duration like 30s" in result.output
