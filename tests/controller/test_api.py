"""API authentication, roles, enrolment tokens and problem details, on both backends."""

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from controller.api.app import create_app
from controller.runtime import Runtime
from controller.settings import HostPort, Settings
from tests.conftest import Backend, free_port

MUTATING = {"POST", "PUT", "PATCH", "DELETE"}
PUBLIC = {("POST", "/api/v1/enroll")}  # authenticated by the enrolment token instead


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def settings(backend: Backend, tmp_path: Path) -> Settings:
    return backend.settings(tmp_path / "data")


@pytest.fixture
def client(settings: Settings, clock: Clock):
    app = create_app(settings, runtime=Runtime(settings, clock=clock))
    with TestClient(app) as c:
        yield c


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def admin(settings: Settings, client: TestClient) -> dict[str, str]:
    return auth((settings.data_dir / "admin-token").read_text().strip())


def make_token(client: TestClient, admin: dict[str, str], role: str) -> dict[str, str]:
    r = client.post("/api/v1/tokens", json={"name": role, "role": role}, headers=admin)
    assert r.status_code == 201, r.text
    return auth(r.json()["token"])


def mutating_routes(client: TestClient) -> list[tuple[str, str]]:
    """Every mutating route the app publishes in its OpenAPI document."""
    routes = []
    for path, ops in client.get("/openapi.json").json()["paths"].items():
        for method in ops:
            if method.upper() in MUTATING and (method.upper(), path) not in PUBLIC:
                routes.append((method.upper(), path.replace("{device_id}", "dev-x")))
    return routes


def test_admin_token_file_is_private(settings: Settings, client: TestClient) -> None:
    path = settings.data_dir / "admin-token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((settings.data_dir / "keys" / "desired-state.key").stat().st_mode) == 0o600


def test_no_token_gets_401_with_a_problem_body(client: TestClient) -> None:
    r = client.get("/api/v1/devices")
    assert r.status_code == 401
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "unauthorized"
    assert client.get("/api/v1/devices", headers=auth("efa_wrong")).status_code == 401


def test_no_token_gets_401_on_every_mutating_route(client: TestClient) -> None:
    routes = mutating_routes(client)
    assert len(routes) >= 3
    for method, path in routes:
        assert client.request(method, path, json={}).status_code == 401, (method, path)


def test_viewer_gets_403_on_every_mutating_route(client: TestClient, admin) -> None:
    viewer = make_token(client, admin, "viewer")
    for method, path in mutating_routes(client):
        r = client.request(method, path, json={"name": "x", "role": "viewer"}, headers=viewer)
        assert r.status_code == 403, (method, path, r.text)
        assert r.json()["code"] == "forbidden"
    assert client.get("/api/v1/devices", headers=viewer).status_code == 200


def test_operator_can_create_enrolment_tokens_but_not_api_tokens(client, admin) -> None:
    operator = make_token(client, admin, "operator")
    assert client.post("/api/v1/enroll-tokens", json={}, headers=operator).status_code == 201
    r = client.post("/api/v1/tokens", json={"name": "x", "role": "admin"}, headers=operator)
    assert r.status_code == 403


def test_enrolment_token_is_single_use(client: TestClient, admin) -> None:
    token = client.post("/api/v1/enroll-tokens", json={}, headers=admin).json()["token"]
    first = client.post("/api/v1/enroll", json={"token": token, "name": "box-1"})
    assert first.status_code == 201
    body = first.json()
    assert body["device_id"].startswith("dev-")
    assert body["mqtt_password"].startswith("efd_")
    again = client.post("/api/v1/enroll", json={"token": token})
    assert again.status_code == 403
    assert again.json()["code"] == "enroll_refused"
    devices = client.get("/api/v1/devices", headers=admin).json()
    assert [d["name"] for d in devices] == ["box-1"]


def test_enrolment_token_expires(client: TestClient, admin, clock: Clock) -> None:
    token = client.post("/api/v1/enroll-tokens", json={"expires_in_s": 600, "uses": 5},
                        headers=admin).json()["token"]
    clock.now += timedelta(seconds=601)
    assert client.post("/api/v1/enroll", json={"token": token}).status_code == 403


def test_enrolment_token_labels_reach_the_device(client: TestClient, admin) -> None:
    token = client.post("/api/v1/enroll-tokens", json={"labels": {"site": "lyon"}},
                        headers=admin).json()["token"]
    device_id = client.post("/api/v1/enroll", json={"token": token, "labels": {"rack": "3"}}
                            ).json()["device_id"]
    device = client.get(f"/api/v1/devices/{device_id}", headers=admin).json()
    assert device["labels"] == {"site": "lyon", "rack": "3"}


def test_unknown_device_is_a_404_problem(client: TestClient, admin) -> None:
    r = client.get("/api/v1/devices/dev-nope", headers=admin)
    assert (r.status_code, r.json()["code"]) == (404, "device_not_found")


