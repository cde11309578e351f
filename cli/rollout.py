"""``edgefleet rollout``: plan a staged rollout, watch it, pause, resume, abort, roll back.

Exit codes for scripts: ``rollout status`` exits 0 while a rollout is active or once it
completed, 3 if it was rolled back and 4 if it was aborted; ``--wait`` blocks until
the rollout ends (or pauses, exit 5) and exits with the same codes.
"""

import json
import sys
import time

import click
from rich.console import Console
from rich.live import Live

from cli.api import api_options, make_api, parse_labels
from cli.views import rollout_view

console = Console()
EXIT = {"rolled_back": 3, "aborted": 4, "paused": 5}
ENDED = ("completed", "rolled_back", "aborted")


def _numbers(pairs: tuple[str, ...]) -> dict[str, float]:
    out = {}
    for key, value in parse_labels(pairs).items():
        try:
            out[key] = float(value)
        except ValueError:
            raise click.BadParameter(f"{f'{key}={value}'!r}: {value!r} is not a number") from None
    return out


@click.group()
def rollout() -> None:
    """Staged rollouts with canaries, health gates and rollback."""


@rollout.command("create")
@api_options
@click.option("--model", required=True)
@click.option("--version", "version", required=True)
@click.option("--selector", "selector", multiple=True, metavar="KEY=VALUE",
              help="Device labels to match (all of them); repeatable. Default: every device.")
@click.option("--class", "classes", multiple=True, metavar="PATTERN",
              help="Device classes to include, e.g. 'arm64/*'; repeatable.")
@click.option("--stages", default="1%:10m,10%:30m,50%:1h,100%", show_default=True,
              help="Stages: a percent or a count of the target set, ':' a bake time.")
@click.option("--gate", "gates", multiple=True, metavar="NAME=VALUE",
              help="Gate threshold, e.g. max_install_failure_rate=0.05; repeatable.")
@click.option("--on-failure", type=click.Choice(["rollback", "pause"]), default="rollback",
              show_default=True)
@click.option("--max-concurrent", type=click.IntRange(1), help="Installs in flight at once.")
@click.option("--probes", "probe_every", metavar="DURATION",
              help="Idle devices: each canary and baseline device runs its model's smoke "
              "inputs once per DURATION (e.g. 1s) while a stage bakes, and the gates judge "
              "those probes instead of application traffic.")
@click.option("--probe-cpu", type=click.FloatRange(0, 1, min_open=True), default=0.1,
              show_default=True, help="With --probes: the most of a device's CPU they use.")
@click.option("--json", "as_json", is_flag=True)
def create(controller: str, token: str | None, model: str, version: str,
           selector: tuple[str, ...], classes: tuple[str, ...], stages: str,
           gates: tuple[str, ...], on_failure: str, max_concurrent: int | None,
           probe_every: str | None, probe_cpu: float, as_json: bool) -> None:
    """Ship MODEL@VERSION to the matching devices in stages."""
    body = {"model": model, "version": version, "selector": parse_labels(selector),
            "classes": list(classes), "stages": stages, "gates": _numbers(gates),
            "on_failure": on_failure, "max_concurrent": max_concurrent}
    if probe_every is not None:
        from controller.rollouts.plan import PlanError, parse_duration

        try:
            interval = parse_duration(probe_every, where="--probes")
        except PlanError as exc:
            raise click.BadParameter(exc.detail, param_hint="--probes") from None
        body["probes"] = {"interval_s": interval, "max_cpu_share": probe_cpu}
    out = make_api(controller, token).call("POST", "/rollouts", body)
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    console.print(f"rollout {out['id']}: {model}@{version} to {out['counts']['members']} "
                  f"devices, {len(out['stages'])} stages; "
                  f"edgefleet rollout status {out['id']} --watch")


@rollout.command("list")
@api_options
@click.option("--state", help="Only rollouts in this state.")
@click.option("--json", "as_json", is_flag=True)
def list_(controller: str, token: str | None, state: str | None, as_json: bool) -> None:
    """Rollouts, newest first."""
    out = make_api(controller, token).call("GET", f"/rollouts?state={state}" if state
                                           else "/rollouts")
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    for r in out:
        done = r["stages"][min(r["stage"], len(r["stages"]) - 1)]
        console.print(f"{r['id']}  {r['model']}@{r['version']}  {r['state']:<12} stage "
                      f"{r['stage'] + 1}/{len(r['stages'])}  {done['committed']}/"
                      f"{r['counts']['members']} committed  {r['reason']}")


@rollout.command("status")
@api_options
@click.argument("rollout_id")
@click.option("--watch", is_flag=True, help="Refresh every second until it ends or Ctrl-C.")
@click.option("--wait", is_flag=True, help="Block until it ends or pauses; exit code says how.")
@click.option("--json", "as_json", is_flag=True)
def status(controller: str, token: str | None, rollout_id: str, watch: bool, wait: bool,
           as_json: bool) -> None:
    """Stages with progress, per-class figures and the timeline."""
    api = make_api(controller, token)
    path = f"/rollouts/{rollout_id}"
    out = api.call("GET", path)
    if watch:
        with Live(rollout_view(out), console=console, refresh_per_second=2) as live:
            try:
                while out["state"] not in ENDED:
                    time.sleep(1)
                    out = api.call("GET", path)
                    live.update(rollout_view(out))
            except KeyboardInterrupt:
                pass
    while wait and out["state"] not in (*ENDED, "paused"):
        time.sleep(1)
        out = api.call("GET", path)
    if as_json:
        click.echo(json.dumps(out, indent=2))
    elif not watch:
        console.print(rollout_view(out))
    sys.exit(EXIT.get(out["state"], 0) if (wait or out["state"] in ENDED) else 0)


def _command(action: str, help_text: str) -> None:
    @rollout.command(action, help=help_text)
    @api_options
    @click.argument("rollout_id")
    @click.option("--reason", default="", help="Why, for the timeline and the audit log.")
    def command(controller: str, token: str | None, rollout_id: str, reason: str) -> None:
        out = make_api(controller, token).call("POST", f"/rollouts/{rollout_id}/{action}",
                                               {"reason": reason})
        console.print(f"rollout {rollout_id}: {out['state']} ({out['reason']})")


_command("pause", "Stop giving devices the target; installs under way finish.")
_command("resume", "Carry on where the rollout was paused.")
_command("abort", "Stop for good; devices keep what they have installed.")
_command("rollback", "Give every device the rollout touched its previous model back.")
