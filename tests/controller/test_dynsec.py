"""Dynamic-security commands and their answers (the broker side is a fake of our publish
interface; tests/integration/test_mosquitto_dynsec.py runs the real plugin)."""

import json
import threading

import pytest

from controller.dynsec import DynamicSecurity, DynsecError
from shared.topics import Topics


class FakeBroker:
    """Answers every command on the response path: at once, from a thread of its own, or
    when told (``answer_held``)."""

    def __init__(self, mode: str = "now") -> None:
        self.mode = mode
        self.held: list[bytes] = []
        self.dynsec: DynamicSecurity | None = None

    def publish(self, _topic: str, payload: bytes) -> None:
        if self.mode == "hold":
            self.held.append(payload)
        elif self.mode == "thread":
            threading.Thread(target=self._answer, args=(payload,)).start()
        else:
            self._answer(payload)

    def _answer(self, payload: bytes) -> None:
        assert self.dynsec is not None
        commands = json.loads(payload)["commands"]
        self.dynsec.on_response(json.dumps({"responses": [
            {"command": c["command"], "correlationData": c["correlationData"]}
            for c in commands]}).encode())

    def answer_held(self) -> None:
        for payload in self.held:
            self._answer(payload)


def dynsec(broker: FakeBroker, timeout: float = 10.0) -> DynamicSecurity:
    broker.dynsec = DynamicSecurity(broker.publish, Topics("t/v1"), timeout=timeout)
    return broker.dynsec


def test_answers_come_back_in_the_order_of_the_commands() -> None:
    d = dynsec(FakeBroker())
    out = d.run({"command": "createClient"}, {"command": "addClientRole"})
    assert [a["command"] for a in out] == ["createClient", "addClientRole"]


def test_answers_nobody_waits_for_are_not_kept() -> None:
    broker = FakeBroker("hold")
    d = dynsec(broker, timeout=0.05)
    with pytest.raises(DynsecError, match="did not answer"):
        d.run({"command": "createClient"})
    broker.answer_held()  # too late
    # another replica's answers arrive on the same response topic
    d.on_response(json.dumps({"responses": [{"correlationData": "someone-else"}]}).encode())
    assert d._answers == {}  # nothing accumulates


def test_a_command_waits_for_its_answer_from_another_thread() -> None:
    d = dynsec(FakeBroker("thread"))
    assert [a["command"] for a in d.run({"command": "deleteClient"})] == ["deleteClient"]
