"""CPU a worker spends per image read from the object store: boto3's get_object against the
read path the blob store uses (a SigV4-signed GET on a kept-alive urllib3 pool), 16 threads, the
same objects from the same S3 server, in one run. The server (moto's) runs in its own process —
pin it to another core to stand in for an object store on another machine:

    python -m bench.object_store_reads --n 400
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from bench import support


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--size", type=int, default=20_000)
    parser.add_argument("--server-cpu", default="1", help="the core moto's server is pinned to")
    args = parser.parse_args()
    port = support.free_port()
    server = subprocess.Popen(
        ["taskset", "-c", args.server_cpu, sys.executable, "-m", "moto.server", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
    try:
        from bench.scale import wait_port
        from dermascan.infra.blobs import S3BlobStore

        wait_port(port)
        store = S3BlobStore("s3://bench/reads")
        store.client.create_bucket(Bucket="bench")
        digests = [store.put(os.urandom(args.size)) for _ in range(args.n)]
        rows = []
        for name, fast in (
            ("boto3 get_object", False),
            ("signed GET, urllib3 pool (the blob store's read path)", True),
        ):
            store.fast_reads = fast
            store.get_many(digests[:32])  # warm: connections, credentials
            cpu, wall = time.process_time(), time.perf_counter()
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(store.get, digests))
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            rows.append((name, f"{cpu / args.n * 1000:.2f} ms", f"{args.n / wall:.0f} objects/s"))
        print(f"object-store reads, {args.n} objects of {args.size:,} bytes, 16 threads — {support.machine()}")
        print(support.table(rows, ("client", "CPU per object (client process)", "rate")))
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
