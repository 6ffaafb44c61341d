"""The real services and processes that tests and benchmarks start: scratch PostgreSQL databases,
a private redis-server, Celery worker subprocesses, the web app on a socket, the tiny model
bundle. Plain code, no fixtures, so ``bench/`` uses it without importing ``conftest.py``."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import create_engine, text

from dermascan.config import Settings

ROOT = Path(__file__).resolve().parents[1]
HAM = Path(os.environ.get("DERMASCAN_TEST_DATA", ROOT.parent / "shared" / "data" / "ham10000"))
PG_ADMIN_URL = os.environ.get("DERMASCAN_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
REDIS_HOST = os.environ.get("DERMASCAN_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("DERMASCAN_TEST_REDIS_PORT", "6379"))
ARTIFACTS = ROOT / "test-artifacts"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def scoring_warm() -> str:
    """The line a worker logs once every batch shape has run (imported late: it loads Keras)."""
    from worker.warm import WARM

    return WARM


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def scratch_postgres(prefix: str = "dermascan_test", migrated: bool = True):
    """A fresh (migrated) PostgreSQL database, dropped afterwards (tests and benchmarks)."""
    from dermascan.infra import migrate
    from dermascan.infra.db import engine_for

    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(3)}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    try:
        if migrated:
            migrate.upgrade(url)
        yield url
    finally:
        engine_for(url).dispose()
        with admin.connect() as conn:
            conn.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


TABLES = [
    "audit_events",
    "deliveries",
    "dicom_destinations",
    "outcomes",
    "referrals",
    "predictions",
    "studies",
    "batches",
    "api_tokens",
    "model_bundles",
    "users",
    "programs",
]


class PrivateRedis:
    """A redis-server of our own on a free port, for tests that stop and start the broker."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.workdir = workdir
        self.proc = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self):
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def make_tiny_bundle(ham: Path, out: Path, n: int = 64, image_size: int = 32, version: str = "tiny-test") -> Path:
    """Train the tiny-backbone fusion network one epoch on ``n`` real images and save a bundle
    whose threshold is the median score (so about half the studies are referred)."""
    import keras
    import numpy as np

    from model.inference import bundle
    from model.inference.data import IsicDataset
    from model.inference.features import FeatureSpec
    from model.inference.network import NO_AUGMENTATION, build

    keras.utils.set_random_seed(0)
    ds = IsicDataset.open(ham, limit=n)
    spec = FeatureSpec.fit(ds.metadata, min_count=1)
    net = build(spec.dim, image_size, backbone="tiny", augmentation=NO_AUGMENTATION)
    net.compile(optimizer="adam", loss="binary_crossentropy")
    x = {"image": ds.load_images(image_size), "meta": spec.transform(ds.metadata)}
    net.fit(x, ds.targets().astype("float32"), epochs=1, batch_size=16, verbose=0)
    scores = net.predict(x, verbose=0).ravel()
    from model.training.assemble import roc_table, score_histogram

    y = ds.targets()
    metrics = {
        "note": "test bundle; ROC table on its own training images",
        "roc_table": roc_table(y, scores),
        "score_histogram": score_histogram(scores),
        "oof": {"n": int(y.size), "positives": int(y.sum())},
    }
    calibration = {"method": "none", "params": {}, "prevalence": float(y.mean())}
    bundle.save(
        net, spec, out, version=version, threshold=float(np.median(scores)), metrics=metrics,
        extra={"calibration": calibration},
    )  # fmt: skip
    return out


