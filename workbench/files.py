"""Files the workbench writes, hashes and shares: one atomic write, one hash, one content fingerprint, one lock.

    with atomic_write(path) as f:        # readers (and a run killed mid-write) see the old file or the new
        torch.save(state, f)             # one, never a part; fsynced, so it also survives a power cut
    sha256_file(path)                    # hex digest, streamed
    content_fingerprint({"train.json": ann, "img/1.png": img}, hash_cache)  # what the data *is*
    with locked(path, "training runs/x"):  # one process at a time; a dead holder's lock is free again
        ...

Everything here is POSIX (``os.replace`` is atomic within one file system, ``fcntl.flock`` locks).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (not every file system allows opening a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move the finished file ``src`` onto ``dst`` durably: fsync its data, ``os.replace``, fsync the folder.

    ``src`` must be on ``dst``'s file system (e.g. a temporary file beside it), or the move is a copy.
    """
    with open(src, "rb") as f:
        os.fsync(f.fileno())
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """Write ``path`` all at once: yields a binary file, which replaces ``path`` when the block ends.

    The data go to a temporary file beside ``path`` (``f.name`` is its path, e.g. to check a hash
    before it counts); on leaving the block it is fsynced and renamed over ``path``. On an
    exception the temporary file is removed and ``path`` is left as it was. The parent folder is
    created when missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with open(tmp, "wb") as f:
            yield f
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; the file it replaces was world-readable
        replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Temporary files :func:`atomic_write` left beside ``path`` when its process was killed mid-write."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 digest of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def source_digests(package: str | os.PathLike, exclude: Sequence[str] = ()) -> dict[str, str]:
    """sha256 of every ``.py`` and ``.cu`` file under ``package`` (relative path -> digest), leaving out
    the sub-folders named in ``exclude``: the code a cached result was computed with."""
    root = Path(package)
    files = sorted(p for p in root.rglob("*") if p.suffix in (".py", ".cu") and p.is_file())
    return {str(p.relative_to(root)): sha256_file(p) for p in files
            if p.relative_to(root).parts[0] not in exclude}


def content_fingerprint(files: Mapping[str, str | os.PathLike], hash_cache: str | os.PathLike | None = None) -> str:
    """16 hex digits naming the contents of ``files`` (name -> path): equal only if every file's bytes are.

    Each file counts by its name and sha256. With ``hash_cache`` (a JSON file, created when
    missing) a file whose size and modification time (ns) are those recorded there is not read
    again: the fast path that makes a second look at 100k images cost one ``stat`` each. A file
    replaced in place gets a new mtime, so it is hashed again; a file merely touched hashes to the
    same digest, so the fingerprint does not change.

    Raises:
        FileNotFoundError: naming the first file that does not exist.
    """
    cache: dict[str, list] = {}
    if hash_cache is not None and Path(hash_cache).is_file():
        with contextlib.suppress(ValueError, OSError):  # an unreadable cache only costs the hashing
            loaded = json.loads(Path(hash_cache).read_text())
            cache = loaded if isinstance(loaded, dict) else {}
    changed = False
    digest = hashlib.sha256()
    for name in sorted(files):
        path = os.fspath(files[name])  # plain strings: pathlib objects cost more than the stat itself
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: file not found (fingerprinting {name!r})") from None
        key = os.path.abspath(path)
        entry = cache.get(key)
        if not (isinstance(entry, list) and entry[:2] == [st.st_size, st.st_mtime_ns]):
            entry = [st.st_size, st.st_mtime_ns, sha256_file(path)]
            cache[key], changed = entry, True
        digest.update(json.dumps([name, entry[2]]).encode())
    if hash_cache is not None and changed:
        with atomic_write(hash_cache) as f:
            f.write(json.dumps(cache, separators=(",", ":")).encode())
    return digest.hexdigest()[:16]


def _holder(lock_path: Path) -> str:
    """Who holds ``lock_path``, as its holder wrote it there."""
    with contextlib.suppress(OSError, ValueError):
        info = json.loads(lock_path.read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"process {info['pid']} on {info['host']} ({info['what']}, since {since})"
    return "another process"


@contextlib.contextmanager
def locked(path: str | os.PathLike, what: str, poll_s: float = 1.0, say=print) -> Iterator[None]:
    """Hold the lock file ``path`` for the block: other processes asking for it wait until it is free.

    The lock is an ``fcntl.flock`` on ``path``, which the kernel drops when its holder exits in any
    way (also SIGKILL), so a lock left by a dead process is taken over at once. The file records
    the holder (pid, host, ``what``, start time); a waiting process says once what it waits for.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        waited = False
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    say(f"waiting for {path}: held by {_holder(path)}")
                    waited = True
                time.sleep(poll_s)
        try:
            f.seek(0)
            f.truncate()
            f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "what": what, "since": time.time()}))
            f.flush()
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
