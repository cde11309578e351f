"""The agent's .deb (make deb): contents, a working relocated venv, the unit, and the
maintainer scripts run against a scratch root (DPKG_ROOT) with the system tools they
call replaced by recorders."""

import itertools
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import unavailable

ROOT = Path(__file__).resolve().parents[2]


def build(tmp_path_factory: pytest.TempPathFactory, *make_args: str) -> Path:
    for tool in ("dpkg-deb", "dpkg-shlibdeps", "systemd-analyze", "lintian"):
        if shutil.which(tool) is None:
            unavailable(f"{tool} (apt-get install dpkg-dev systemd lintian)")
    if not Path("/usr/bin/python3").exists():
        unavailable("Debian's /usr/bin/python3 (apt-get install python3-venv)")
    out = tmp_path_factory.mktemp("deb")
    subprocess.run(["make", "deb", f"DIST={out}", *make_args], cwd=ROOT, check=True,
                   timeout=1800, capture_output=True)
    return next(out.glob("edgefleet-agent*.deb"))


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory)


@pytest.fixture(scope="module")
def llm_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory, "LLM=1")


def lintian(deb: Path) -> subprocess.CompletedProcess[str]:
    """lintian as Debian's archive runs it, failing on warnings too; the package's own
    overrides (packaging/lintian-overrides, each with its reason) apply."""
    return subprocess.run(["lintian", "--fail-on", "warning", "--tag-display-limit", "0",
                           str(deb)], capture_output=True, text=True, timeout=600,
                          check=False)


def dpkg_deb(*args: str) -> str:
    return subprocess.run(["dpkg-deb", *args], capture_output=True, text=True, check=True,
                          timeout=120).stdout


def test_deb_holds_the_agent_in_its_own_venv_the_unit_and_a_conffile(
        deb: Path, tmp_path: Path) -> None:
    assert dpkg_deb("--field", str(deb), "Package").strip() == "edgefleet-agent"
    assert "python3 (>= 3.11)" in dpkg_deb("--field", str(deb), "Depends")
    listing = dpkg_deb("--contents", str(deb))
    assert "root/root" in listing.splitlines()[0]
    for path in ("./opt/edgefleet/venv/bin/edgefleet",
                 "./lib/systemd/system/edgefleet-agent.service", "./etc/default/edgefleet-agent",
                 "./opt/edgefleet/docs/operator-guide.md",
                 "./usr/bin/edgefleet -> /opt/edgefleet/venv/bin/edgefleet"):
        assert path in listing, path
    assert "agent.toml" not in listing  # enrolment writes it; the package never does

    tree, control = tmp_path / "tree", tmp_path / "control"
    dpkg_deb("-x", str(deb), str(tree))
    dpkg_deb("-e", str(deb), str(control))
    assert (control / "conffiles").read_text() == "/etc/default/edgefleet-agent\n"
    venv = tree / "opt/edgefleet/venv"
    assert (venv / "bin/edgefleet").read_text().splitlines()[0] == \
        "#!/opt/edgefleet/venv/bin/python"
    assert str(tmp_path.parent) not in (venv / "pyvenv.cfg").read_text()
    check = subprocess.run(
        [str(venv / "bin/python"), "-c",
         "import agent.daemon, onnxruntime, paho.mqtt.client, tuf.ngclient, cli.main\n"
         "import importlib.util as u; assert u.find_spec('fastapi') is None, 'controller deps'"],
        capture_output=True, text=True, timeout=120, check=False)
    assert check.returncode == 0, check.stderr

    unit = tmp_path / "edgefleet-agent.service"  # as installed, with the venv where it is
    unit.write_text((tree / "lib/systemd/system/edgefleet-agent.service").read_text()
                    .replace("/opt/edgefleet/venv", str(venv)))
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert verify.returncode == 0, verify.stderr