def test_invalid_request_names_the_field(client: TestClient, admin) -> None:
    r = client.post("/api/v1/enroll-tokens", json={"uses": 0}, headers=admin)
    assert r.status_code == 422
    assert "uses" in r.json()["detail"]


def test_configured_admin_token_is_used_and_not_written(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "d", admin_token="efa_configured",
                        broker_listen=HostPort("127.0.0.1", free_port()))
    with TestClient(create_app(settings)) as c:
        assert c.get("/api/v1/devices", headers=auth("efa_configured")).status_code == 200
    assert not (tmp_path / "d" / "admin-token").exists()


def test_healthz_and_readyz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "mqtt": "ok", "ingest": "ok"}
    assert "/api/v1/devices" in client.get("/openapi.json").json()["paths"]


def test_mutations_are_audited_and_listed_newest_first(client: TestClient, admin) -> None:
    operator = make_token(client, admin, "operator")
    token = client.post("/api/v1/enroll-tokens", json={"labels": {"site": "a"}},
                        headers=operator).json()
    device_id = client.post("/api/v1/enroll", json={"token": token["token"]}).json()["device_id"]
    assert client.delete(f"/api/v1/devices/{device_id}", headers=operator).status_code == 204
    entries = client.get("/api/v1/audit", headers=operator).json()
    assert [(e["actor"], e["action"], e["target"]) for e in entries] == [
        ("operator", "device.delete", device_id),
        (f"enroll-token:{token['id']}", "device.enroll", device_id),
        ("operator", "enroll_token.create", token["id"]),
        ("bootstrap-admin", "api_token.create", "operator"),
    ]
    assert entries[0]["at"].startswith("2026-11-28T12:00:00")
    assert entries[0]["remote"] == "testclient"
    assert entries[2]["detail"] == {"uses": 1, "labels": {"site": "a"}}
    assert token["token"] not in str(entries)  # secrets never reach the log


def test_audit_filters_and_pages(client: TestClient, admin, clock: Clock) -> None:
    for _ in range(3):
        client.post("/api/v1/enroll-tokens", json={}, headers=admin)
        clock.now += timedelta(hours=1)
    make_token(client, admin, "viewer")

    def actions(query: str) -> list[str]:
        r = client.get(f"/api/v1/audit?{query}", headers=admin)
        assert r.status_code == 200, r.text
        return [e["action"] for e in r.json()]

    assert actions("action=enroll_token") == ["enroll_token.create"] * 3
    assert actions("action=enroll_token.create&since=2026-11-28T13:00:00") == [
        "enroll_token.create"] * 2  # a time without a zone is UTC
    assert actions("action=enroll") == []  # a family is a whole dotted prefix
    assert actions("actor=nobody") == []
    first = client.get("/api/v1/audit?limit=2", headers=admin).json()
    rest = client.get(f"/api/v1/audit?before_id={first[-1]['id']}", headers=admin).json()
    assert (len(first), len(rest)) == (2, 2)
    assert {e["id"] for e in first}.isdisjoint(e["id"] for e in rest)


def test_viewers_cannot_read_the_audit_log(client: TestClient, admin) -> None:
    viewer = make_token(client, admin, "viewer")
    r = client.get("/api/v1/audit", headers=viewer)
    assert r.status_code == 403
    assert "operator" in r.json()["detail"]


def test_a_deleted_device_is_no_longer_ingested(client: TestClient, admin, settings) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from shared.messages import Health, encode
    from shared.topics import Kind, Topics
    from tests.conftest import wait_for

    token = client.post("/api/v1/enroll-tokens", json={}, headers=admin).json()["token"]
    ident = client.post("/api/v1/enroll", json={"token": token}).json()
    device_id = ident["device_id"]
    host, port = ident["mqtt_url"].removeprefix("mqtt://").split(":")
    device = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id)
    device.username_pw_set(ident["mqtt_username"], ident["mqtt_password"])
    device.connect(host, int(port))
    device.loop_start()
    topic = Topics(ident["topic_root"]).device(device_id, Kind.HEALTH)
    report = encode(Health(seq=1, sent_at=datetime.now(UTC), cpu_percent=1, mem_used_bytes=1,
                           mem_total_bytes=2, disk_free_bytes=3))
    try:
        device.publish(topic, report, qos=1).wait_for_publish(10)
        wait_for(lambda: client.get(f"/api/v1/devices/{device_id}", headers=admin)
                 .json()["health_count"] == 1, 30, "the report ingested")
        assert client.delete(f"/api/v1/devices/{device_id}", headers=admin).status_code == 204
        runtime = client.app.state.runtime
        assert device_id not in runtime.known
        assert device_id not in runtime.policy.devices  # the embedded broker refuses it now
        assert topic not in runtime.bridge._routes
        assert client.get(f"/api/v1/devices/{device_id}", headers=admin).status_code == 404
    finally:
        device.disconnect()
        device.loop_stop()
