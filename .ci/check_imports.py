"""Every package the production code imports is installed by the plain install (no extras).

Run with the plain virtual environment's Python (``.ci/plain-install``). It reads every import
statement of the production packages — at the top of a module or inside a function, where a
lazy import would only fail once a study reaches it — and checks that each third-party module
can be found. Modules that belong to an optional extra are listed below with the extra: the code
that imports them must say so in one clear line when it is missing (tests/test_project.py checks
that message exists).

Exit status 1, with one line per missing module and where it is imported, when any is missing.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCTION = ("dermascan", "web", "worker", "model", "migrations", "edge")
# optional extras: module → the extra that installs it
OPTIONAL = {
    "jax": "gpu",
    "keras": "train",
    "tensorflow": "train",
    "tf2onnx": "train",
    "ai_edge_litert": "train",
    "tflite_runtime": "edge",
    "openvino": "openvino",
}
FIRST_PARTY = set(PRODUCTION)


def imported_modules(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name.split(".")[0], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module.split(".")[0], node.lineno))
    return out


def main() -> int:
    missing = []
    for package in PRODUCTION:
        for path in sorted((ROOT / package).rglob("*.py")) if (ROOT / package).is_dir() else []:
            for name, line in imported_modules(path):
                if name in FIRST_PARTY or name in sys.stdlib_module_names or name == "__future__":
                    continue
                if name in OPTIONAL:
                    continue
                if importlib.util.find_spec(name) is None:
                    missing.append(f"{path.relative_to(ROOT)}:{line}: imports {name!r}, which the plain install lacks")
    for line in missing:
        print(line)
    if missing:
        print(
            f"{len(missing)} production import(s) not installed by `pip install -e .`: add them to [project].dependencies"
        )
        return 1
    print("every production import is installed by the plain install")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
