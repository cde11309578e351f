"""``edgefleet``: click command tree. Each command imports what it needs when it runs."""

import contextlib
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.live import Live

from cli.api import api_options, make_api, parse_labels
from cli.keys import keys
from cli.rollout import rollout
from cli.views import (
    audit_table,
    devices_table,
    status_view,
    versions_table,
)
from shared import logs

console = Console()

_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """Seconds in ``30s``, ``10m``, ``1h``, ``7d``."""
    match = _DURATION.match(text.strip())
    if not match:
        raise click.BadParameter(f"{text!r} is not a duration like 30s, 10m, 1h or 7d")
    return int(match.group(1)) * _UNITS[match.group(2)]


@click.group()
@click.option("--log-level", default="info", envvar="EDGEFLEET_LOG_LEVEL",
              type=click.Choice(["debug", "info", "warning", "error"]), show_default=True)
@click.option("--log-format", default="text", envvar="EDGEFLEET_LOG_FORMAT",
              type=click.Choice(logs.FORMATS), show_default=True,
              help="json: one JSON object per line, for journald or a log collector.")
@click.pass_context
def main(ctx: click.Context, log_level: str, log_format: str) -> None:
    """edgefleet: ship ML models to fleets of edge devices, carefully."""
    role = ctx.invoked_subcommand if ctx.invoked_subcommand in ("controller", "agent") else "cli"
    logs.setup(log_level, log_format, role=role)
    for noisy in ("amqtt", "transitions", "apscheduler"):  # they log every step at INFO
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


# -- controller ---------------------------------------------------------------------------

main.add_command(keys)
main.add_command(rollout)


@main.group()
def controller() -> None:
    """The central controller."""


@controller.command("serve")
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path(".edgefleet"),
              show_default=True, help="Where the database, keys and admin token live.")
@click.option("--db", "database_url", envvar="EDGEFLEET_DATABASE_URL",
              help="Database URL (default: SQLite in the data dir).")
@click.option("--mqtt", "mqtt_url", envvar="EDGEFLEET_MQTT_URL",
              help="External broker URL mqtt://user:pass@host:port (default: embedded broker).")
@click.option("--http", default="127.0.0.1:8080", show_default=True, help="API listen address.")
@click.option("--broker-listen", default="127.0.0.1:1883", show_default=True,
              help="Embedded broker listen address.")
@click.option("--advertise-mqtt", help="Broker URL handed to devices at enrolment.")
@click.option("--mqtt-dynsec", is_flag=True, envvar="EDGEFLEET_MQTT_DYNSEC",
              help="Create each device's broker account through Mosquitto's dynamic security "
              "plugin (the --mqtt user must be a dynsec admin).")
@click.option("--topic-root", default="ef/v1", show_default=True)
@click.option("--keepalive", type=int, default=10, show_default=True,
              help="MQTT keepalive for devices, seconds.")
@click.option("--health-interval", type=float, default=5.0, show_default=True,
              help="Seconds between device health reports.")
@click.option("--rollout-tick", type=click.FloatRange(0.1), default=2.0, show_default=True,
              help="Seconds between rollout ticks (gate evaluations and stage moves).")
