#!/bin/sh
# Build dist/edgefleet-agent_<version>_<arch>.deb with dpkg-deb (make deb):
#   /opt/edgefleet/venv                  the agent in its own virtual environment
#   /usr/bin/edgefleet                   a link to its entry point
#   /lib/systemd/system/edgefleet-agent.service
#   /etc/default/edgefleet-agent         a conffile: local edits survive upgrades
# The maintainer scripts (packaging/debian/) create the edgefleet user and never
# touch /etc/edgefleet/agent.toml, which `edgefleet agent enroll` writes.
# The venv is built against Debian's /usr/bin/python3, the interpreter the package
# depends on; PYTHON overrides it.
set -eu

here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
out="${1:-$root/dist}"
python="${PYTHON:-/usr/bin/python3}"
venv=/opt/edgefleet/venv

command -v dpkg-deb >/dev/null || { echo "build-deb: dpkg-deb is needed" >&2; exit 1; }
version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/pyproject.toml")"
arch="$(dpkg --print-architecture)"
pyver="$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
next="$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1] + 1}")')"
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT

echo "build-deb: the agent into $venv (Python $pyver)"
"$python" -m venv "$stage$venv"
"$stage$venv/bin/python" -m pip install --quiet --upgrade pip
"$stage$venv/bin/python" -m pip install --quiet "$root[agent]"
# The venv was built under the staging dir: point its scripts at the installed path.
grep -rlI "$stage" "$stage$venv/bin" "$stage$venv/pyvenv.cfg" | while read -r f; do
    sed -i "s|$stage||g" "$f"
done
find "$stage$venv" -name __pycache__ -prune -exec rm -rf {} +

mkdir -p "$stage/usr/bin" "$stage/lib/systemd/system" "$stage/etc/default" \
         "$stage/opt/edgefleet/docs" "$stage/DEBIAN"
ln -s "$venv/bin/edgefleet" "$stage/usr/bin/edgefleet"
install -m 0644 "$here/edgefleet-agent.service" "$stage/lib/systemd/system/"
install -m 0644 "$here/edgefleet-agent.default" "$stage/etc/default/edgefleet-agent"
install -m 0644 "$root/docs/operator-guide.md" "$stage/opt/edgefleet/docs/"
for script in postinst prerm postrm; do
    install -m 0755 "$here/debian/$script" "$stage/DEBIAN/$script"
done
echo /etc/default/edgefleet-agent > "$stage/DEBIAN/conffiles"
size="$(du -sk --exclude=DEBIAN "$stage" | cut -f1)"
cat > "$stage/DEBIAN/control" <<CONTROL
Package: edgefleet-agent
Version: $version
Architecture: $arch
Maintainer: edgefleet developers <dev@edgefleet.invalid>
Depends: python3 (>= $pyver), python3 (<< $next), adduser
Installed-Size: $size
Section: admin
Priority: optional
Homepage: https://edgefleet.invalid
Description: edgefleet agent: ML models on edge devices, verified and watched
 Pulls signed models over MQTT, verifies them with TUF, activates them
 atomically, smoke-tests them, serves local inference on 127.0.0.1 and reports
 health to an edgefleet controller. After installing, enrol the box:
   edgefleet agent enroll --controller URL --token T --owner edgefleet
   systemctl enable --now edgefleet-agent
CONTROL

mkdir -p "$out"
deb="$out/edgefleet-agent_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zgzip --build "$stage" "$deb" >/dev/null
echo "build-deb: $deb"
