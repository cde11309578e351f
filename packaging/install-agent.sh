#!/bin/sh
# Install the edgefleet agent on an edge box: its own virtual environment under
# /opt/edgefleet, the config, the enrolment, and the systemd service.
#
#   sudo sh install-agent.sh --controller https://fleet.example:8080 --token eft_... \
#        [--wheel edgefleet-0.1.0-py3-none-any.whl | --index-url URL] [--llm]
#        [--name NAME] [--label KEY=VALUE]... [--prefix DIR] [--no-start]
#
# Re-running it upgrades the agent and keeps the config and identity (no new enrolment).
# --prefix installs everything under DIR instead of / (a test, a second agent on one
# box): every path written, the service's included, points inside DIR; the service
# is written but not started, and no system user is created.
set -eu

prefix=""
controller=""
token=""
wheel=""
index_url=""
extras="agent"
name=""
labels=""
start=1
python="${PYTHON:-python3}"

die() { echo "install-agent: $*" >&2; exit 1; }
say() { echo "install-agent: $*"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --controller) controller="$2"; shift 2 ;;
        --token) token="$2"; shift 2 ;;
        --wheel) wheel="$2"; shift 2 ;;
        --index-url) index_url="$2"; shift 2 ;;
        --llm) extras="agent,llm"; shift ;;
        --name) name="$2"; shift 2 ;;
        --label) labels="$labels --label $2"; shift 2 ;;
        --prefix) prefix="${2%/}"; shift 2 ;;
        --no-start) start=0; shift ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

opt="$prefix/opt/edgefleet"
venv="$opt/venv"
etc="$prefix/etc/edgefleet"
config="$etc/agent.toml"
state="$prefix/var/lib/edgefleet"
unit_dir="$prefix/etc/systemd/system"
here="$(cd "$(dirname "$0")" && pwd)"

[ -n "$prefix" ] || [ "$(id -u)" = 0 ] || die "run as root (or pass --prefix DIR)"
"$python" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
    || die "$python 3.11 or newer with the venv module is needed (apt-get install python3-venv)"
if [ ! -f "$config" ]; then
    [ -n "$controller" ] || die "--controller URL is needed to enrol this box"
    [ -n "$token" ] || die "--token is needed to enrol this box (edgefleet enroll-token create)"
fi
[ -z "$wheel" ] || [ -f "$wheel" ] || die "no wheel at $wheel"

say "installing the agent into $venv"
mkdir -p "$opt"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
if [ -n "$wheel" ]; then
    spec="$(cd "$(dirname "$wheel")" && pwd)/$(basename "$wheel")[$extras]"
else
    spec="edgefleet[$extras]"
fi
if [ -n "$index_url" ]; then
    "$venv/bin/python" -m pip install --quiet --upgrade --index-url "$index_url" "$spec"
else
    "$venv/bin/python" -m pip install --quiet --upgrade "$spec"
fi
"$venv/bin/edgefleet" --help >/dev/null || die "the installed agent does not run"

mkdir -p "$etc" "$state" "$unit_dir"
chmod 0700 "$state"
owner=""
if [ -z "$prefix" ]; then  # the service's own system user
    getent passwd edgefleet >/dev/null || useradd --system --home-dir /var/lib/edgefleet \
        --shell /usr/sbin/nologin --user-group edgefleet
    chown edgefleet:edgefleet "$state"
    chown root:edgefleet "$etc"
    chmod 0750 "$etc"
    owner="--owner edgefleet"
fi
if [ -f "$config" ]; then
    say "keeping $config (already enrolled)"
else
    say "enrolling with $controller"
    # shellcheck disable=SC2086 # labels and owner are split into options on purpose
    "$venv/bin/edgefleet" agent enroll --controller "$controller" --token "$token" \
        --config "$config" --state-dir "$state" ${name:+--name "$name"} $labels $owner \
        || die "enrolment failed (see above); nothing was started"
fi

sed -e "s|/opt/edgefleet/|$opt/|g" -e "s|/etc/edgefleet/|$etc/|g" \
    -e "s|/etc/default/|$prefix/etc/default/|g" "$here/edgefleet-agent.service" \
    > "$unit_dir/edgefleet-agent.service"
chmod 0644 "$unit_dir/edgefleet-agent.service"
[ -f "$prefix/etc/default/edgefleet-agent" ] || {
    mkdir -p "$prefix/etc/default"
    install -m 0644 "$here/edgefleet-agent.default" "$prefix/etc/default/edgefleet-agent"
}

if [ -z "$prefix" ] && [ "$start" = 1 ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable edgefleet-agent
    systemctl restart edgefleet-agent
    say "the agent is running: systemctl status edgefleet-agent; journalctl -u edgefleet-agent"
else
    say "installed; start it with: systemctl daemon-reload && systemctl enable --now edgefleet-agent"
fi