def controller_serve(data_dir: Path, database_url: str | None, mqtt_url: str | None, http: str,
                     broker_listen: str, advertise_mqtt: str | None, mqtt_dynsec: bool,
                     topic_root: str,
                     keepalive: int, health_interval: float, rollout_tick: float) -> None:
    """Run the API, the MQTT bridge and the scheduler."""
    import uvicorn

    from controller.api.app import create_app
    from controller.broker import BrokerStartError
    from controller.settings import HostPort, MqttUrl, Settings

    try:
        settings = Settings.from_env(
            data_dir=data_dir, database_url=database_url,
            mqtt_url=MqttUrl.parse(mqtt_url) if mqtt_url else None, http=HostPort.parse(http),
            broker_listen=HostPort.parse(broker_listen), advertise_mqtt=advertise_mqtt,
            mqtt_dynsec=mqtt_dynsec or None,
            topic_root=topic_root, keepalive_s=keepalive, health_interval_s=health_interval,
            rollout_tick_s=rollout_tick)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if settings.mqtt_dynsec and settings.mqtt_url is None:
        raise click.BadParameter("needs --mqtt: the embedded broker has its own accounts",
                                 param_hint="--mqtt-dynsec")
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.http.host, port=settings.http.port,
                                           log_level="warning", lifespan="on",
                                           log_config=None))  # our handlers and format
    logging.getLogger("edgefleet").info(
        "edgefleet controller on http://%s (broker %s, data %s)", settings.http,
        settings.device_mqtt_url, settings.data_dir)
    try:
        server.run()
    except BrokerStartError as exc:
        raise click.ClickException(str(exc)) from None
    if not server.started:
        raise click.ClickException("the controller did not start; see the log above")


@controller.command("mosquitto-acl")
@click.option("--topic-root", default="ef/v1", show_default=True)
@click.option("--controller-user", default="edgefleet-controller", show_default=True,
              help="The MQTT user the controller connects as (--mqtt URL).")
def controller_mosquitto_acl(topic_root: str, controller_user: str) -> None:
    """Print a Mosquitto acl_file confining each device to its own topics."""
    from shared.topics import Topics

    click.echo(Topics(topic_root).mosquitto_acl(controller_user), nl=False)


# -- agent --------------------------------------------------------------------------------

@main.group()
def agent() -> None:
    """The edge daemon."""


@agent.command("enroll")
@click.option("--controller", envvar="EDGEFLEET_CONTROLLER", required=True,
              help="Controller API URL.")
@click.option("--token", required=True, help="Enrolment token (edgefleet enroll-token create).")
@click.option("--config", "config_path", type=click.Path(path_type=Path),
              default=Path("/etc/edgefleet/agent.toml"), show_default=True)
@click.option("--state-dir", type=click.Path(path_type=Path),
              default=Path("/var/lib/edgefleet"), show_default=True)
@click.option("--name", help="Device name (default: host name).")
@click.option("--label", "labels", multiple=True, help="KEY=VALUE, repeatable.")
@click.option("--inference-listen", default="127.0.0.1:8787", show_default=True,
              help="Where the local inference API listens.")
@click.option("--owner", help="The service's user (run as root): it gets the state dir and "
              "identity, and reads the config through its group.")
def agent_enroll(controller: str, token: str, config_path: Path, state_dir: Path,
                 name: str | None, labels: tuple[str, ...], inference_listen: str,
                 owner: str | None) -> None:
    """Enrol this box with the controller (once)."""
    from agent.config import ConfigError
    from agent.enroll import enroll

    try:
        identity = enroll(controller=controller, token=token, config_path=config_path,
                          state_dir=state_dir, name=name, labels=parse_labels(labels),
                          inference_listen=inference_listen, owner=owner)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"enrolled as {identity.device_id}; config in {config_path}")


@agent.command("run")
@click.option("--config", "config_path", type=click.Path(path_type=Path),
              default=Path("/etc/edgefleet/agent.toml"), show_default=True)
