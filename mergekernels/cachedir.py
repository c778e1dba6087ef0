"""Build-once cache directories (the testbeds): built into a scratch sibling, verified by a manifest
of sha256 hashes written last, renamed into place, so a reader never sees a half-built directory."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

MANIFEST_FILE = "manifest.json"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def umask() -> int:
    """The process's umask, read without changing it (Linux); 0o022 where it cannot be read."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def open_permissions(directory: Path) -> None:
    """Give a build the permissions the umask asks for: ``mkdtemp`` makes its directory 0700 and
    ``save_file`` its files 0600, which would hide a shared cache from other users."""
    mask = umask()
    for path in [directory, *directory.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def write_manifest(directory: Path, fields: dict, files: Iterable[str]) -> None:
    """Write ``fields`` plus the sha256 of every file in ``files`` as the manifest, atomically."""
    manifest = {**fields, "files": {name: sha256_file(directory / name) for name in files}}
    tmp = directory / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, directory / MANIFEST_FILE)


def read_manifest(directory: str | Path, fields: dict, files: Iterable[str]) -> dict | None:
    """The manifest of ``directory`` if it records ``fields``, exactly the files ``files`` and every
    file's hash still matches; None otherwise (missing, interrupted build, other recipe, damage)."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return None
    if any(manifest.get(key) != value for key, value in fields.items()):
        return None
    if set(manifest["files"]) != set(files):
        return None
    for name, digest in manifest["files"].items():
        path = directory / name
        if not path.is_file() or sha256_file(path) != digest:
            return None
    return manifest


def _install(
    built: Path, directory: Path, is_complete: Callable[[Path], bool], replace_complete: bool
) -> None:
    """Move the finished build ``built`` to ``directory``, replacing whatever is there; a complete
    directory that another process installed meanwhile is kept unless ``replace_complete``."""
    if not replace_complete and is_complete(directory):
        shutil.rmtree(built, ignore_errors=True)
        return
    if directory.exists() or directory.is_symlink():
        # A directory cannot be renamed over a non-empty one: move the old one aside first.
        trash = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
        try:
            os.rename(directory, trash / "old")
        except FileNotFoundError:  # another process moved it away meanwhile
            pass
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(built, directory)
    except OSError:
        # Another process installed its build in between: keep that one if it is complete.
        if not is_complete(directory):
            raise
        shutil.rmtree(built, ignore_errors=True)


def build(
    directory: Path, write: Callable[[Path], None], verify: Callable[[Path], dict | None], force: bool
) -> tuple[dict, bool]:
    """Return (manifest, built): ``verify(directory)``'s manifest if it passes and not ``force``;
    else ``write`` a new build into a scratch sibling (``.<name>.build-*``), install it and verify it.
    ``write`` must write the manifest last."""
    manifest = None if force else verify(directory)
    if manifest is not None:
        return manifest, False
    directory.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{directory.name}.build-", dir=directory.parent))
    try:
        write(scratch)
        open_permissions(scratch)
        _install(scratch, directory, lambda d: verify(d) is not None, replace_complete=force)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    manifest = verify(directory)
    if manifest is None:
        raise RuntimeError(f"the build just installed in {directory} does not verify")
    return manifest, True


def cache_root() -> Path:
    """``$MK_CACHE_DIR`` if set, else ``~/.cache/mergekernels``."""
    root = os.environ.get("MK_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "mergekernels"