@pytest.mark.parametrize("flavour", ["deb", "llm_deb"])
def test_both_packages_pass_lintian_but_for_the_tags_packaging_justifies(
        request: pytest.FixtureRequest, flavour: str) -> None:
    deb = request.getfixturevalue(flavour)
    done = lintian(deb)
    assert done.returncode == 0, done.stdout
    depends = dpkg_deb("--field", str(deb), "Depends")
    for library in ("libc6 (>=", "libstdc++6 (>=", "libgcc-s1 (>="):  # the wheels' .so
        assert library in depends, depends
    listing = dpkg_deb("--contents", str(deb))
    package = dpkg_deb("--field", str(deb), "Package").strip()
    for path in (f"./usr/share/doc/{package}/copyright", f"./usr/share/doc/{package}/changelog.gz",
                 "./usr/share/man/man1/edgefleet.1.gz",
                 f"./usr/share/lintian/overrides/{package}"):
        assert path in listing, path
    # every override says why: each group of them opens with its reason
    overrides = (ROOT / "packaging/lintian-overrides").read_text().splitlines()
    assert overrides[0].startswith("#")
    for before, line in itertools.pairwise(overrides):
        assert before.strip() or line.startswith("#") or not line.strip(), line


def test_the_llm_package_runs_gguf_models_and_replaces_the_plain_one(
        llm_deb: Path, tmp_path: Path) -> None:
    from tests.models import tiny_gguf

    assert dpkg_deb("--field", str(llm_deb), "Package").strip() == "edgefleet-agent-llm"
    for field in ("Provides", "Conflicts", "Replaces"):
        assert dpkg_deb("--field", str(llm_deb), field).strip() == "edgefleet-agent"
    tree = tmp_path / "tree"
    dpkg_deb("-x", str(llm_deb), str(tree))
    model = tmp_path / "tiny.gguf"
    tiny_gguf(model)
    run = subprocess.run(
        [str(tree / "opt/edgefleet/venv/bin/python"), "-c",
         "import sys\nfrom agent.runtime import _load\n"
         "llm = _load(sys.argv[1], 'gguf')\n"
         "print(len(llm.generate('The quick', 4)), llm.describe()['context'])", str(model)],
        capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["4", "512"]


def recorder(bin_dir: Path, name: str, body: str = "") -> None:
    script = bin_dir / name
    script.write_text(f'#!/bin/sh\necho "{name} $*" >> "$RECORD"\n{body}\n')
    script.chmod(0o755)


def test_maintainer_scripts_create_the_user_and_keep_the_enrolment(
        deb: Path, tmp_path: Path) -> None:
    control, root, bin_dir = tmp_path / "control", tmp_path / "root", tmp_path / "bin"
    dpkg_deb("-e", str(deb), str(control))
    bin_dir.mkdir()
    record = tmp_path / "record"
    recorder(bin_dir, "getent", '[ -f "$USER_EXISTS" ] && exit 0; exit 2')
    recorder(bin_dir, "adduser", 'touch "$USER_EXISTS"')
    recorder(bin_dir, "systemctl")
    # install(1) without -o/-g: the scratch root has no edgefleet user to chown to
    recorder(bin_dir, "install", "args=''; skip=0\nfor a in \"$@\"; do\n"
             "  if [ $skip = 1 ]; then skip=0; continue; fi\n"
             "  case \"$a\" in -o|-g) skip=1 ;; *) args=\"$args '$a'\" ;; esac\n"
             "done\neval exec /usr/bin/install $args")
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "DPKG_ROOT": str(root),
           "RECORD": str(record), "USER_EXISTS": str(tmp_path / "user")}

    def run(script: str, *args: str) -> str:
        done = subprocess.run([str(control / script), *args], env=env, capture_output=True,
                              text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout

    first = run("postinst", "configure")
    assert "edgefleet agent enroll --controller URL --token T --owner edgefleet" in first
    assert "adduser --system --group --home /var/lib/edgefleet" in record.read_text()
    assert stat.S_IMODE((root / "etc/edgefleet").stat().st_mode) == 0o750
    assert stat.S_IMODE((root / "var/lib/edgefleet").stat().st_mode) == 0o700

    config = root / "etc/edgefleet/agent.toml"
    config.write_text('state_dir = "/var/lib/edgefleet"\n')  # enrolled meanwhile
    record.write_text("")
    run("prerm", "upgrade", "0.1.0")
    upgrade = run("postinst", "configure", "0.1.0")
    assert "enroll" not in upgrade
    assert "adduser" not in record.read_text()  # the user exists
    assert config.read_text() == 'state_dir = "/var/lib/edgefleet"\n'
    assert "systemctl" not in record.read_text()  # never on a DPKG_ROOT install

    run("postrm", "remove")
    assert config.exists()  # a plain remove keeps the enrolment
    run("postrm", "purge")
    assert not (root / "etc/edgefleet").exists()
    assert not (root / "var/lib/edgefleet").exists()