def agent_run(config_path: Path) -> None:
    """Run the edge daemon."""
    from agent.config import ConfigError
    from agent.daemon import run

    try:
        run(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


# -- simulator and demo -------------------------------------------------------------------

@main.command()
@click.option("--devices", "count", type=click.IntRange(1, 100_000), required=True)
@click.option("--controller", envvar="EDGEFLEET_CONTROLLER", required=True)
@click.option("--token", required=True, help="Enrolment token with at least N uses.")
@click.option("--profile", default="mixed", show_default=True)
@click.option("--state-dir", type=click.Path(path_type=Path),
              help="Keep identities here to reuse them on the next run.")
@click.option("--label", "labels", multiple=True, help="KEY=VALUE, repeatable.")
@click.option("--seed", type=int, default=0)
@click.option("--fault", "faults", multiple=True,
              metavar="MODEL@VERSION[/PROFILE]:KEY=VALUE,...",
              help="Make a version misbehave on simulated devices (smoke=1, install=1, "
              "error_rate=0.3, latency=3, memory=1.5); repeatable.")
def sim(count: int, controller: str, token: str, profile: str, state_dir: Path | None,
        labels: tuple[str, ...], seed: int, faults: tuple[str, ...]) -> None:
    """Run N simulated devices with the real agent protocol code."""
    import signal

    from agent.config import ConfigError
    from agent.sim import Simulator, enroll_fleet
    from agent.simdevice import parse_faults

    try:
        fault_map = parse_faults(list(faults))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--fault") from None
    try:
        identities = enroll_fleet(controller, token, count, state_dir=state_dir,
                                  labels=parse_labels(labels))
        simulator = Simulator(identities, profile=profile, seed=seed, faults=fault_map)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    click.echo(f"simulating {count} devices", err=True)
    simulator.run(stop)


@main.command()
@click.option("--devices", "count", type=click.IntRange(1, 1000), default=48, show_default=True)
@click.option("--timeout", type=float, default=30.0, show_default=True,
              help="Seconds to wait for the fleet to come online.")
@click.option("--real-agents", "real", type=click.IntRange(0, 50), default=6, show_default=True,
              help="Real agents (the daemon's own code) beside the simulated devices.")
@click.option("--fleet-only", is_flag=True, help="Stop once the fleet is online (no rollouts).")
def demo(count: int, timeout: float, real: int, fleet_only: bool) -> None:
    """Controller, simulated fleet, real agents and three rollouts on embedded defaults."""
    from cli.demo import run_demo

    sys.exit(run_demo(count, timeout=timeout, console=console, rollouts=not fleet_only,
                      real=real))


# -- operator commands --------------------------------------------------------------------

@main.group(invoke_without_command=True)
@api_options
@click.option("--watch", is_flag=True, help="Refresh every second until Ctrl-C.")
@click.option("--status", type=click.Choice(["online", "offline", "enrolled"]))
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.pass_context
def devices(ctx: click.Context, controller: str, token: str | None, watch: bool,
            status: str | None, as_json: bool) -> None:
    """List devices (or pin/unpin one)."""
    if ctx.invoked_subcommand is not None:
        return
    api = make_api(controller, token)
    path = f"/devices?status={status}" if status else "/devices"
    if as_json:
        click.echo(json.dumps(api.call("GET", path), indent=2))
        return
    if not watch:
        console.print(devices_table(api.call("GET", path)))
        return
    with Live(devices_table(api.call("GET", path)), console=console, refresh_per_second=2) as live:
        try:
            while True:
                time.sleep(1)
                live.update(devices_table(api.call("GET", path)))
        except KeyboardInterrupt:
            pass


@devices.command("pin")
@api_options
@click.argument("device")
@click.argument("ref", metavar="MODEL@VERSION")
def devices_pin(controller: str, token: str | None, device: str, ref: str) -> None:
    """Make DEVICE run MODEL@VERSION (the variant that fits it best)."""
    _split_ref(ref)
    out = make_api(controller, token).call("PUT", f"/devices/{device}/pin", {"model": ref})
    d = out["desired"]
    console.print(f"{device}: generation {out['desired_generation']} -> {d['model']}@"
                  f"{d['version']} ({d['variant']}); edgefleet devices to watch it install")


@devices.command("unpin")
@api_options
@click.argument("device")
def devices_unpin(controller: str, token: str | None, device: str) -> None:
    """Make DEVICE run no model."""
    out = make_api(controller, token).call("DELETE", f"/devices/{device}/pin")
    console.print(f"{device}: generation {out['desired_generation']} -> no model")


@main.command()
@api_options
@click.option("--watch", is_flag=True, help="Refresh every second until Ctrl-C.")
@click.option("--json", "as_json", is_flag=True)
def status(controller: str, token: str | None, watch: bool, as_json: bool) -> None:
    """Fleet summary and the active rollouts with their progress."""
    api = make_api(controller, token)

    def fetch() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        rollouts = api.call("GET", "/rollouts?limit=50")
        return (api.call("GET", "/fleet/summary"),
                [r for r in rollouts if r["active"]])

    summary, active = fetch()
    if as_json:
        click.echo(json.dumps({**summary, "active_rollouts": active}, indent=2))
        return
    if not watch:
        console.print(status_view(summary, active))
        return
    with Live(status_view(summary, active), console=console, refresh_per_second=2) as live:
        try:
            while True:
                time.sleep(1)
                live.update(status_view(*fetch()))
        except KeyboardInterrupt:
            pass


@main.command()
@api_options
@click.option("--actor", help="Only what this token name (or enrol-token:ID) did.")
@click.option("--action", help="An action (rollout.pause) or a family (rollout).")
@click.option("--target", help="Only entries about this device, rollout or NAME@VERSION.")
@click.option("--since", help="Only the last 30m, 1h, 7d ...")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def audit(controller: str, token: str | None, actor: str | None, action: str | None,
          target: str | None, since: str | None, limit: int, as_json: bool) -> None:
    """Who changed what, when and from where (operator role), newest first."""
    from urllib.parse import urlencode

    params: dict[str, Any] = {"actor": actor, "action": action, "target": target,
                              "limit": limit}
    if since is not None:
        start = time.time() - parse_duration(since)
        params["since"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start))
    query = urlencode({k: v for k, v in params.items() if v is not None})
    out = make_api(controller, token).call("GET", f"/audit?{query}")
    click.echo(json.dumps(out, indent=2)) if as_json else console.print(audit_table(out))


