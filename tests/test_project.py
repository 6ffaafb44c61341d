"""The project's shape: migrations (up and down, PostgreSQL and SQLite, in step with the models),
the doors that stay shut, docker-compose, and the README / CI agreement."""

from __future__ import annotations

import ast
import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from dermascan.infra import migrate
from dermascan.infra.schema import Base
from tests.services import scratch_postgres

ROOT = Path(__file__).resolve().parents[1]
TABLES = {
    "programs",
    "users",
    "api_tokens",
    "model_bundles",
    "batches",
    "studies",
    "predictions",
    "referrals",
    "audit_events",
}


# -- migrations ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dialect", [pytest.param("postgresql", marks=pytest.mark.slow), "sqlite"])
def test_upgrade_to_head_matches_models_and_downgrades_to_empty(dialect, tmp_path):
    with contextlib.ExitStack() as stack:
        if dialect == "postgresql":
            url = stack.enter_context(scratch_postgres("dermascan_migrations", migrated=False))
        else:
            url = f"sqlite:///{tmp_path / 'm.sqlite'}"
        migrate.upgrade(url)
        engine = create_engine(url)
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) >= TABLES
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
            assert diff == [], f"models and migrations differ: {diff}"
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() in migrate.current_heads()
        migrate.downgrade(url, "base")
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) <= {"alembic_version"}
        migrate.upgrade(url)  # and up again
        engine.dispose()


def test_migration_files_are_numbered_with_one_head():
    versions = sorted(p.name for p in (ROOT / "migrations" / "versions").glob("[0-9]*.py"))
    assert versions and all(re.fullmatch(r"\d{4}_[a-z0-9_]+\.py", v) for v in versions)
    assert len(migrate.current_heads()) == 1


# -- doors ---------------------------------------------------------------------------------------------
def imports_of(folder: Path) -> dict[str, set[str]]:
    out = {}
    for path in folder.rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        out[str(path.relative_to(ROOT))] = names
    return out


def test_model_imports_nothing_of_the_application():
    forbidden = {"dermascan", "web", "worker", "flask", "celery", "sqlalchemy", "kombu", "redis", "psycopg2"}
    bad = {f: n & forbidden for f, n in imports_of(ROOT / "model").items() if n & forbidden}
    assert not bad, bad


def test_ingest_imports_nothing_of_submission_storage_web_or_worker():
    """dermascan/ingest turns bytes into study inputs and rejections, nothing more."""
    allowed_own = {"dermascan.config", "dermascan.errors", "dermascan.ingest"}
    bad = {}
    for path in (ROOT / "dermascan" / "ingest").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                own = name.startswith("dermascan") and not any(
                    name == a or name.startswith(a + ".") for a in allowed_own
                )
                if own or top in {"web", "worker", "sqlalchemy", "celery", "kombu", "flask", "redis"}:
                    bad.setdefault(str(path.relative_to(ROOT)), []).append(name)
    assert not bad, bad


# -- the rooms of dermascan/ (CONTRIBUTING.md: where things go) ------------------------------------
CORE_ROOMS = {"infra", "security", "screening", "ingest"}
SIDE_ROOMS = {"intake", "referrals", "results_out", "governance"}
ROOMS = CORE_ROOMS | SIDE_ROOMS | {"upkeep", "cli"}
# what each room may import of dermascan, besides itself, config and errors
ROOM_DOORS = {
    "infra": set(),
    "security": {"infra"},
    "ingest": set(),
    "screening": {"infra", "security"},
    **{room: CORE_ROOMS for room in SIDE_ROOMS},  # a side room never imports another side room
    "upkeep": CORE_ROOMS | SIDE_ROOMS,
    "cli": ROOMS,
}


