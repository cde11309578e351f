"""``edgefleet keys``: the TUF root key, which may live offline.

These commands work on the controller's data directory, not over the API: the root key
is the one secret the running controller should not need. Typical offline set-up::

    edgefleet keys generate /media/usb/root.pem          # on an offline machine
    edgefleet keys init --data-dir D --root-key /media/usb/root.pem
    edgefleet controller serve --data-dir D              # never sees root.pem

and later, to replace it (the new root is signed by the old and the new key, so devices
holding the old root accept it)::

    edgefleet keys rotate-root --data-dir D --old-key old.pem --new-key new.pem

Rotation writes only root metadata, so it is safe while the controller runs.
"""

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

DATA_DIR = click.option("--data-dir", type=click.Path(path_type=Path), default=Path(".edgefleet"),
                        show_default=True, help="The controller's data directory.")


def _key(path: Path) -> Any:
    from controller.registry.trust import TrustError, signer_from_pem

    try:
        return signer_from_pem(path.read_bytes())
    except (TrustError, ValueError) as exc:
        raise click.BadParameter(f"{path}: {exc}") from None


@click.group()
def keys() -> None:
    """The TUF root key: generate it offline, import it, rotate it."""


@keys.command("generate")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
def keys_generate(out: Path) -> None:
    """Write a new Ed25519 root key to OUT (mode 0600). Keep it offline."""
    from controller.registry.trust import new_signer
    from controller.security import write_secret_file

    if out.exists():
        raise click.BadParameter(f"{out} exists; not overwriting a key")
    signer, pem = new_signer()
    write_secret_file(out, pem)
    click.echo(f"wrote {out} (key id {signer.public_key.keyid[:16]})")


@keys.command("init")
@DATA_DIR
@click.option("--root-key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="The offline root key (from `keys generate`).")
def keys_init(data_dir: Path, root_key: Path) -> None:
    """Create the TUF repository with an offline root key, before the first `serve`."""
    from controller.registry.trust import TrustError, TrustRepository

    repo = TrustRepository(data_dir / "tuf")
    try:
        repo.initialize(now=datetime.now(UTC), root_signer=_key(root_key))
    except TrustError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"created the TUF repository in {repo.dir}; the root key stays in {root_key}")


@keys.command("rotate-root")
@DATA_DIR
@click.option("--old-key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The current root key, when it is kept offline.")
@click.option("--new-key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The new root key, kept offline. Without it a new key is made and stored "
                   "in the data directory.")
def keys_rotate_root(data_dir: Path, old_key: Path | None, new_key: Path | None) -> None:
    """Replace the root key; devices holding the old root accept the new one."""
    from controller.registry.trust import TrustError, TrustRepository, new_signer

    repo = TrustRepository(data_dir / "tuf")
    if not repo.exists():
        raise click.ClickException(f"no TUF repository in {repo.dir}")
    signer, pem = new_signer() if new_key is None else (_key(new_key), None)
    try:
        repo.rotate_root(signer, now=datetime.now(UTC), new_key_pem=pem,
                         old_root_signer=None if old_key is None else _key(old_key))
    except TrustError as exc:
        raise click.ClickException(f"{exc}; pass --old-key if the root key is offline") from None
    root = repo.load("root").signed
    where = "stored in the data directory" if pem else f"kept in {new_key}"
    click.echo(f"root version {root.version} is signed by the old and the new key "
               f"(key id {signer.public_key.keyid[:16]}, {where})")
