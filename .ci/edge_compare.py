"""The edge scorer against the server, across two virtual environments (.ci/edge-check).

``server`` (the project's own environment, TensorFlow there): 200 held-out lesions of the shipped
bundle's calibration set and the gate's report negatives (photographs, scenes, other medical
images) written as files, with the server's Predictor's answers, into a JSON file.

``edge`` (an environment with only numpy, Pillow, onnxruntime and ai-edge-litert): each file
scored by ``dermascan-edge`` (the Python function for all, the command for a few), compared with
the server's answers — probabilities within 1e-4, gate verdicts identical — and not one module of
TensorFlow, Keras, Flask, SQLAlchemy or Celery loaded (nor installed). Exit 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

FORBIDDEN = ("tensorflow", "keras", "flask", "sqlalchemy", "celery", "jax", "pandas")


def server(args) -> int:
    import io

    import numpy as np
    from PIL import Image

    from dermascan.ingest.records import clean_metadata
    from model.inference import bundle as bundle_lib
    from model.inference.predictor import Predictor
    from model.training import gate_data
    from model.training.export import _held_out

    loaded = bundle_lib.load(args.bundle)
    ids, _, images, records = _held_out(loaded, args.data)
    ids, images, records = ids[: args.n], images[: args.n], records[: args.n]
    kinds, others = gate_data.world(seed=1, part="report")
    for kind, pixels in list(zip(kinds, others, strict=True))[:: max(1, len(others) // 40)]:
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(pixels, np.uint8)).save(buffer, format="PNG")
        ids.append(f"negative-{len(ids)}-{kind}")
        images.append(buffer.getvalue())
        records.append({"age_approx": 50, "sex": "female", "anatom_site_general": "back"})
    # the metadata as the server stores it (submission cleans it: names, aliases, ranges)
    records = [clean_metadata({k: v for k, v in r.items() if v == v}) for r in records]
    tta = bool(loaded.manifest.get("inference", {}).get("tta", False))
    results = Predictor(bundle=loaded, batch_sizes=(1, 16, 64), tta=tta).score(images, records, ids)
    folder = Path(args.images)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (name, data, record, result) in enumerate(zip(ids, images, records, results, strict=True)):
        path = folder / f"{i:04d}-{name}.img"
        path.write_bytes(data)
        meta = {k: record.get(k) for k in ("age_approx", "sex", "anatom_site_general")}
        meta = {k: (None if v != v else v) for k, v in meta.items()}  # NaN (a blank cell) → None
        rows.append({"path": str(path), "record": meta, "probability": result.probability,
                     "assessable": result.assessable, "reason": result.reason,
                     # as the server's results say it: no referral decision for an image it cannot assess
                     "referred": result.referred if result.assessable else None,
                     "differential": result.differential})  # fmt: skip
    Path(args.out).write_text(json.dumps({"version": loaded.version, "rows": rows}))
    lesions = sum(not Path(r["path"]).name.split("-", 1)[1].startswith("negative") for r in rows)
    print(f"server: {len(rows)} images ({lesions} held-out lesions) scored by {loaded.version}")
    return 0


def edge(args) -> int:
    from edge.scorer import EdgeScorer
    from model.inference.diagnosis import CODES

    expected = json.loads(Path(args.server).read_text())
    scorer = EdgeScorer(args.package)
    worst, worst_dx, differences = 0.0, 0.0, []
    for row in expected["rows"]:
        got = scorer.score(Path(row["path"]).read_bytes(), row["record"])
        worst = max(worst, abs(got["score"] - row["probability"]))
        # the differential (a bundle with one): every class within 1e-4 of the server's (the edge
        # gives it as people read it, most likely first, to 4 decimals; the server in CODES order)
        want_dx, got_dx = row.get("differential"), got.get("differential")
        dx_ok = (want_dx is None) == (got_dx is None)
        if dx_ok and want_dx is not None:
            edge_dx = {r["diagnosis"]: r["probability"] for r in got_dx}
            dx_ok = set(edge_dx) == set(CODES)
            gap = max(abs(edge_dx.get(code, 2.0) - p) for code, p in zip(CODES, want_dx, strict=True))
            worst_dx, dx_ok = max(worst_dx, gap), dx_ok and gap <= 1e-4
        same = (got["assessable"], got["reason"], got["referred"]) == (
            row["assessable"],
            row["reason"],
            row["referred"],
        )
        if abs(got["score"] - row["probability"]) > 1e-4 or not same or not dx_ok:
            differences.append((row["path"], row, got))
    loaded = [m for m in FORBIDDEN if m in sys.modules]
    missing = []
    for module in FORBIDDEN[:5]:
        try:
            __import__(module)
            missing.append(module)
        except ImportError:
            pass
    first = expected["rows"][0]
    record = first["record"]
    command = [str(Path(sys.executable).with_name("dermascan-edge")), "score", first["path"], "--package", args.package]
    for flag, key in (("--age", "age_approx"), ("--sex", "sex"), ("--site", "anatom_site_general")):
        if record.get(key) is not None:
            command += [flag, str(int(record[key]) if key == "age_approx" else record[key])]
    done = subprocess.run(command, capture_output=True, text=True)
    cli = json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr}
    cli_ok = (
        abs(cli.get("score", -1) - first["probability"]) <= 1e-4 and cli.get("bundle_version") == expected["version"]
    )
    print(
        f"edge ({scorer.manifest['runtime']}, {scorer.manifest['precision']}): {len(expected['rows'])} images, "
        f"max probability difference {worst:.2e}, differential {worst_dx:.2e}, {len(differences)} different answers; "
        f"server modules loaded: {loaded or 'none'}; importable: {missing or 'none'}; command line: {'same' if cli_ok else cli}"
    )
    for path, want, got in differences[:10]:
        print(f"  {path}: server {want} edge {got}")
    return 0 if not differences and not loaded and not missing and cli_ok else 1


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="side", required=True)
    s = sub.add_parser("server")
    s.add_argument("--bundle", default="model/bundles/default")
    s.add_argument("--data", type=Path, required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--images", required=True)
    s.add_argument("--n", type=int, default=200)
    e = sub.add_parser("edge")
    e.add_argument("--package", required=True)
    e.add_argument("--server", required=True)
    args = parser.parse_args()
    return server(args) if args.side == "server" else edge(args)


if __name__ == "__main__":
    raise SystemExit(main())