def dermascan_imports(path: Path) -> set[str]:
    """The dermascan modules a file imports (dotted, at any depth, lazy imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("dermascan"):
            out |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("dermascan")}
    return out


def test_the_core_is_in_rooms_with_a_docstring_each():
    top = sorted(p.stem for p in (ROOT / "dermascan").glob("*.py"))
    assert top == ["__init__", "config", "errors"], top
    rooms = sorted(p.name for p in (ROOT / "dermascan").iterdir() if (p / "__init__.py").is_file())
    assert set(rooms) == ROOMS, rooms
    for room in rooms:
        doc = ast.get_docstring(ast.parse((ROOT / "dermascan" / room / "__init__.py").read_text()))
        assert doc and len(doc) > 80, f"dermascan/{room}/__init__.py needs a docstring that says what the room is"


def test_each_room_imports_only_through_its_doors():
    bad = {}
    for room, allowed in ROOM_DOORS.items():
        for path in (ROOT / "dermascan" / room).rglob("*.py"):
            for name in dermascan_imports(path):
                parts = name.split(".")
                target = parts[1] if len(parts) > 1 else None
                if target in (None, room, "config", "errors", "__version__") or target not in ROOMS:
                    continue
                if target not in allowed:
                    bad.setdefault(str(path.relative_to(ROOT)), set()).add(name)
    assert not bad, bad


def test_no_import_cycles_among_the_core_modules():
    """Module-level imports of dermascan/ form no cycle (lazy imports inside functions may)."""
    modules = {}
    for path in (ROOT / "dermascan").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        tree = ast.parse(path.read_text())
        deps = set()
        for node in tree.body:  # top level only
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.level == 0
                and node.module.startswith("dermascan")
            ):
                deps |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("dermascan")}
        modules[name] = deps
    graph = {m: {d for d in deps if d in modules and d != m} for m, deps in modules.items()}
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for dep in graph[node]:
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " → ".join([*trail[trail.index(dep) :], dep]))
            if dep not in state:
                visit(dep, [*trail, dep])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


# -- the rooms of model/ and the worker --------------------------------------------------------------
def model_imports(path: Path) -> set[str]:
    """The model modules a file imports (dotted, at any depth, lazy imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.level == 0
            and node.module.split(".")[0] == "model"
        ):
            out |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "model"}
    return out


SERVING_MODEL = ("model.inference", "model.metrics", "model.errors")


def _outside(names: set[str], allowed=SERVING_MODEL) -> set[str]:
    return {n for n in names if n != "model" and not any(n == a or n.startswith(a + ".") for a in allowed)}


def test_model_is_two_rooms_and_inference_never_imports_training():
    top = sorted(p.name for p in (ROOT / "model").iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file())
    assert top == ["__init__.py", "errors.py", "inference", "metrics.py", "training"], top
    bad = {str(p.relative_to(ROOT)): _outside(model_imports(p)) for p in (ROOT / "model" / "inference").rglob("*.py")}
    assert not {k: v for k, v in bad.items() if v}, bad


def test_serving_code_imports_only_the_inference_room():
    """The worker, the core, the portal, edge/ and the CLI's serving commands; training and export
    commands (cli/model.py, and cli/bundles.py when it exports a registered bundle) are the
    exceptions."""
    folders = [ROOT / "worker", ROOT / "dermascan", ROOT / "edge", ROOT / "web"]
    allowed_training = {ROOT / "dermascan" / "cli" / "model.py", ROOT / "dermascan" / "cli" / "bundles.py"}
    bad = {}
    for folder in folders:
        for path in folder.rglob("*.py"):
            if path in allowed_training:
                continue
            outside = _outside(model_imports(path))
            if outside:
                bad[str(path.relative_to(ROOT))] = outside
    assert not bad, bad


def _without(*modules: str) -> str:
    """Python source that makes importing ``modules`` fail in the process that runs it (as where
    they are not installed)."""
    return (
        "import sys, importlib.abc\n"
        "class Blocked(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        f"        if name.split('.')[0] in {modules!r}:\n"
        "            raise ImportError(f'{name} is not installed here')\n"
        "sys.meta_path.insert(0, Blocked())\n"
    )


def test_scoring_and_heat_maps_with_the_shipped_bundle_need_no_training_no_keras_no_tensorflow(tmp_path):
    """A worker's model work — load the shipped bundle, score, draw a Grad-CAM heat map — in a
    process where importing Keras, TensorFlow, JAX or tf2onnx fails (as in the README's install,
    which has none of them), and nothing of ``model.training`` is loaded."""
    code = _without("keras", "tensorflow", "jax", "tf2onnx") + (
        "from dermascan.config import Settings\n"
        "from worker.runtime import load_predictor\n"
        "from worker.warm import gradcam\n"
        f"p = load_predictor(Settings.from_env(env={{}}, data_dir={str(tmp_path)!r}))\n"
        "image = open('dermascan/examples/ISIC_0025188.jpg', 'rb').read()\n"
        "score = p.score([image], [{'age_approx': 60, 'sex': 'male', 'anatom_site_general': 'back'}])[0]\n"
        "prepared = p.pre_process([image], [{}])\n"
        "heat = gradcam(p).heatmap(prepared.pixels, prepared.meta)\n"
        "assert heat.shape == p.image_shape and heat.max() == 1.0, (heat.shape, heat.max())\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('model.training') or m.split('.')[0] in "
        "('keras', 'tensorflow', 'jax', 'tf2onnx'))\n"
        "print(p.runtime, score.probability, loaded)\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout


def test_the_training_commands_name_the_train_extra_where_it_is_missing(tmp_path):
    """`dermascan train` in a process where Keras cannot be imported: exit 1 with one line naming
    the extra to install."""
    code = _without("keras", "tensorflow") + (
        "from dermascan.cli import main\n"
        f"main(['--data-dir', {str(tmp_path)!r}, 'train', '--data', '.', '--out', {str(tmp_path / 'b')!r}])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 1, done.stderr + done.stdout
    message = done.stderr.strip().splitlines()
    assert len(message) == 1 and "pip install 'dermascan[train]'" in message[0] and "dermascan train" in message[0], (
        message
    )


def test_edge_stands_on_the_inference_room_alone():
    """edge/ (the tablet's scorer) imports nothing of the server: no dermascan, web or worker."""
    bad = {
        f: n & {"dermascan", "web", "worker"}
        for f, n in imports_of(ROOT / "edge").items()
        if n & {"dermascan", "web", "worker"}
    }
    assert not bad, bad


def _module_graph(package: str) -> dict[str, set[str]]:
    """Module-level imports among a package's modules (lazy imports inside functions excluded)."""
    modules = {}
    for path in (ROOT / package).rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        deps = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith(package):
                deps |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith(package)}
        modules[name] = deps
    return {m: {d for d in deps if d in modules and d != m} for m, deps in modules.items()}


@pytest.mark.parametrize("package", ["model", "worker", "edge"])
def test_no_import_cycles_in_model_worker_and_edge(package):
    graph, state = _module_graph(package), {}

    def visit(node, trail):
        state[node] = 1
        for dep in graph[node]:
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " → ".join([*trail[trail.index(dep) :], dep]))
            if dep not in state:
                visit(dep, [*trail, dep])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


