#!/bin/sh
# Build dist/edgefleet-agent_<version>_<arch>.deb with dpkg-deb (make deb), or with
# LLM=1 dist/edgefleet-agent-llm_<version>_<arch>.deb, the same with llama.cpp
# (llama-cpp-python) for GGUF models, which replaces the other (make deb LLM=1):
#   /opt/edgefleet/venv                  the agent in its own virtual environment
#   /usr/bin/edgefleet                   a link to its entry point
#   /lib/systemd/system/edgefleet-agent.service
#   /etc/default/edgefleet-agent         a conffile: local edits survive upgrades
#   /usr/share/doc/<package>/            copyright, changelog.gz; man page edgefleet(1)
# The venv's files are made plain (0644 but its bin/) and the
# package depends on the shared libraries they need (dpkg-shlibdeps). It passes
# lintian but for the tags packaging/lintian-overrides justifies.
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
package=edgefleet-agent
extras=agent
if [ "${LLM:-0}" = 1 ]; then
    package=edgefleet-agent-llm
    extras=agent,llm
fi

for tool in dpkg-deb dpkg-shlibdeps; do
    command -v "$tool" >/dev/null || { echo "build-deb: $tool is needed (apt-get install dpkg-dev)" >&2; exit 1; }
done
version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/pyproject.toml")"
arch="$(dpkg --print-architecture)"
pyver="$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
next="$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1] + 1}")')"
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT

echo "build-deb: $package: the agent into $venv (Python $pyver)"
"$python" -m venv "$stage$venv"
"$stage$venv/bin/python" -m pip install --quiet --upgrade pip
"$stage$venv/bin/python" -m pip install --quiet "$root[$extras]"
# The venv was built under the staging dir: point its scripts at the installed path.
grep -rlI "$stage" "$stage$venv/bin" "$stage$venv/pyvenv.cfg" | while read -r f; do
    sed -i "s|$stage||g" "$f"
done
find "$stage$venv" -name __pycache__ -prune -exec rm -rf {} +
# Plain files: the wheels' modes vary (executable modules and libraries); numpy's own
# tests and a vendored .gitignore are not needed to run.
find "$stage$venv" -path "*/site-packages/numpy/*" -type d -name tests -prune -exec rm -rf {} +
find "$stage$venv" -name .gitignore -delete
find "$stage$venv" -type f ! -path "$stage$venv/bin/*" -exec chmod 0644 {} +
elves="$(find "$stage$venv" -type f -name '*.so*' -exec sh -c \
    'head -c 4 "$1" | grep -q ELF && echo "$1"' _ {} \;)"

doc="$stage/usr/share/doc/$package"
mkdir -p "$stage/usr/bin" "$stage/lib/systemd/system" "$stage/etc/default" \
         "$stage/opt/edgefleet/docs" "$stage/DEBIAN" "$doc" "$stage/usr/share/man/man1" \
         "$stage/usr/share/lintian/overrides"
ln -s "$venv/bin/edgefleet" "$stage/usr/bin/edgefleet"
install -m 0644 "$here/edgefleet-agent.service" "$stage/lib/systemd/system/"
install -m 0644 "$here/edgefleet-agent.default" "$stage/etc/default/edgefleet-agent"
install -m 0644 "$root/docs/operator-guide.md" "$stage/opt/edgefleet/docs/"
for script in postinst prerm postrm; do
    install -m 0755 "$here/debian/$script" "$stage/DEBIAN/$script"
done
echo /etc/default/edgefleet-agent > "$stage/DEBIAN/conffiles"
install -m 0644 "$here/lintian-overrides" "$stage/usr/share/lintian/overrides/$package"
gzip -9n < "$here/edgefleet.1" > "$stage/usr/share/man/man1/edgefleet.1.gz"
cat > "$doc/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: edgefleet
Source: https://edgefleet.invalid

Files: *
Copyright: 2026 the edgefleet developers
License: Apache-2.0
 On Debian systems the full text of the Apache License, Version 2.0, is in
 /usr/share/common-licenses/Apache-2.0.

Files: opt/edgefleet/venv/*
Copyright: 2026 the authors of each bundled Python package
License: various
 The Python packages the agent runs on, each under its own license, which its
 *.dist-info directory in opt/edgefleet/venv/lib/python*/site-packages holds.
COPYRIGHT
changed="$(git -C "$root" log -1 --format=%cD 2>/dev/null || date -R)"
gzip -9n > "$doc/changelog.gz" <<CHANGELOG
$package ($version) unstable; urgency=medium

  * Built from the edgefleet repository with make deb.

 -- edgefleet developers <dev@edgefleet.invalid>  $changed
CHANGELOG
# the shared libraries the venv's ELF objects need, as Debian packages
shlibs="$(mktemp -d)"
mkdir "$shlibs/debian"
printf 'Source: edgefleet\n\nPackage: %s\nArchitecture: any\n' "$package" \
    > "$shlibs/debian/control"
libdirs="$(for f in $elves; do dirname "$f"; done | sort -u | sed 's/^/-l/')"
# shellcheck disable=SC2086 # one argument per library directory and object
libs="$(cd "$shlibs" && dpkg-shlibdeps -O --ignore-missing-info $libdirs \
    $(for f in $elves; do echo "-e$f"; done) 2>/dev/null | sed -n 's/^shlibs:Depends=//p')"
rm -rf "$shlibs"
if [ "$package" != edgefleet-agent ]; then
    relations="Provides: edgefleet-agent
Conflicts: edgefleet-agent
Replaces: edgefleet-agent"
else
    relations="Conflicts: edgefleet-agent-llm"
fi
size="$(du -sk --exclude=DEBIAN "$stage" | cut -f1)"
cat > "$stage/DEBIAN/control" <<CONTROL
Package: $package
Version: $version
Architecture: $arch
Maintainer: edgefleet developers <dev@edgefleet.invalid>
Depends: python3 (>= $pyver), python3 (<< $next), adduser, $libs
$relations
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
deb="$out/${package}_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zgzip --build "$stage" "$deb" >/dev/null
echo "build-deb: $deb"
