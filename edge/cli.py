"""``dermascan-edge``: score lesion images with an edge package, offline; JSON out.

    dermascan-edge score IMAGE [IMAGE …] --age 60 --sex male --site "lower extremity" [--package DIR]

The package is ``--package``, else ``DERMASCAN_EDGE_PACKAGE``. A result made here can be uploaded
later with the REST API's ``edge_result`` field (docs/architecture.md), with the version it was
made with; the server keeps it beside its own score.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dermascan-edge", description="Score lesion images offline.")
    commands = parser.add_subparsers(dest="command", required=True)
    score = commands.add_parser("score", help="score images (JSON out, one object per image)")
    score.add_argument("images", nargs="+", type=Path)
    score.add_argument("--package", type=Path, default=os.environ.get("DERMASCAN_EDGE_PACKAGE"))
    score.add_argument("--age", help="age in years")
    score.add_argument("--sex", help="male or female")
    score.add_argument("--site", help='anatomic site, e.g. "lower extremity"')
    score.add_argument("--threads", type=int)
    score.add_argument(
        "--allow-failed-check", action="store_true", help="score with a package that failed its own export check"
    )
    args = parser.parse_args(argv)
    if args.package is None:
        parser.error("--package DIR (or DERMASCAN_EDGE_PACKAGE) names the edge package to score with")
    from edge.scorer import EdgeScorer
    from model.errors import ModelError

    try:
        scorer = EdgeScorer(args.package, threads=args.threads, allow_failed_check=args.allow_failed_check)
        record = scorer.prepare_metadata({"age_approx": args.age, "sex": args.sex, "anatom_site_general": args.site})
    except (ModelError, ValueError, RuntimeError) as exc:
        print(f"dermascan-edge: {exc}", file=sys.stderr)
        return 2
    results = []
    for path in args.images:
        try:
            data = path.read_bytes()
        except OSError as exc:
            results.append({"image": str(path), "error": str(exc)})
            continue
        results.append({"image": str(path), **scorer.score_many([data], [record])[0]})
    print(json.dumps(results[0] if len(results) == 1 else results, indent=2))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
