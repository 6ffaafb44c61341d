"""What the network itself makes of missing metadata: each fold student of a `dermascan distill`
work folder on its own validation fold (patients it never trained on), with every field as sent,
with each field hidden alone (age, sex, site) and with all of them hidden, and the AUC of its raw
malignancy score for each. Raw scores: no missing-metadata map, no calibration — the maps of
:mod:`model.inference.missing` correct the *level* of the score; this measures what metadata
dropout in training did to the ranking and to the shift of the scores.

    python -m bench.missing_metadata_folds --work /work/runs/v4 --data ../shared/data/ham10000
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench import support


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="a distill work folder with finished fold students")
    parser.add_argument("--data", type=Path, default=support.HAM)
    args = parser.parse_args(argv)

    import keras

    import model.inference.network  # noqa: F401  (registers the training layers the checkpoints hold)
    from model import metrics
    from model.inference import missing
    from model.inference.data import IsicDataset
    from model.inference.features import FeatureSpec
    from model.training.distill import DistillConfig
    from model.training.folds import _masked_loss

    _masked_loss()
    cfg = DistillConfig.read(args.work / "config.json")
    spec = FeatureSpec.from_json((args.work / "feature_spec.json").read_text())
    dataset = IsicDataset.open(args.data, limit=cfg.limit)
    y = dataset.targets()
    meta_all = spec.transform(dataset.metadata)
    patterns = [(), *[(f,) for f in spec.columns], tuple(spec.columns)]  # full, each field alone, none
    scores = {p: [] for p in patterns}
    labels = []
    for fold in sorted(p for p in args.work.glob("fold*") if (p / "oof.npz").is_file()):
        rows = np.load(fold / "oof.npz")["index"]
        model = keras.saving.load_model(fold / "last.keras", compile=False)
        pixels = dataset.load_images(cfg.image_size, ids=[dataset.ids[i] for i in rows])
        for pattern in patterns:
            meta = missing.hide(spec, meta_all[rows], pattern) if pattern else meta_all[rows]
            out = model.predict({"image": pixels, "meta": meta}, batch_size=64, verbose=0)
            scores[pattern].append(np.asarray(out[0] if isinstance(out, list | tuple) else out).ravel())
        labels.append(y[rows])
        print(f"{fold.name}: {rows.size} validation images scored", flush=True)
    y_all = np.concatenate(labels)
    full = np.concatenate(scores[()])
    table = []
    for pattern in patterns:
        s = np.concatenate(scores[pattern])
        table.append((
            "none (every field as sent)" if not pattern else " + ".join(pattern), f"{metrics.auc(y_all, s):.4f}",
            f"{np.median(s[y_all == 1]):.3f}", f"{np.median(s[y_all == 0]):.3f}",
            f"{np.median(s[y_all == 1] - full[y_all == 1]):+.3f}",
        ))  # fmt: skip
    print(f"fold students of {args.work} (their validation folds pooled: {y_all.size} images, "
          f"{int(y_all.sum())} malignant; plain view, raw scores) — {support.machine()}")  # fmt: skip
    print(support.table(table, ("hidden", "AUC", "median malignant", "median benign", "malignant shift")))


if __name__ == "__main__":
    main()
