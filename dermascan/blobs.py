"""Content-addressed blob store: files named by their sha256 under the data directory.

Writes are atomic (temporary file in the same folder, fsync, rename), so a crash never leaves a
half-written blob under a real name; reads check the sha256, so a damaged file is never scored.
Web processes and workers share the folder (a volume in docker-compose).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


class BlobError(Exception):
    pass


class BlobNotFound(BlobError):
    pass


class BlobCorrupt(BlobError):
    pass


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class BlobStore:
    def __init__(self, root: Path | str):
        self.root = Path(root)
        self._folders: set[Path] = set()

    def path(self, digest: str) -> Path:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise BlobError(f"not a sha256 hex digest: {digest!r}")
        return self.root / digest[:2] / digest  # 256 folders, as git's object store

    def put(self, data: bytes, durable: bool = True) -> str:
        """Store ``data`` (idempotent) and return its sha256.

        With ``durable=False`` the file is written and renamed into place but not yet flushed to
        disk: the caller must call :meth:`sync` on the digests before it reports them stored
        (bulk paths flush many files concurrently, which the file system commits together)."""
        digest = sha256_hex(data)
        target = self.path(digest)
        if target.exists():
            return digest
        if target.parent not in self._folders:
            target.parent.mkdir(parents=True, exist_ok=True)
            self._folders.add(target.parent)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                if durable:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if durable:
            _fsync_dir(target.parent)
        return digest

    def sync(self, digests, workers: int = 16) -> None:
        """Flush blobs written with ``durable=False`` (files, then their folders) to disk."""
        from concurrent.futures import ThreadPoolExecutor

        paths = [self.path(d) for d in dict.fromkeys(digests)]
        if len(paths) <= 2:  # a thread costs more than one fsync
            for path in paths:
                _fsync_file(path)
            for folder in {p.parent for p in paths}:
                _fsync_dir(folder)
            return
        with ThreadPoolExecutor(min(workers, len(paths))) as pool:
            list(pool.map(_fsync_file, paths))
            list(pool.map(_fsync_dir, {p.parent for p in paths}))

    def get(self, digest: str) -> bytes:
        """Read a blob and verify it against its name."""
        try:
            data = self.path(digest).read_bytes()
        except FileNotFoundError:
            raise BlobNotFound(f"blob {digest} is missing from {self.root}") from None
        if sha256_hex(data) != digest:
            raise BlobCorrupt(f"blob {digest} is damaged (its content no longer matches its sha256)")
        return data

    def exists(self, digest: str) -> bool:
        return self.path(digest).exists()

    def delete(self, digest: str) -> bool:
        """Remove a blob (retention); False when it was not there."""
        try:
            self.path(digest).unlink()
        except FileNotFoundError:
            return False
        return True


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make a rename into ``path`` durable (POSIX: fsync the folder)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