@main.group("enroll-token")
def enroll_token() -> None:
    """Enrolment tokens for new devices."""


@enroll_token.command("create")
@api_options
@click.option("--expires", default="1h", show_default=True, help="Lifetime: 30m, 1h, 7d ...")
@click.option("--uses", type=click.IntRange(1, 100_000), default=1, show_default=True,
              help="How many devices may enrol with it.")
@click.option("--label", "labels", multiple=True, help="KEY=VALUE given to enrolled devices.")
@click.option("--json", "as_json", is_flag=True)
def enroll_token_create(controller: str, token: str | None, expires: str, uses: int,
                        labels: tuple[str, ...], as_json: bool) -> None:
    """Create an enrolment token (printed once)."""
    body = {"expires_in_s": parse_duration(expires), "uses": uses, "labels": parse_labels(labels)}
    out = make_api(controller, token).call("POST", "/enroll-tokens", body)
    click.echo(json.dumps(out, indent=2) if as_json else out["token"])


@main.group("token")
def api_token() -> None:
    """API tokens for people and scripts (admin only)."""


@api_token.command("create")
@api_options
@click.option("--name", required=True)
@click.option("--role", type=click.Choice(["viewer", "operator", "admin"]), required=True)
@click.option("--json", "as_json", is_flag=True)
def api_token_create(controller: str, token: str | None, name: str, role: str,
                     as_json: bool) -> None:
    """Create an API token (printed once)."""
    out: dict[str, Any] = make_api(controller, token).call("POST", "/tokens",
                                                           {"name": name, "role": role})
    click.echo(json.dumps(out, indent=2) if as_json else out["token"])


@main.group()
def model() -> None:
    """The model registry."""


@model.command("push")
@api_options
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", required=True, help="Model name (lowercase, digits, . _ -).")
@click.option("--version", "version", required=True, help="Semantic version, e.g. 1.2.0.")
@click.option("--samples", "samples", multiple=True, metavar="FILE|INPUT=FILE.npy",
              help="Sample inputs that derivation and fidelity run on: a .npz (arrays named "
              "by input, samples along the first axis), INPUT=FILE.npy, or a JSON list of "
              "{input: values}. Repeat for several files.")
@click.option("--input", "declared", multiple=True, metavar="NAME=SPEC",
              help="Declare an input for generated samples: float32[1,3,320,320], "
              "int64:16000, int64[1,16]:0..30522, zeros, zeros[2,1,64].")
