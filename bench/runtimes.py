"""The bundle's forward pass on each runtime, side by side, in one run: Keras/TensorFlow (what the
workers run), ONNX Runtime fp32 and int8, LiteRT fp32 and int8 (and OpenVINO where it is
installed) — images/s at batch 64 and latency at batch 1, with 1 and 2 threads; model size;
start-up (import, load, first answer). Each (runtime, threads) runs in a process of its own, so
that thread settings take and nothing is shared. One forward pass per image (no flips): the same
work on every runtime.

    python -m bench.runtimes [--bundle model/bundles/default] [--packages DIR] [--data DIR]

``--packages``: a folder with the edge packages (onnx, onnx-int8, litert, litert-int8 — made by
``dermascan export``); those missing are exported first (int8 needs ``--data``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import support

PACKAGES = {"onnx": ("onnx", False), "onnx-int8": ("onnx", True), "litert": ("litert", False),
            "litert-int8": ("litert", True)}  # fmt: skip


def _inputs(size, dim: int, n: int):
    import numpy as np

    from model.inference.data import image_shape

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, *image_shape(size), 3), dtype=np.uint8)
    return images, rng.normal(size=(n, dim)).astype(np.float32)


def _measure(run, size: int, dim: int, batches: int, singles: int) -> dict:
    import numpy as np

    images, meta = _inputs(size, dim, 64)
    run(images[:1], meta[:1])
    run(images, meta)  # warm both shapes
    t0 = time.perf_counter()
    for _ in range(batches):
        run(images, meta)
    per_s = 64 * batches / (time.perf_counter() - t0)
    latencies = []
    for i in range(singles):
        t = time.perf_counter()
        run(images[i % 64 : i % 64 + 1], meta[i % 64 : i % 64 + 1])
        latencies.append(time.perf_counter() - t)
    return {"images_per_s": per_s, "p50_ms": 1000 * float(np.median(latencies)),
            "p95_ms": 1000 * float(np.quantile(latencies, 0.95))}  # fmt: skip


def one(runtime: str, threads: int, bundle: Path, package: Path | None, batches: int, singles: int) -> dict:
    """In its own process: start-up and speed of one runtime at one thread count."""
    t0 = time.perf_counter()
    if runtime == "keras":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        from model.inference import bundle as bundle_lib
        from model.inference.gate import Gate
        from model.inference.ood import feature_network

        loaded = bundle_lib.load(bundle)
        gate = Gate.from_bundle(loaded.directory, loaded.manifest)
        net = feature_network(loaded.network, gate.feature_members)
        size, dim = loaded.image_size, loaded.spec.dim
        size_bytes = (Path(bundle) / "model.keras").stat().st_size

        def run(x, m):
            return net.predict_on_batch({"image": x, "meta": m})
    elif runtime == "openvino":  # reads the fp32 ONNX package
        import openvino as ov

        from edge.scorer import read_manifest
        from model.inference.features import FeatureSpec

        manifest = read_manifest(package)
        compiled = ov.Core().compile_model(
            str(package / manifest["file"]), "CPU", {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1}
        )
        size, dim = manifest["image_size"], FeatureSpec.from_dict(manifest["feature_spec"]).dim
        size_bytes = manifest["bytes"]

        def run(x, m):
            return compiled({"image": x, "meta": m})
    else:
        from edge.scorer import EdgeScorer

        scorer = EdgeScorer(package, threads=threads)
        size, dim = scorer.size, scorer.spec.dim
        size_bytes = scorer.manifest["bytes"]
        run = scorer.run
    images, meta = _inputs(size, dim, 1)
    run(images, meta)
    start_up = time.perf_counter() - t0
    return {"runtime": runtime, "threads": threads, "start_up_s": start_up, "mb": size_bytes / 1e6,
            **_measure(run, size, dim, batches, singles)}  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle", type=Path, default=support.ROOT / "model" / "bundles" / "default")
    parser.add_argument("--packages", type=Path, default=support.ROOT / "var" / "bench-packages")
    parser.add_argument("--data", type=Path, help="the bundle's development data (int8 calibration)")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--singles", type=int, default=60)
    parser.add_argument("--one", nargs=2, metavar=("RUNTIME", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.one:
        runtime, threads = args.one[0], int(args.one[1])
        package = {"keras": None, "openvino": args.packages / "onnx"}.get(runtime, args.packages / runtime)
        print(json.dumps(one(runtime.split("-")[0], threads, args.bundle, package, args.batches, args.singles)))
        return
    for name, (fmt, int8) in PACKAGES.items():
        if not (args.packages / name / "manifest.json").is_file():
            command = ["dermascan", "export", str(args.bundle), "--format", fmt, "--out", str(args.packages / name)]
            command += ["--int8"] * int8 + (["--data", str(args.data)] if args.data else [])
            print("exporting:", " ".join(command), file=sys.stderr)
            subprocess.run([str(Path(sys.executable).with_name("dermascan")), *command[1:]], check=True)
    rows = []
    try:
        import openvino  # noqa: F401  (measured where it is installed: pip install openvino)

        names = ("keras", *PACKAGES, "openvino")
    except ImportError:
        names = ("keras", *PACKAGES)
    for name in names:
        for threads in (1, 2):
            done = subprocess.run(
                [sys.executable, "-m", "bench.runtimes", "--one", name, str(threads), "--bundle", str(args.bundle),
                 "--packages", str(args.packages), "--batches", str(args.batches), "--singles", str(args.singles)],
                capture_output=True, text=True, cwd=support.ROOT,
            )  # fmt: skip
            if done.returncode != 0:
                print(f"{name} ({threads} threads) failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            label = {"keras": "Keras / TensorFlow", "openvino": "OpenVINO (the ONNX file)"}.get(
                name, name.replace("onnx", "ONNX Runtime").replace("litert", "LiteRT")
            )
            precision = "int8" if name.endswith("int8") else "fp32"
            rows.append((label.replace("-int8", ""), precision, threads, f"{r['images_per_s']:.1f}", f"{r['p50_ms']:.1f}",
                         f"{r['p95_ms']:.1f}", f"{r['mb']:.1f}", f"{r['start_up_s']:.1f}"))  # fmt: skip
            print(rows[-1], file=sys.stderr)
    print(f"{support.machine()}; bundle {args.bundle.resolve().name}, one forward pass per image (no flips)")
    header = ("runtime", "precision", "threads", "img/s (batch 64)", "p50 ms (batch 1)", "p95 ms (batch 1)", "MB",
              "start-up s")  # fmt: skip
    print(support.table(rows, header))


if __name__ == "__main__":
    main()