def planted_image(jpeg: bytes, lesion: bool) -> bytes:
    """A real HAM10000 photograph, with a dark disc drawn in its middle when ``lesion`` (what the
    planted bundle below calls malignant: a sign a tiny network learns at once)."""
    import io

    from PIL import Image, ImageDraw

    with Image.open(io.BytesIO(jpeg)) as image:
        image = image.convert("RGB")
    if lesion:
        width, height = image.size
        r = min(width, height) // 4
        ImageDraw.Draw(image).ellipse(
            (width // 2 - r, height // 2 - r, width // 2 + r, height // 2 + r), fill=(40, 22, 18)
        )
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def make_planted_bundle(ham: Path, out: Path, n: int = 480, image_size: int = 32, fit_missing: bool = True) -> Path:
    """A tiny bundle in which "unknown means benign" has been planted on purpose: the image shows
    the truth (a dark disc: malignant), and in its training data every row sent without age, sex
    and site is benign — as in HAM10000, where the rows without a sex are all benign. Its
    threshold refers 95 % of disc images sent with their metadata. ``fit_missing``: with the maps
    for missing metadata (model.inference.missing) fitted on held-out rows with the fields hidden."""
    import keras
    import numpy as np

    from model.inference import bundle, missing
    from model.inference.calibration import Calibrator
    from model.inference.data import decode_many
    from model.inference.features import FeatureSpec
    from model.inference.network import NO_AUGMENTATION, build
    from tests.ham_files import ham_images, ham_rows

    keras.utils.set_random_seed(0)
    rows = ham_rows(ham, n)
    originals = ham_images(ham, rows.isic_id)
    rng = np.random.default_rng(0)
    # the plant: a third of the rows come without any metadata and are all benign, half of them
    # with a disc; among the rows with metadata, a disc means malignant 85 % of the time
    hidden = rng.random(n) < 0.33
    y = np.where(hidden, 0, (rng.random(n) < 0.5).astype(int))
    disc = np.where(hidden, rng.random(n) < 0.5, np.where(y == 1, rng.random(n) < 0.85, rng.random(n) < 0.15))
    images = [planted_image(originals[i], bool(d)) for i, d in zip(rows.isic_id, disc, strict=True)]
    given = rows[["age_approx", "sex", "anatom_site_general"]].to_dict("records")
    spec = FeatureSpec.fit(rows, min_count=1)
    pixels, errors = decode_many(list(enumerate(images)), image_size)
    assert not errors, errors
    meta = spec.transform([{} if h else r for h, r in zip(hidden, given, strict=True)])
    full = spec.transform(given)
    train = np.arange(n) < int(n * 0.7)
    held = ~train & ~hidden  # held-out rows as a deployment meets them: metadata missing for no reason
    net = build(spec.dim, image_size, backbone="tiny", augmentation=NO_AUGMENTATION, meta_units=(16,), dropout=0.0)
    net.compile(optimizer=keras.optimizers.Adam(3e-3), loss="binary_crossentropy")
    net.fit(
        {"image": pixels[train], "meta": meta[train]}, y[train].astype("float32"), epochs=30, batch_size=32, verbose=0
    )
    scores = net.predict({"image": pixels[held], "meta": full[held]}, verbose=0).ravel()
    threshold = 0.5
    calibration = {"method": "none", "params": {}, "prevalence": float(y.mean())}
    extra = {"calibration": calibration}
    if fit_missing:
        fields = spec.columns
        views = {(): scores[None, :]}
        for pattern in missing.patterns(fields):
            hidden_meta = missing.hide(spec, full[held], pattern)
            views[pattern] = net.predict({"image": pixels[held], "meta": hidden_meta}, verbose=0).ravel()[None, :]
        extra["missing_metadata"] = missing.fit(y[held], views, fields, threshold, Calibrator()).to_dict()
    bundle.save(net, spec, out, version="planted-unknown-benign" + ("" if fit_missing else "-unfixed"),
                threshold=threshold, metrics={"note": "test bundle with a planted shortcut"}, extra=extra)  # fmt: skip
    return out


class PrivatePostgres:
    """A PostgreSQL server of our own (initdb in a scratch folder, a free port, trust auth on
    127.0.0.1), for tests that restart the database. Debian's binaries; as root it runs as the
    ``postgres`` user, as PostgreSQL insists."""

    def __init__(self, workdir: Path):
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
        if not bins:
            raise RuntimeError("PostgreSQL's server binaries are not installed (Debian package postgresql)")
        import tempfile

        self.bin, self.port = bins[-1], free_port()
        # a folder of its own under /tmp: the postgres user cannot enter pytest's root-only folders
        self.root = Path(tempfile.mkdtemp(prefix="dermascan-pg-"))
        self.data, self.socket_dir = self.root / "data", self.root / "sock"
        self.socket_dir.mkdir()
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
            shutil.chown(self.socket_dir, "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
        self.start()
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "dermascan")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/dermascan"

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bin / tool), *args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd="/tmp", text=True)
        if done.returncode:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")

    def _ctl(self, action: str, *args: str) -> None:
        options = f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            "pg_ctl", action, "-D", str(self.data), "-w", "-t", "60", "-o", options, "-l", str(self.data / "log"), *args
        )

    def start(self) -> None:
        self._ctl("start")

    def restart(self) -> None:
        """A fast restart: every connection is cut, as when the database server is restarted."""
        self._ctl("restart", "-m", "fast")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._ctl("stop", "-m", "fast")
        shutil.rmtree(self.root, ignore_errors=True)


