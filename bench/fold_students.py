"""Training recipes side by side on patients the networks never trained on, for what a recipe change
is meant to move before it is paid for with a whole cross-fitted bundle (four networks, hours
here): the fold-k student of each `dermascan distill` work folder on its own validation fold, or
(`--student final`) each work folder's final student and each bundle's network on the held-out
calibration set (a bundle given instead of a work folder: e.g. the shipped default).

For each work folder: the malignancy output (mean of the four flips, raw scores) on the images as
taken and as other cameras give them (`model.training.evaluate.SHIFTS`), the circular field's
surround filled as the Predictor fills it: AUC, and sensitivity and specificity at the score that
refers 95 % of the malignant lesions *as taken* (one threshold per network, fixed across shifts, as
a shipped threshold is); then the differential: its own head (raw, and re-weighted to equal class
priors as `diagnosis.adjust` does with tau = 1) and a linear head refitted on its fused features
with balanced class weights, cross-validated over the validation fold's patients (what those
features can tell apart on patients the network never saw; the shipped head is refitted this way).

    python -m bench.fold_students /work/runs/v4f0 /work/runs/v5f0 --student fold0 --data ../shared/data/ham10000
    python -m bench.fold_students model/bundles/default /work/runs/v5 --student final
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench import support


def _scores(outputs, pixels, meta):
    """Mean over the four flips of the malignancy score, the class probabilities and the fused
    features (``outputs``: the network with the differential head's input as a third output)."""
    from model.inference.predictor import flips

    views = [outputs.predict({"image": np.ascontiguousarray(v), "meta": meta}, batch_size=64, verbose=0)
             for v in flips(pixels)]  # fmt: skip
    return tuple(np.mean([np.asarray(view[i]) for view in views], 0) for i in range(3))


def _refit(features, truth, groups, folds: int = 5, strength: float = 0.01) -> np.ndarray:
    """Class probabilities of the shipped head's refit (``diagnosis_fit.fit_head``: balanced
    multinomial logistic regression on standardised features), each row predicted by the head
    fitted without its patient's group."""
    from sklearn.model_selection import GroupKFold

    from model.inference.diagnosis import CODES
    from model.training.diagnosis_fit import fit_head, head_probabilities

    out = np.zeros((len(truth), len(CODES)))
    for fit, held in GroupKFold(folds).split(features, truth, groups):
        kernel, bias = fit_head(features[None, fit], truth[fit], strength, len(CODES))
        out[held] = head_probabilities(features[None, held], kernel, bias)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("works", nargs="+", type=Path, help="distill work folders (or bundles, with final)")
    parser.add_argument("--student", default="fold0", help="fold<k> (its validation fold) or final (calibration set)")
    parser.add_argument("--data", type=Path, default=support.HAM)
    args = parser.parse_args(argv)

    import keras

    import model.inference.network  # noqa: F401  (registers the training layers the checkpoints hold)
    from model import metrics
    from model.inference import diagnosis
    from model.inference.data import IsicDataset
    from model.inference.features import FeatureSpec
    from model.inference.field import fill_outside_field
    from model.inference.network import DIAGNOSIS_HEAD
    from model.training.config import read_config, split_rows
    from model.training.evaluate import SHIFTS, shifted
    from model.training.folds import _masked_loss

    _masked_loss()
    malignancy, differential = [], []
    final = args.student == "final"
    if not (final or (args.student.startswith("fold") and args.student[4:].isdigit())):
        parser.error(f"--student {args.student!r}: fold<k> or final")
    for work in args.works:
        cfg = read_config(work)
        dataset = IsicDataset.open(args.data, limit=cfg.limit)
        split = split_rows(dataset.targets(), dataset.groups(), cfg)
        rows = np.flatnonzero(split == (-1 if final else int(args.student[4:])))
        if (work / "manifest.json").is_file():  # a bundle: its network, on the calibration set
            if not final:
                parser.error(f"{work} is a bundle: it has no fold students (--student final)")
            from model.inference import bundle

            loaded = bundle.load(work)
            spec, network = loaded.spec, loaded.network
        else:
            spec = FeatureSpec.from_json((work / "feature_spec.json").read_text())
            network = keras.saving.load_model(work / args.student / "last.keras", compile=False)
        y, truth = dataset.targets()[rows], diagnosis.labels(dataset.metadata)[rows]
        groups = dataset.groups()[rows]
        meta = spec.transform(dataset.metadata)[rows].astype(np.float32)
        outputs = keras.Model(network.inputs, [*network.outputs, network.get_layer(DIAGNOSIS_HEAD).input])
        raw = dataset.load_images(cfg.image_size, ids=[dataset.ids[i] for i in rows])
        threshold = None
        for shift, (label, _) in SHIFTS.items():
            pixels = fill_outside_field(shifted(raw, shift))
            score, classes, fused = _scores(outputs, pixels, meta)
            score = score.ravel()
            if threshold is None:  # the images as taken come first: 95 % of their malignant lesions
                threshold = metrics.threshold_for_sensitivity(y, score, 0.95)
                taken = metrics.auc(y, score)
                known = truth >= 0
                prior = np.bincount(truth[known], minlength=len(diagnosis.CODES)) / known.sum()
                adjusted = diagnosis.adjust(classes, {"prior_adjustment": {"tau": 1.0, "prior": prior.tolist()}})
                refit = _refit(fused[known], truth[known], groups[known])
                for head, probabilities in (
                    ("own head, raw", classes[known]),
                    ("own head, equal priors", adjusted[known]),
                    ("linear head refitted (balanced, CV over patients)", refit),
                ):
                    found = diagnosis.figures(truth[known], probabilities)
                    recall = " / ".join(f"{found['recall'].get(c, float('nan')):.2f}" for c in diagnosis.CODES)
                    differential.append((
                        work.name, head, f"{found['balanced_accuracy']:.3f}", f"{found['melanoma_auc']:.3f}", recall,
                    ))  # fmt: skip
            auc, point = metrics.auc(y, score), metrics.at_threshold(y, score, threshold)
            malignancy.append((
                work.name, label, f"{auc:.4f}", f"{auc - taken:+.4f}", f"{point.sensitivity:.3f}",
                f"{point.specificity:.3f}",
            ))  # fmt: skip
            print(f"{work.name}: {label} scored", flush=True)
    where = "the held-out calibration set" if final else "their validation fold"
    print(f"{args.student} networks on {where} ({rows.size} images, {int(y.sum())} malignant, "
          f"{int((truth >= 0).sum())} with a diagnosis; mean of four flips, raw scores) — {support.machine()}")  # fmt: skip
    print(support.table(malignancy, ("run", "camera", "AUC", "Δ AUC", "sensitivity", "specificity")))
    print()
    print(support.table(differential, ("run", "differential", "balanced accuracy", "melanoma AUC",
                                       "recall " + " / ".join(diagnosis.CODES))))  # fmt: skip


if __name__ == "__main__":
    main()