ROOMS_WITH_DOCSTRINGS = [
    *(f"dermascan/{room}" for room in sorted(ROOMS)),
    "model/inference",
    "model/training",
    "worker",
    "edge",
]


@pytest.mark.parametrize("room", ROOMS_WITH_DOCSTRINGS)
def test_each_room_docstring_names_all_its_modules(room):
    doc = ast.get_docstring(ast.parse((ROOT / room / "__init__.py").read_text())) or ""
    modules = sorted(p.stem for p in (ROOT / room).glob("*.py") if p.stem not in ("__init__", "__main__"))
    unnamed = [m for m in modules if not re.search(rf"\b{m}\b", doc)]
    assert not unnamed, f"{room}/__init__.py's docstring does not name {unnamed}"


def test_web_imports_nothing_of_the_model_package():
    """The portal reaches model facts through the core (dermascan.screening.reports, operating_point), never model/."""
    bad = {
        f: n & {"model", "keras", "tensorflow", "jax"}
        for f, n in imports_of(ROOT / "web").items()
        if n & {"model", "keras", "tensorflow", "jax"}
    }
    assert not bad, bad


def test_core_never_imports_web_or_worker():
    bad = {f: n & {"web", "worker"} for f, n in imports_of(ROOT / "dermascan").items() if n & {"web", "worker"}}
    assert not bad, bad


