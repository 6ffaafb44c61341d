"""Does a bundle's not-assessable gate still flag what is not a lesion, and pass the lesions?

The made-up negatives the gate was fitted and reported on (``model.training.gate_fit``: degraded
copies of the first 160 held-out lesions, synthetic images and charts, and the reporting half of
the photographs, scenes and other medical images), and the held-out calibration set itself, through
each bundle's Predictor as a worker scores them (the field's fill, the quality measures, any camera
clamp, the network, the gate). One row per bundle: the share of negatives flagged (and per kind
where two bundles differ), the share of held-out lesions flagged.

    python -m bench.gate_negatives model/bundles/default OTHER_BUNDLE --data ../shared/data/ham10000
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def main() -> None:
    from model.inference.data import IsicDataset
    from model.inference.predictor import Predictor
    from model.training.config import read_config, split_rows
    from model.training.gate_fit import flag_summary, reported_negatives

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+")
    parser.add_argument("--data", required=True)
    args = parser.parse_args()
    t0 = time.time()
    cfg = read_config(Path(args.bundles[0]))
    dataset = IsicDataset.open(args.data, limit=cfg.limit)
    split = split_rows(dataset.targets(), dataset.groups(), cfg)
    held = np.flatnonzero(split < 0)
    held_ids = [dataset.ids[i] for i in held]
    kinds, negatives = reported_negatives(dataset, held_ids, cfg.seed)
    lesions = dataset.read_bytes(held_ids)
    records = dataset.metadata.iloc[held][["age_approx", "sex", "anatom_site_general"]].to_dict("records")
    print(f"{len(negatives)} made-up negatives, {len(lesions)} held-out lesions (the first bundle's split)")
    summaries = {}
    for bundle in args.bundles:
        predictor = Predictor(bundle)
        predictor.tta = bool(predictor.bundle.manifest.get("inference", {}).get("tta"))
        negative_scores = []
        for s in range(0, len(negatives), 128):
            negative_scores += predictor.score(negatives[s : s + 128], [{}] * len(negatives[s : s + 128]))
        lesion_scores = []
        for s in range(0, len(lesions), 256):
            lesion_scores += predictor.score(lesions[s : s + 256], records[s : s + 256])
        summary = flag_summary(kinds, [score.reason for score in negative_scores])
        lesion_flagged = np.mean([score.reason is not None for score in lesion_scores])
        summaries[predictor.version] = summary
        print(f"| {predictor.version} | {summary['flagged']} of {summary['n']} ({summary['flagged_share']:.1%}) | "
              f"{lesion_flagged:.1%} |", flush=True)  # fmt: skip
    if len(summaries) > 1:
        first, *rest = summaries.values()
        for kind, row in first["per_kind"].items():
            others = [s["per_kind"].get(kind, {}).get("flagged") for s in rest]
            if any(o != row["flagged"] for o in others):
                print(f"  {kind}: {row['flagged']} of {row['n']} -> {', '.join(str(o) for o in others)}")
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