class Worker:
    """A real ``celery worker`` subprocess (started through ``dermascan worker``)."""

    def __init__(
        self,
        settings: Settings,
        log: Path,
        beat: bool = False,
        queues: str = "interactive,bulk,maintenance,callbacks",
        env: dict | None = None,
        concurrency: int = 1,
    ):
        self.settings = settings
        self.log_path = log
        self.concurrency = concurrency
        cmd = [sys.executable, "-m", "dermascan.cli", "worker", "--queues", queues, "--concurrency", str(concurrency)]
        if beat:
            cmd.append("--beat")
        env = {**os.environ, **settings.as_env(), "PYTHONUNBUFFERED": "1", **(env or {})}
        self.log_file = open(log, "ab")
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self.log_file, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT
        )

    def wait_ready(self, timeout: float = 240, warm: bool = False) -> Worker:
        """Until Celery reports ready (and, with ``warm``, every child has run every batch shape)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            log = self.log()
            if " ready." in log and (not warm or log.count(scoring_warm()) >= self.concurrency):
                return self
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready after {timeout} s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self, sig=signal.SIGKILL):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(30)

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log_file.close()


def wait_for(predicate, timeout: float = 120, interval: float = 0.2, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {message}")


def wait_for_batch(url: str, headers: dict, batch_id: str, timeout: float, message: str, interval: float = 1) -> dict:
    """Poll the REST API's ``GET /api/v1/batches/{batch_id}`` on the server at ``url`` until the
    batch is complete; its status (``counts`` …)."""
    import requests

    def complete():
        status = requests.get(f"{url}/api/v1/batches/{batch_id}", headers=headers, timeout=30).json()
        return status if status["state"] == "complete" else None

    return wait_for(complete, timeout, interval=interval, message=message)


class LiveServer:
    """The real Flask app served over TCP by werkzeug's threaded server, in this process."""

    def __init__(self, app):
        from werkzeug.serving import make_server

        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        import threading

        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()


class Orthanc:
    """A real PACS: Orthanc from Debian's packages (``orthanc``; ``orthanc-dicomweb`` for
    STOW-RS), on free ports, storing in ``workdir``. It checks the called AE title, as a PACS
    that knows its own name does; stop and start it again keep what it stored."""

    PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"

    def __init__(self, workdir: Path, aet: str = "ORTHANC"):
        self.binary = shutil.which("Orthanc", path="/usr/sbin:/usr/bin:/usr/local/bin")
        if not self.binary:
            raise RuntimeError("Orthanc is not installed (Debian packages orthanc, orthanc-dicomweb; .ci/run installs them)")  # fmt: skip
        self.aet, self.dicom_port, self.http_port = aet, free_port(), free_port()
        self.workdir = Path(workdir)
        storage = self.workdir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        self.config = self.workdir / "orthanc.json"
        self.config.write_text(json.dumps({
            "Name": "dermascan-test-pacs", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
            "DicomAet": aet, "DicomPort": self.dicom_port, "HttpPort": self.http_port, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomCheckCalledAet": True, "DicomAlwaysAllowStore": True,
            "Plugins": [self.PLUGIN] if Path(self.PLUGIN).exists() else [],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "StorageCompression": False,
        }))  # fmt: skip
        self.proc = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> Orthanc:
        self.log_file = open(self.workdir / "orthanc.log", "ab")
        self.proc = subprocess.Popen(
            [self.binary, str(self.config)], stdout=self.log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
        wait_for(lambda: self._answers(), 60, message="Orthanc to answer")
        return self

    def _answers(self) -> bool:
        import requests

        if self.proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {self.proc.returncode}: see {self.workdir / 'orthanc.log'}")
        try:
            return requests.get(f"{self.url}/system", timeout=2).ok and _port_open(self.dicom_port)
        except requests.RequestException:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)
        self.log_file.close()

    def get(self, path: str):
        import requests

        answer = requests.get(f"{self.url}{path}", timeout=30)
        answer.raise_for_status()
        return answer

    def datasets(self, study_instance_uid: str) -> list:
        """Every instance Orthanc holds in that study, read back through its REST API."""
        import io

        from pydicom import dcmread

        found = self.get_json_post("/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_instance_uid}})  # fmt: skip
        return [dcmread(io.BytesIO(self.get(f"/instances/{i}/file").content)) for i in found]

    def get_json_post(self, path: str, body: dict):
        import requests

        answer = requests.post(f"{self.url}{path}", json=body, timeout=30)
        answer.raise_for_status()
        return answer.json()


def _port_open(port: int) -> bool:
    with contextlib.closing(socket.socket()) as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0