@click.option("--variants", default=None, metavar="A,B",
              help="Derived variants to build (onnx: int8, int8_static, int8_dynamic, fp16; "
              "gguf: q8_0, q4_k_m, ...). Default: int8 for fp32 ONNX, q8_0,q4_k_m for GGUF.")
@click.option("--no-derive", is_flag=True, help="Build no derived variants: the source only.")
@click.option("--min-fidelity", default=None, metavar="METRIC>=X,...",
              help="Quality floor, e.g. cosine>=0.99: a variant below it is refused.")
@click.option("--metric", default=None, help="The fidelity metric that describes this model "
              "(cosine, top1, iou; default: chosen from its outputs).")
@click.option("--text", "text_file", type=click.Path(exists=True, dir_okay=False,
              path_type=Path), help="GGUF language models: a UTF-8 text (up to 256 KiB) "
              "to measure perplexity on, source against each variant (default: the smoke "
              "prompts). A floor can then name it: --min-fidelity perplexity>=0.95.")
@click.option("--smoke-test", "smoke_file", type=click.Path(exists=True, dir_okay=False,
              path_type=Path), help="JSON: inputs, expected (optional), tolerance, "
              "latency_budget_ms. Without it, the samples (or generated inputs) are used.")
@click.option("--encoder", "encoder_dir", type=click.Path(exists=True, file_okay=False,
              path_type=Path), help="ONNX sentence encoders: a sentence-transformers model "
              "directory whose tokenizer, pooling, normalization and longest input are "
              "written into the uploaded model, so devices serve it on /v1/embeddings.")
@click.option("--labels", "labels", multiple=True, metavar="KEY=VALUE")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait for the smoke test and derived variants to be built.")
@click.option("--json", "as_json", is_flag=True)
def model_push(controller: str, token: str | None, file: Path, name: str, version: str,
               samples: tuple[str, ...], declared: tuple[str, ...], variants: str | None,
               no_derive: bool, min_fidelity: str | None, metric: str | None,
               text_file: Path | None, smoke_file: Path | None, encoder_dir: Path | None,
               labels: tuple[str, ...], wait: bool, as_json: bool) -> None:
    """Upload FILE (ONNX or GGUF) as NAME@VERSION; it is validated and signed, then run
    on sample inputs, and its derived variants are built and compared in the
    background."""
    body: dict[str, Any] = {"labels": parse_labels(labels), "derive": not no_derive,
                            "inputs": _declarations(declared),
                            **_push_options(variants, min_fidelity, metric, text_file,
                                            smoke_file)}
    api = make_api(controller, token)
    if samples:
        body["samples"] = _upload_samples(api, samples, quiet=as_json)
    with _one_file(file, encoder_dir, quiet=as_json) as upload:
        if not as_json:
            console.print(f"uploading {file.name} ({upload.stat().st_size:,} bytes)")
        uploaded = api.upload("/uploads", upload, params={"filename": file.name})
    out = api.call("POST", f"/models/{name}/versions/{version}",
                   body | {"upload": uploaded["sha256"]})
    if wait:
        out = _wait_for_job(api, f"/models/{name}/versions/{version}", quiet=as_json)
    if as_json:
        click.echo(json.dumps(out, indent=2))
    else:
        console.print(versions_table([out]))
        for refused in out.get("refused", []):
            console.print(f"[yellow]{refused['name']} not offered:[/] {refused['reason']}")
    if out["status"] == "failed":
        sys.exit(1)