def test_web_process_never_loads_keras_or_tensorflow(tmp_path):
    code = (
        "import sys\n"
        "from dermascan.config import Settings\n"
        "from web import create_app\n"
        f"app = create_app(Settings.from_env(env={{}}, data_dir={str(tmp_path)!r}))\n"
        "client = app.test_client()\n"
        "for path in ('/login', '/api/v1/openapi.json'):\n"
        "    assert client.get(path).status_code == 200\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('keras', 'tensorflow', 'jax', 'torch'))\n"
        "print(loaded)\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr + done.stdout


# -- docker-compose ----------------------------------------------------------------------------------
def compose_config(file: str = "docker-compose.yml", **extra_env) -> dict:
    binary = shutil.which("docker-compose")
    assert binary, "Debian's docker-compose (a real compose parser) is needed; .ci/run installs it"
    env = {
        **os.environ, "POSTGRES_PASSWORD": "example", "DERMASCAN_SECRET_KEY": "example",
        "MINIO_ROOT_USER": "example", "MINIO_ROOT_PASSWORD": "example-password", **extra_env,
    }  # fmt: skip
    done = subprocess.run(
        [binary, "-f", str(ROOT / file), "config"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def check_cli(args: list[str]) -> None:
    """Parse ``dermascan ARGS`` with the real click command tree, without running it."""
    import click

    from dermascan.cli import main

    ctx = main.make_context("dermascan", list(args))
    command: click.Command = main
    while isinstance(command, click.Group):
        name, sub, rest = command.resolve_command(ctx, [*ctx.protected_args, *ctx.args])
        assert sub is not None, f"no command {name!r} in {args}"
        ctx = sub.make_context(name, rest, parent=ctx)
        command = sub


def test_compose_file_is_valid_and_runs_only_real_commands():
    config = compose_config()
    services = config["services"]
    assert {"postgres", "redis", "migrate", "web", "worker-gpu", "worker-cpu", "beat", "dicom"} <= set(services)
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    # processes share no data volume: only PostgreSQL, Redis and the object store (MinIO)
    assert {"minio", "bucket"} <= set(services)
    mounts: dict[str, list[str]] = {}
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            mounts.setdefault(source, []).append(name)
    assert {v: users for v, users in mounts.items() if len(users) > 1} == {}
    for name in ("web", "worker-gpu", "worker-cpu", "dicom", "worker-callbacks"):
        assert services[name]["environment"]["DERMASCAN_BLOB_URL"].startswith("s3://"), name
    # the DICOM door's allow-list comes from the environment (empty: the receiver refuses to start)
    assert "DERMASCAN_DICOM_ALLOW" in services["dicom"]["environment"]
    assert "--allow-any" not in services["dicom"]["command"]
    for name, service in services.items():
        if "dermascan" not in str(service.get("image", "")):
            continue
        command = service["command"]
        command = shlex.split(command) if isinstance(command, str) else command
        if command[0] == "dermascan":
            check_cli(command[1:])
        elif command[0] == "celery":
            assert command[1:3] == ["-A", "worker.celery_app"] and command[3] in ("worker", "beat"), command
            assert (ROOT / "worker" / "celery_app.py").exists()
        else:
            pytest.fail(f"{name}: unexpected command {command}")
        build = service.get("build") or {}
        dockerfile = ROOT / build.get("dockerfile", "Dockerfile")
        assert dockerfile.exists(), f"{name}: {dockerfile} is missing"
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY "):
                for source in line.split()[1:-1]:
                    assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source} does not exist"


# -- README and CI -------------------------------------------------------------------------------------
def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```(?:bash|sh)\n(.*?)\n```", text, flags=re.S)[:2]


def test_ci_runs_exactly_the_readme_test_command():
    setup, tests = readme_commands()
    assert "dermascan demo" in setup and "venv" in setup
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1].strip() == tests.strip().splitlines()[-1].strip()


def test_ci_checks_the_plain_install_the_readme_gives():
    """.ci/run runs .ci/plain-install (a venv made by the README's first command, no extras,
    then the demo and every process) before the tests, which run with the test extras."""
    ci = (ROOT / ".ci" / "run").read_text()
    steps = [line.strip() for line in ci.splitlines() if line.strip() and not line.strip().startswith(("#", "log "))]
    plain = next(i for i, line in enumerate(steps) if line == "bash .ci/plain-install")
    assert plain < len(steps) - 1
    script = (ROOT / ".ci" / "plain-install").read_text()
    assert "README.md" in script and "check_imports.py" in script and "demo --once" in script


def test_a_missing_extra_is_named_in_one_line(monkeypatch):
    from dermascan.config import MissingExtra, check_backend, require_extra

    with pytest.raises(MissingExtra) as caught:
        require_extra("no_such_module_dermascan", "export", "an export")
    assert str(caught.value).count("\n") == 0 and "pip install 'dermascan[export]'" in str(caught.value)
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    check_backend()  # jax is installed with the test extras: no error


def test_reading_settings_writes_nothing(tmp_path):
    """Only commands that need the installation secret create it (no var/ appears in a checkout
    because someone ran `dermascan evaluate` or `--help`)."""
    from click.testing import CliRunner

    from dermascan.cli import main
    from dermascan.config import Settings

    data = tmp_path / "var"
    Settings.from_env(env={"DERMASCAN_DATA_DIR": str(data)})
    assert CliRunner().invoke(main, ["--data-dir", str(data), "evaluate", "--help"], env={}).exit_code == 0
    assert not data.exists()
    secret = Settings.from_env(env={"DERMASCAN_DATA_DIR": str(data)}).with_secret().secret_key
    assert len(secret) == 64 and (data / "secret_key").read_text() == secret
    assert Settings.from_env(env={"DERMASCAN_DATA_DIR": str(data)}).with_secret().secret_key == secret


def test_a_gpu_node_joins_the_central_stack_by_url_and_shares_no_volume():
    config = compose_config(
        "docker-compose.gpu-node.yml",
        DERMASCAN_DATABASE_URL="postgresql+psycopg2://dermascan:pw@central:5432/dermascan",
        DERMASCAN_BROKER_URL="redis://central:6379/0", AWS_ENDPOINT_URL="http://central:9000",
        AWS_ACCESS_KEY_ID="key", AWS_SECRET_ACCESS_KEY="secret",
    )  # fmt: skip
    worker = config["services"]["worker-gpu"]
    env = worker["environment"]
    assert env["DERMASCAN_BROKER_URL"] == "redis://central:6379/0" and env["DERMASCAN_BLOB_URL"].startswith("s3://")
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    check_cli(worker["command"][1:])
