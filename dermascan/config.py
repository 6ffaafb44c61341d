"""Configuration from environment variables (prefix ``DERMASCAN_``), with an embedded default.

Unset, everything lives under the data directory (default ``./var``): a SQLite database, kombu's
filesystem transport as the queue, the blob store and the secret key (made when a command first
needs it: reading settings writes nothing), so ``dermascan demo`` runs with nothing but Python
installed. Production sets ``DERMASCAN_DATABASE_URL`` (PostgreSQL) and
``DERMASCAN_BROKER_URL`` (Redis).
"""

from __future__ import annotations

import dataclasses
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from model.errors import MissingExtra, require_extra

__all__ = ["MissingExtra", "Settings", "require_extra"]

PREFIX = "DERMASCAN_"
PACKAGE_ROOT = Path(__file__).resolve().parent


def check_backend() -> None:
    """KERAS_BACKEND=jax (GPU workers) needs the gpu extra: say so before Keras fails to import."""
    if os.environ.get("KERAS_BACKEND", "tensorflow") == "jax":
        require_extra("jax", "gpu", "KERAS_BACKEND=jax")


def default_bundle_path() -> Path:
    return PACKAGE_ROOT.parent / "model" / "bundles" / "default"


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("var")
    database_url: str = ""
    broker_url: str = ""
    model_bundle: Path = field(default_factory=default_bundle_path)
    # the installation secret: never a key itself; dermascan.security.keys derives one per purpose
    secret_key: str = ""
    # where images and heat maps live: "" = DATA_DIR/blobs; s3://bucket/prefix = object storage
    blob_url: str = ""
    # bump to end every portal session (a new session/CSRF key); pseudonyms stay the same
    session_key_version: int = 0
    # the sweeper: studies queued (or processing) longer than these are sent again
    sweep_queued_after_s: int = 120
    sweep_processing_after_s: int = 1800
    sweep_interval_s: int = 30
    # a queued study sent longer ago than this whose message the broker no longer holds (lost
    # with a broker that restarted) is sent again
    sweep_lost_after_s: int = 30
    # a worker holds the studies it scores under a lease of this many seconds, renewed by its
    # heartbeat every third of it; an expired lease is taken over at the next sweep
    lease_s: int = 60
    # every worker runs the sweep on this schedule (one at a time across the deployment); 0: only
    # `dermascan sweep` or the beat service sweep
    worker_sweeps: bool = True
    # Redis: an unacknowledged message is redelivered after this; must exceed the longest batch
    visibility_timeout_s: int = 3600
    # batching
    bulk_chunk_size: int = 64
    batch_max_size: int = 32
    batch_max_wait_ms: int = 50
    predict_batch_sizes: tuple[int, ...] = (1, 4, 16)  # CPU; GPU workers use e.g. 1,8,64,256
    tta: bool | None = None  # None: as the bundle's manifest recommends
    mixed_precision: bool = False
    # the workers' forward pass: "onnxruntime" (an ONNX export of the bundle: shipped inside the
    # bundle, or made once in the data directory; Grad-CAM stays on Keras), "openvino" (the same
    # file on OpenVINO, checked against ONNX Runtime at load), "keras" (TensorFlow or JAX), or
    # "auto": the ONNX file on the TensorFlow backend — on OpenVINO where it is installed, the CPU is
    # x86 and it matches ONNX Runtime on the check inputs, else ONNX Runtime (bench/runtimes.py,
    # docs/benchmarks.md) — and Keras on JAX (the GPU workers)
    runtime: str = "auto"
    # JAX backend: compilations that took at least this long go to the persistent cache
    jax_cache_min_compile_s: float = 1.0
    # worker
    worker_concurrency: int = 1
    # threads of one worker process's forward pass and heat maps (ONNX Runtime, OpenVINO); 0: every
    # core. With worker_concurrency processes, e.g. one thread each (bench.throughput --concurrency
    # --threads measures a layout; docs/benchmarks.md)
    inference_threads: int = 0
    # ingest limits
    max_request_bytes: int = 512 * 1024 * 1024
    max_image_bytes: int = 25 * 1024 * 1024
    # the outcome CSV import: 100,000 rows of study_id,outcome,diagnosis fit in about 25 MB
    max_outcome_csv_bytes: int = 25 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    # one DICOM instance: the C-STORE receiver aborts an association past it, STOW-RS refuses a
    # part past it, and no uncompressed image whose pixels would take more is decoded
    max_dicom_bytes: int = 40 * 1024 * 1024
    max_zip_entries: int = 50_000
    max_zip_uncompressed_bytes: int = 1024 * 1024 * 1024  # images and manifest only; other entries are not read
    max_zip_ratio: int = 200
    # requests that are not uploads (login, forms, decisions): the most a body may hold
    max_form_bytes: int = 64 * 1024
    # retention: images and heat maps of studies finished (and, if referred, decided) more than
    # this many days ago are deleted by the sweeper; results, decisions and the audit trail stay.
    # 0: keep them (then run `dermascan purge --older-than DAYS` when the hospital's policy says)
    retention_days: int = 0
    # accounts
    claim_timeout_s: int = 1800
    # failed logins per (username, address) before each further attempt waits, doubling each time
    login_attempts_per_minute: int = 10
    # the session cookie only over HTTPS (on behind TLS, as in docker-compose)
    session_cookie_secure: bool = False
    # reverse proxies in front of the web process whose X-Forwarded-For/-Proto/-Host are trusted
    # (ProxyFix); 0: none — the client address is the socket's, and the headers are ignored
    trusted_proxies: int = 0
    # a portal session ends after this long without a request, and this long after its login
    session_idle_timeout_s: int = 30 * 60
    session_max_age_s: int = 12 * 3600
    # metrics (Prometheus): the worker serves them on this port (0: off); the admin page reads these URLs
    metrics_port: int = 0
    worker_metrics_urls: str = ""
    # Prometheus scrapes the monitoring gauges (/admin/monitoring/metrics) with this bearer token
    # (empty: only a logged-in admin can read them)
    monitoring_metrics_token: str = ""
    # REST API and STOW-RS rate limits (Flask-Limiter notation): per bearer token, and per address
    api_rate_limit: str = "1200 per minute"
    api_address_rate_limit: str = "3000 per minute"
    # FHIR: the identifier systems the sender's own identifiers come back under in a report
    # ("{program}" stands for the program's name): its study reference (external_id) and, for
    # DICOM, the accession number. An installation sets its own (e.g. urn:oid:… of the hospital).
    fhir_reference_system: str = "https://dermascan.example/fhir/program/{program}/reference"
    fhir_accession_system: str = "https://dermascan.example/fhir/program/{program}/accession"
    # completion callbacks
    callback_retries: int = 5
    callback_retry_s: float = 2.0  # first wait; doubling, at most 10 min (results_out.retry)
    # hosts, addresses or networks (comma-separated) that callbacks may reach over http or at a
    # private address (an EHR on the hospital network); everything else: https to public addresses
    callback_allow_hosts: str = ""
    # PACS destinations may be on hospital (private) networks, never on loopback, link-local,
    # unspecified, multicast or reserved addresses — unless listed here (hosts or networks)
    destination_allow_hosts: str = ""
    # results back to the PACS (DICOM destinations): attempts per object and the first wait
    # between them (doubling, at most 10 minutes); the AE title DermaScan calls from; a CA file
    # for destinations with TLS (empty: the system's)
    delivery_retries: int = 12
    delivery_retry_s: float = 5.0
    dicom_calling_ae: str = "DERMASCAN"
    dicom_tls_ca_file: str = ""
    # DermaScan's own certificate and key, for destinations that require one (mutual TLS)
    dicom_tls_client_cert: str = ""
    dicom_tls_client_key: str = ""

    @property
    def is_embedded(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def queue_dir(self) -> Path:
        return self.data_dir / "queue"

    def replace(self, **changes) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, env: dict | None = None, **overrides) -> Settings:
        """Read ``DERMASCAN_*`` variables; ``overrides`` win (tests pass them)."""
        env = os.environ if env is None else env
        values: dict = {}
        for f in dataclasses.fields(cls):
            raw = env.get(PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f, raw)
        values.update(overrides)
        settings = cls(**values)
        data_dir = Path(settings.data_dir).resolve()
        fill: dict = {"data_dir": data_dir, "model_bundle": Path(settings.model_bundle).resolve()}
        if not settings.database_url:
            fill["database_url"] = f"sqlite:///{data_dir / 'dermascan.sqlite'}"
        if not settings.broker_url:
            # a host name, so that kombu does not warn that none was given (the filesystem has none)
            fill["broker_url"] = "filesystem://localhost/"
        return dataclasses.replace(settings, **fill)

    def with_secret(self) -> Settings:
        """These settings with the installation secret: ``DERMASCAN_SECRET_KEY``, or in the
        embedded default one kept in the data directory — made the first time a command needs
        it (the web app, a worker, submission, the receiver), never by reading settings alone."""
        if self.secret_key:
            return self
        return dataclasses.replace(self, secret_key=_embedded_secret(Path(self.data_dir)))

    def as_env(self) -> dict[str, str]:
        """The settings as environment variables, for child processes (worker, web)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, tuple):
                value = ",".join(map(str, value))
            elif isinstance(value, bool):
                value = "1" if value else "0"
            out[PREFIX + f.name.upper()] = str(value)
        return out


def _parse(f: dataclasses.Field, raw: str):
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if kind.startswith("bool") and not kind.startswith("bool |"):
        return raw.strip().lower() in {"1", "true", "yes", "on"}
    if kind.startswith("bool |"):
        if raw.strip().lower() in {"", "auto", "none"}:
            return None
        return raw.strip().lower() in {"1", "true", "yes", "on"}
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    if kind == "Path":
        return Path(raw)
    if kind.startswith("tuple"):
        return tuple(int(v) for v in raw.split(",") if v.strip())
    return raw


def _embedded_secret(data_dir: Path) -> str:
    """A per-installation secret key kept in the data directory (embedded default only). Made
    once, atomically: two processes starting together end up with the same key."""
    path = data_dir / "secret_key"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = data_dir / f".secret_key.{os.getpid()}.{secrets.token_hex(4)}"
        tmp.write_text(secrets.token_hex(32))
        os.chmod(tmp, 0o600)
        try:
            os.link(tmp, path)  # fails if another process made it first: theirs is kept
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()