def _push_options(variants: str | None, min_fidelity: str | None, metric: str | None,
                  text_file: Path | None, smoke_file: Path | None) -> dict[str, Any]:
    """The push's optional fields, as given."""
    body: dict[str, Any] = {}
    if variants is not None:
        body["variants"] = [v.strip() for v in variants.split(",") if v.strip()]
    if min_fidelity is not None:
        body["min_fidelity"] = min_fidelity
    if metric is not None:
        body["metric"] = metric
    if text_file is not None:
        try:
            body["text"] = text_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise click.BadParameter(f"{text_file} is not UTF-8 text: {exc}") from None
    if smoke_file is not None:
        try:
            body["smoke_test"] = json.loads(smoke_file.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise click.BadParameter(f"{smoke_file} is not JSON: {exc}") from None
    return body


@contextlib.contextmanager
def _one_file(file: Path, encoder_dir: Path | None, *, quiet: bool) -> Iterator[Path]:
    """``file``, or an ONNX model with its external data files folded in (an upload is
    one file) and ``encoder_dir``'s embedding config written in (``shared.encoder``)."""
    if file.suffix.lower() != ".onnx":
        if encoder_dir is not None:
            raise click.BadParameter("only an ONNX model takes it (a GGUF encoder "
                                     "declares its own pooling)", param_hint="--encoder")
        yield file
        return
    import tempfile

    from controller.registry.inspect import InvalidModel, prepare_upload
    from shared import encoder

    try:
        metadata = encoder.from_sentence_transformers(encoder_dir) if encoder_dir else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--encoder") from None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / file.name
        try:
            changed = prepare_upload(file, out, metadata=metadata)
        except InvalidModel as exc:
            raise click.ClickException(f"{file}: {exc}") from None
        if changed and not quiet:
            console.print(f"wrote {encoder_dir}'s tokenizer and pooling into the upload"
                          if metadata else
                          f"folded {file.name}'s external data into the upload")
        yield out if changed else file


def _declarations(declared: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in declared:
        name, sep, spec = item.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{item!r} is not NAME=SPEC", param_hint="--input")
        out[name] = spec
    return out


def _upload_samples(api: Any, given: tuple[str, ...], *, quiet: bool) -> str:
    import tempfile

    from controller.registry.inputs import InputError, samples_from_files

    try:
        data = samples_from_files(list(given))
    except InputError as exc:
        raise click.BadParameter(str(exc), param_hint="--samples") from None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "samples.npz"
        path.write_bytes(data)
        if not quiet:
            console.print(f"uploading samples ({len(data):,} bytes)")
        return str(api.upload("/uploads", path, params={"kind": "samples"})["sha256"])


def _wait_for_job(api: Any, path: str, *, quiet: bool) -> Any:
    """Poll a version until its job is done, showing progress on the terminal."""
    with console.status("", spinner="dots") as status:
        while True:
            out = api.call("GET", path)
            job = out.get("job") or {}
            if out["status"] != "processing":
                return out
            if not quiet:
                status.update(f"{job.get('progress', 0):.0%} {job.get('message', '')}")
            time.sleep(0.5)


@model.command("delete")
@api_options
@click.argument("ref", metavar="NAME@VERSION")
def model_delete(controller: str, token: str | None, ref: str) -> None:
    """Delete a version no device runs."""
    name, version = _split_ref(ref)
    make_api(controller, token).call("DELETE", f"/models/{name}/versions/{version}")
    console.print(f"deleted {name}@{version}")


def _split_ref(ref: str) -> tuple[str, str]:
    name, sep, version = ref.partition("@")
    if not sep:
        raise click.BadParameter(f"{ref!r} is not NAME@VERSION")
    return name, version


@model.command("list")
@api_options
@click.option("--json", "as_json", is_flag=True)
def model_list(controller: str, token: str | None, as_json: bool) -> None:
    """List model versions and their variants."""
    out = make_api(controller, token).call("GET", "/models")
    click.echo(json.dumps(out, indent=2)) if as_json else console.print(versions_table(out))


@model.command("show")
@api_options
@click.argument("ref", metavar="NAME@VERSION")
@click.option("--json", "as_json", is_flag=True)
def model_show(controller: str, token: str | None, ref: str, as_json: bool) -> None:
    """Show one version with its variants."""
    name, version = _split_ref(ref)
    out = make_api(controller, token).call("GET", f"/models/{name}/versions/{version}")
    click.echo(json.dumps(out, indent=2)) if as_json else console.print(versions_table([out]))
