"""Content-addressed blob store: blobs named by their sha256, in one of two backends behind the
same small interface (put, sync, get, get_many, exists, delete):

- ``BlobStore``: files under the data directory (the embedded default, and one-host installs).
  Writes are atomic (temporary file in the same folder, fsync, rename), so a crash never leaves a
  half-written blob under a real name.
- ``S3BlobStore``: S3-compatible object storage (``DERMASCAN_BLOB_URL=s3://bucket/prefix``;
  endpoint, region and credentials from the environment as AWS and MinIO clients expect:
  ``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``…), through boto3. A PUT has
  succeeded (and is durable) before the row that names it commits: persist first, as on disk.

Either way every read checks the sha256, so a damaged blob is never scored; a store that cannot
be reached raises ``BlobUnavailable`` (the request is refused with 503, the worker retries),
never ``BlobNotFound``. ``blob_store(settings)`` picks the backend.
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


class BlobUnavailable(BlobError):
    """The store cannot be reached now: nothing is wrong with the blob, try again later."""


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

    def get_many(self, digests) -> list[bytes | BlobError]:
        """Each blob, or the error reading it (local files: read one after another)."""
        return [_get_or_error(self.get, d) for d in digests]

    def exists(self, digest: str) -> bool:
        return self.path(digest).exists()

    def delete(self, digest: str) -> bool:
        """Remove a blob (retention); False when it was not there."""
        try:
            self.path(digest).unlink()
        except FileNotFoundError:
            return False
        return True

    def listing(self):
        """Every blob in the store: (digest, seconds since it was last written)."""
        import time

        now = time.time()
        for folder in sorted(self.root.glob("??")) if self.root.is_dir() else []:
            for path in folder.iterdir():
                if len(path.name) == 64 and not path.name.startswith("."):
                    try:
                        yield path.name, now - path.stat().st_mtime
                    except FileNotFoundError:
                        continue


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


def _get_or_error(get, digest: str) -> bytes | BlobError:
    try:
        return get(digest)
    except BlobUnavailable:
        raise
    except BlobError as exc:
        return exc


class S3BlobStore:
    """Blobs in an S3-compatible bucket under ``prefix``; reads of a batch run concurrently so
    the object store's latency does not eat the workers' throughput."""

    def __init__(self, url: str, workers: int = 16):
        import boto3
        from botocore.config import Config

        rest = url.removeprefix("s3://")
        self.bucket, _, prefix = rest.partition("/")
        if not self.bucket:
            raise ValueError(f"DERMASCAN_BLOB_URL {url!r}: s3://BUCKET[/PREFIX] is needed")
        self.prefix = prefix.strip("/")
        self.workers = workers
        config = Config(
            connect_timeout=3, read_timeout=30, retries={"max_attempts": 3, "mode": "standard"},
            max_pool_connections=max(10, workers),
        )  # fmt: skip
        self.client = boto3.client("s3", config=config)
        self.fast_reads = True  # the read path without boto3's request pipeline (see _Reader)
        self._fast = None

    def key(self, digest: str) -> str:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise BlobError(f"not a sha256 hex digest: {digest!r}")
        name = f"{digest[:2]}/{digest}"
        return f"{self.prefix}/{name}" if self.prefix else name

    def _call(self, method: str, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, method)(Bucket=self.bucket, **kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise BlobNotFound(f"blob {kwargs.get('Key')} is missing from s3://{self.bucket}") from None
            if code.startswith("5") or code in ("SlowDown", "ServiceUnavailable", "InternalError"):
                raise BlobUnavailable(f"the object store answered {code}") from None
            raise BlobError(f"the object store refused {method}: {code}") from None
        except BotoCoreError as exc:  # connection refused, timeouts, DNS
            raise BlobUnavailable(f"the object store cannot be reached: {exc}") from None

    def put(self, data: bytes, durable: bool = True) -> str:
        digest = sha256_hex(data)
        self._call("put_object", Key=self.key(digest), Body=data)
        return digest

    def sync(self, digests, workers: int = 16) -> None:
        """Nothing to do: a PUT that returned is durable."""

    def get(self, digest: str) -> bytes:
        data = (
            self._reader().get(self.key(digest))
            if self.fast_reads
            else self._call("get_object", Key=self.key(digest))["Body"].read()
        )
        if sha256_hex(data) != digest:
            raise BlobCorrupt(f"blob {digest} is damaged (its content no longer matches its sha256)")
        return data

    def get_many(self, digests) -> list[bytes | BlobError]:
        from concurrent.futures import ThreadPoolExecutor

        digests = list(digests)
        if len(digests) <= 1:
            return [_get_or_error(self.get, d) for d in digests]
        with ThreadPoolExecutor(min(self.workers, len(digests))) as pool:
            return list(pool.map(lambda d: _get_or_error(self.get, d), digests))

    def _reader(self) -> _Reader:
        if self._fast is None:
            self._fast = _Reader(self.client, self.bucket, self.workers)
        return self._fast

    def exists(self, digest: str) -> bool:
        try:
            self._call("head_object", Key=self.key(digest))
        except BlobNotFound:
            return False
        return True

    def delete(self, digest: str) -> bool:
        exists = self.exists(digest)
        self._call("delete_object", Key=self.key(digest))
        return exists

    def listing(self):
        """Every blob under the prefix: (digest, seconds since it was last written)."""
        import datetime as dt

        prefix = f"{self.prefix}/" if self.prefix else ""
        token = None
        while True:
            page = self._call("list_objects_v2", Prefix=prefix, **({"ContinuationToken": token} if token else {}))
            now = dt.datetime.now(dt.UTC)
            for item in page.get("Contents", []):
                name = item["Key"].rsplit("/", 1)[-1]
                if len(name) == 64:
                    yield name, (now - item["LastModified"]).total_seconds()
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")


class _Reader:
    """GET of one object with a signed request on a kept-alive urllib3 pool: the same SigV4
    signature boto3 makes (botocore's signer, the client's credentials, region and addressing),
    without the client's event pipeline and response parsing, which cost the worker about a
    millisecond of CPU per image — CPU the model needs (bench.throughput --object-store)."""

    def __init__(self, client, bucket: str, workers: int):
        import urllib3
        from botocore.auth import S3SigV4Auth

        self.client, self.bucket = client, bucket
        self.signer = S3SigV4Auth
        self.region = client.meta.region_name or "us-east-1"
        endpoint = client.meta.endpoint_url.rstrip("/")
        style = (client.meta.config.s3 or {}).get("addressing_style")
        custom = "amazonaws.com" not in endpoint
        if style == "path" or (custom and style != "virtual"):
            self.base = f"{endpoint}/{bucket}"
        else:
            scheme, host = endpoint.split("://", 1)
            self.base = f"{scheme}://{bucket}.{host}"
        self.pool = urllib3.PoolManager(maxsize=max(10, workers), retries=False, timeout=urllib3.Timeout(3, 30))

    def get(self, key: str) -> bytes:
        from urllib.parse import quote

        from botocore.awsrequest import AWSRequest

        url = f"{self.base}/{quote(key, safe='/')}"
        credentials = self.client._request_signer._credentials.get_frozen_credentials()
        request = AWSRequest(method="GET", url=url)
        self.signer(credentials, "s3", self.region).add_auth(request)
        for attempt in range(3):
            try:
                reply = self.pool.request("GET", url, headers=dict(request.headers.items()), preload_content=True)
            except Exception as exc:  # noqa: BLE001 — urllib3's connection errors, timeouts
                if attempt == 2:
                    raise BlobUnavailable(f"the object store cannot be reached: {exc}") from None
                continue
            if reply.status == 200:
                return reply.data
            if reply.status == 404:
                raise BlobNotFound(f"blob {key} is missing from s3://{self.bucket}")
            if reply.status >= 500 or reply.status == 429:
                if attempt == 2:
                    raise BlobUnavailable(f"the object store answered {reply.status}")
                continue
            raise BlobError(f"the object store refused get_object: {reply.status}")
        raise BlobUnavailable("the object store did not answer")


_stores: dict = {}


def blob_store(settings) -> BlobStore | S3BlobStore:
    """The store ``settings`` name: ``DERMASCAN_BLOB_URL`` (s3://…) or the data directory's folder.
    One per process and URL (an S3 client is costly to make)."""
    url = getattr(settings, "blob_url", "") or ""
    if not url:
        return BlobStore(settings.blob_dir)
    if not url.startswith("s3://"):
        raise ValueError(f"DERMASCAN_BLOB_URL must be s3://BUCKET[/PREFIX] (got {url!r})")
    key = (os.getpid(), url, os.environ.get("AWS_ENDPOINT_URL"))
    if key not in _stores:
        _stores[key] = S3BlobStore(url)
    return _stores[key]
