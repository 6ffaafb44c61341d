"""``train``, ``evaluate``, ``distill``, ``export``…: the model's training side (Keras is imported
inside the commands; it comes with the ``train`` extra, which a serving install does without).
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

import click

from dermascan.cli.common import _settings, main


# -- the model -----------------------------------------------------------------------------------
def _needs_train(command):
    """The command needs the ``train`` extra (Keras, TensorFlow, tf2onnx): without it, one line
    says what to install."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        from dermascan.config import MissingExtra, require_extra

        name = f"dermascan {click.get_current_context().info_name}"
        try:
            for module in ("keras", "tensorflow"):
                require_extra(module, "train", name)
        except MissingExtra as exc:
            raise click.ClickException(str(exc)) from exc
        return command(*args, **kwargs)

    return run


def _folder(*names, help: str):  # noqa: A002 (click's own word)
    """A required option naming an existing folder."""
    return click.option(*names, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path), help=help)


def _log_progress() -> None:
    """Training, combining and distilling say what they do as they go (model's INFO lines)."""
    logging.getLogger("model").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO)


class _ImageSize(click.ParamType):
    """``160`` (square) or ``WIDTHxHEIGHT`` (``192x144``) → the config's form (an int, or
    [height, width])."""

    name = "SIZE"

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        from model.errors import ModelError
        from model.inference.data import parse_size

        try:
            return parse_size(value)
        except ModelError as exc:
            self.fail(str(exc), param, ctx)


def _image_size_option(command):
    return click.option(
        "--image-size",
        type=_ImageSize(),
        default="128",
        show_default=True,
        help="Network input: one side (160) or WIDTHxHEIGHT (192x144, HAM10000's own 4:3); aspect is not kept.",
    )(command)


def _data_and_out(command):
    """The training data (ISIC-2024 layout) and the bundle folder to write."""
    command = click.option(
        "--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Bundle folder to write."
    )(command)
    return click.option(
        "--data",
        "data_dir",
        required=True,
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        help="ISIC-2024 layout folder (the one the sources were trained on, for combine).",
    )(command)


@main.command()
@_data_and_out
@click.option(
    "--work-dir",
    type=click.Path(path_type=Path),
    help="Checkpoints, out-of-fold predictions, report (default: OUT.work).",
)
@click.option("--folds", default=3, show_default=True)
@_image_size_option
@click.option("--epochs", default=14, show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option(
    "--weights", type=click.Path(exists=True, dir_okay=False), help="Local NASNetMobile weights (include_top=False)."
)
@click.option("--target-sensitivity", default=0.95, show_default=True)
@click.option(
    "--threshold-confidence",
    default=0.9,
    show_default=True,
    help="Share of bootstrap resamples of the out-of-fold positives that must reach the target sensitivity.",
)
@click.option(
    "--calibration-fraction",
    default=0.15,
    show_default=True,
    help="Share of patients held out of every fold model; the threshold and calibration are chosen there.",
)
@click.option(
    "--ema-momentum",
    type=click.FloatRange(0.5, 0.99999),
    help="Exponential moving average of the weights (e.g. 0.99); checkpoints keep the averaged weights.",
)
@click.option("--max-members", type=int, help="Keep only the best N fold models in the bundle.")
@click.option("--backbone", type=click.Choice(["nasnet_mobile", "tiny"]), default="nasnet_mobile", show_default=True)
@click.option("--limit", type=int, help="Only the first N rows (smoke runs).")
@click.option("--version", help="Bundle version (default: from the date).")
@click.option(
    "--only-folds", help="Train only these folds (e.g. 0,1); the bundle is made from the folds that are done."
)
@_needs_train
def train(
    data_dir,
    out_dir,
    work_dir,
    folds,
    image_size,
    epochs,
    batch_size,
    weights,
    target_sensitivity,
    threshold_confidence,
    calibration_fraction,
    ema_momentum,
    max_members,
    backbone,
    limit,
    version,
    only_folds,
):
    """Train the fusion model with patient-grouped CV and write a model bundle (resumable)."""
    from model.training.config import TrainConfig
    from model.training.train import train as run_training

    _log_progress()
    cfg = TrainConfig(
        image_size=image_size, folds=folds, epochs=epochs, batch_size=batch_size, weights=weights,
        target_sensitivity=target_sensitivity, threshold_confidence=threshold_confidence,
        calibration_fraction=calibration_fraction, ema_momentum=ema_momentum, max_members=max_members, backbone=backbone, limit=limit,
        verbose=1 if sys.stderr.isatty() else 2,
    )  # fmt: skip
    work_dir = work_dir or out_dir.with_name(out_dir.name + ".work")
    try:
        train_folds = [int(k) for k in only_folds.split(",")] if only_folds else None
    except ValueError:
        raise click.BadParameter("a comma-separated list of fold numbers", param_hint="--only-folds") from None
    manifest = run_training(data_dir, out_dir, work_dir, cfg, version, train_folds)
    oof = manifest["metrics"]["oof"]
    click.echo(f"bundle {manifest['version']} written to {out_dir}")
    if manifest["metrics"].get("calibration_set"):
        click.echo(
            f"out-of-fold AUC {oof['auc']:.4f}  pAUC80 {oof['pauc80']:.4f} (fold models on their own validation folds)"
        )
        _echo_calibration_set(manifest)
        return
    click.echo(f"out-of-fold AUC {oof['auc']:.4f}  pAUC80 {oof['pauc80']:.4f}  threshold {manifest['threshold']:.4f} "
               f"(sensitivity {oof['operating_point']['sensitivity']:.3f}, specificity {oof['operating_point']['specificity']:.3f})")  # fmt: skip


def _echo_calibration_set(manifest: dict) -> None:
    """The ruler the threshold was chosen on, then the shipped network on its own held-out set."""
    block, method = manifest["metrics"], manifest["calibration"]["method"]
    ruler = block.get("ruler")
    if ruler:
        click.echo(f"ruler ({ruler['n']} images, {ruler['positives']} malignant): AUC {ruler['auc']:.4f}  "
                   f"{method} calibration, ECE {ruler['ece_raw']:.4f} → {ruler['ece']:.4f}")  # fmt: skip
        rule = ruler.get("rule") or {}
        if rule.get("description"):
            click.echo(f"threshold rule: {rule['description']}")
    cal = block["calibration_set"]
    op = cal["operating_point"]
    click.echo(f"calibration set ({cal['n']} images, {cal['positives']} malignant; the shipped network): "
               f"AUC {cal['auc']:.4f}  pAUC80 {cal['pauc80']:.4f}  ECE {cal['ece']:.4f}")  # fmt: skip
    click.echo(
        f"threshold {manifest['threshold']:.4f}: sensitivity {op['sensitivity']:.3f}, specificity {op['specificity']:.3f}"
    )


@main.command()
@click.argument("sources", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@_data_and_out
@click.option("--version", required=True, help="Version of the combined bundle.")
@click.option(
    "--gate-members",
    help="Members (0-based, in the order of the sources) whose image features the not-assessable gate reads "
    "(default: all).",
)
@_needs_train
def combine(sources, data_dir, out_dir, version, gate_members):
    """Average the members of several training runs on the same split (work folders or bundles) into one
    bundle; calibration, threshold and gate are fitted again on the held-out calibration set."""
    from model.errors import ModelError
    from model.training.combine import combine as run_combine

    _log_progress()
    try:
        members = [int(k) for k in gate_members.split(",")] if gate_members else None
    except ValueError:
        raise click.BadParameter("a comma-separated list of member numbers", param_hint="--gate-members") from None
    try:
        manifest = run_combine(data_dir, out_dir, list(sources), version, gate_members=members)
    except ModelError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"bundle {manifest['version']} written to {out_dir}: {len(manifest['training']['members'])} members")
    for row in manifest["metrics"]["members_on_calibration_set"]:
        click.echo(f"  {row['member']}: calibration-set AUC {row['auc']:.4f}  pAUC80 {row['pauc80']:.4f}")
    _echo_calibration_set(manifest)
    negatives = (manifest["gate"].get("report") or {}).get("negatives")
    if negatives:
        click.echo(f"gate: flags {negatives['flagged_share']:.1%} of {negatives['n']} made-up negatives")


def _dataset_ids(data_dir, limit):
    from model.inference.data import IsicDataset

    return IsicDataset.open(data_dir, limit=limit).ids


@main.command()
@click.option(
    "--bundle",
    "bundle_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Default: the configured bundle.",
)
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_path", type=click.Path(path_type=Path), help="Write the metrics JSON here.")
@click.option("--tta/--no-tta", default=None, help="Default: as the bundle recommends.")
@click.option("--limit", type=int)
@click.option(
    "--shift",
    "shifts",
    multiple=True,
    type=click.Choice(["none", "white-balance", "darker", "brighter", "field-of-view", "all"]),
    help="Score every image again as another camera would take it (fixed white balance, exposure or field of view;"
    " all: each in turn) and print one row per camera.",
)
@click.option(
    "--calibration-rows-of",
    "split_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A training work folder's split.npy: only the rows it held out of every network (its calibration set).",
)
@click.pass_context
@_needs_train
def evaluate(ctx, bundle_dir, data_dir, out_path, tta, limit, shifts, split_file):
    """AUC, pAUC80 and sensitivity/specificity at the bundle's threshold on an ISIC-2024 folder."""
    import numpy as np
    from tqdm import tqdm

    from model.training.evaluate import SHIFTS, write
    from model.training.evaluate import evaluate as run_evaluation

    bundle_dir = bundle_dir or _settings(ctx).model_bundle
    rows = None
    if split_file is not None:
        split = np.load(split_file)
        total = len(_dataset_ids(data_dir, limit))
        if split.shape != (total,):
            raise click.BadParameter(
                f"{split.size} rows in the split, {total} in {data_dir}", param_hint="--calibration-rows-of"
            )
        rows = np.flatnonzero(split < 0)
    if shifts:
        names = list(SHIFTS) if "all" in shifts else list(dict.fromkeys(("none", *shifts)))
        from model.inference.predictor import Predictor

        predictor, table = Predictor(bundle_dir), []  # loaded once for every camera
        for name in names:
            result = run_evaluation(
                bundle_dir, data_dir, tta=tta, limit=limit, shift=name, rows=rows, predictor=predictor
            )
            op = result["operating_point"]
            table.append({"shift": name, "camera": SHIFTS[name][0], "n": result["n"], "auc": result["auc"],
                          "sensitivity": op["sensitivity"], "specificity": op["specificity"],
                          "not_assessable_share": result["gate"]["not_assessable_share"]})  # fmt: skip
        click.echo(f"bundle {result['bundle']} on {result['n']} images ({result['positives']} malignant), "
                   f"threshold {result['threshold']:.4f}, tta={result['tta']}")  # fmt: skip
        click.echo(f"{'camera':<44} {'AUC':>7} {'sens':>7} {'spec':>7} {'not assessable':>15}")
        for r in table:
            click.echo(f"{r['camera']:<44} {r['auc']:7.4f} {r['sensitivity']:7.4f} {r['specificity']:7.4f} "
                       f"{r['not_assessable_share']:15.2%}")  # fmt: skip
        out_path = out_path or Path(f"shifts-{result['bundle']}.json")
        out_path.write_text(json.dumps({"bundle": result["bundle"], "rows": table}, indent=2))
        click.echo(f"written to {out_path}")
        return
    total = len(rows) if rows is not None else len(_dataset_ids(data_dir, limit))
    with tqdm(total=total, desc="scoring", unit="img", file=sys.stderr, disable=None) as bar:
        result = run_evaluation(bundle_dir, data_dir, tta=tta, progress=bar.update, limit=limit, rows=rows)
    op = result["operating_point"]
    click.echo(
        f"bundle {result['bundle']} on {result['n']} images ({result['positives']} malignant), tta={result['tta']}"
    )
    click.echo(f"AUC     {result['auc']:.4f}  (95% CI {result['auc_ci95'][0]:.4f}–{result['auc_ci95'][1]:.4f})")
    click.echo(
        f"pAUC80  {result['pauc80']:.4f}  (95% CI {result['pauc80_ci95'][0]:.4f}–{result['pauc80_ci95'][1]:.4f})"
    )
    click.echo(f"at threshold {result['threshold']:.4f}: sensitivity {op['sensitivity']:.4f} ({op['tp']}/{op['tp'] + op['fn']}), "
               f"specificity {op['specificity']:.4f} ({op['tn']}/{op['tn'] + op['fp']})")  # fmt: skip
    cal, gate = result["calibration"], result["gate"]
    click.echo(f"calibration ({cal['method']}): ECE {cal['ece']:.4f}, log loss {cal['log_loss']:.4f}")
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(gate["reasons"].items())) or "none"
    click.echo(
        f"not assessable: {gate['not_assessable']} of {gate['n']} ({gate['not_assessable_share']:.2%}; {reasons})"
    )
    if "assessable" in gate:
        a = gate["assessable"]
        click.echo(f"on the assessable ones: AUC {a['auc']:.4f}, sensitivity {a['operating_point']['sensitivity']:.4f}, "
                   f"specificity {a['operating_point']['specificity']:.4f}")  # fmt: skip
    dx = result.get("diagnosis")
    if dx and dx["n"]:
        recall = " ".join(f"{code} {value:.2f}" for code, value in dx["recall"].items())
        mel = "—" if dx["melanoma_auc"] is None else f"{dx['melanoma_auc']:.4f}"
        click.echo(f"differential on {dx['n']} images with a diagnosis: balanced accuracy {dx['balanced_accuracy']:.4f}, "
                   f"melanoma AUC {mel}; recall {recall}")  # fmt: skip
    elif dx is not None:
        click.echo("differential: the folder names no diagnosis (a diagnosis, iddx_3 or iddx_2 column)")
    out_path = out_path or Path(f"evaluation-{result['bundle']}.json")
    write(result, out_path)
    click.echo(f"written to {out_path}")


@main.command()
@click.argument("bundle_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@_folder("--data", "data_dir", help="The ISIC-2024 layout folder the bundle was trained on.")
@click.option("--work-dir", required=True, type=click.Path(path_type=Path), help="Training work folder to create.")
@_needs_train
def unpack(bundle_dir, data_dir, work_dir):
    """Re-create a bundle's training work folder (members as fold checkpoints, their held-out scores computed
    again), so that `dermascan train --work-dir` assembles it again with today's calibration, threshold and gate."""
    from model.errors import ModelError
    from model.training.combine import unpack as run_unpack

    _log_progress()
    try:
        work = run_unpack(bundle_dir, data_dir, work_dir)
    except ModelError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{bundle_dir} unpacked into {work}; assemble it again with `dermascan train --work-dir {work} ...`")


@main.command()
@_folder("--teacher", "teacher_dir", help="The ensemble bundle whose out-of-fold scores the student learns from.")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--work-dir", required=True, type=click.Path(path_type=Path), help="Teacher scores and checkpoints.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Write the student bundle here once trained.")
@click.option("--version", help="Version of the student bundle (default: from the date).")
@_image_size_option
@click.option("--epochs", default=16, show_default=True)
@click.option("--alpha", default=0.5, show_default=True, help="Weight of the teacher's score in the target.")
@click.option("--ema-momentum", type=click.FloatRange(0.5, 0.99999), default=0.99, show_default=True)
@click.option(
    "--ema/--no-ema", default=True, show_default=True, help="Average the weights (--no-ema: the raw weights)."
)
@click.option(
    "--lr-schedule",
    type=click.Choice(["cosine", "plateau"]),
    default="cosine",
    show_default=True,
    help="Cosine decay over the epochs, or ReduceLROnPlateau on validation AUC (fold students only).",
)
@click.option(
    "--augment",
    type=click.Choice(["standard", "strong", "camera", "camera-wide"]),
    default="standard",
    show_default=True,
    help="camera: the standard augmentation plus another dermatoscope's white balance (±15 %), exposure (±25 %), "
    "vignette and circular field of view; camera-wide: the same with white balance ±25 % and exposure ±35 %.",
)
@click.option(
    "--diagnosis-weight",
    type=click.FloatRange(0, 10),
    default=0.0,
    show_default=True,
    help="Train the differential diagnosis (seven classes) as a second output with this loss weight (0: none).",
)
@click.option(
    "--diagnosis-balance",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="Weigh each diagnosis in the differential's loss by its count^-POWER (0: every row alike; 0.5: square "
    "root; 1: balanced classes).",
)
@click.option(
    "--colour-constancy/--no-colour-constancy", default=False, show_default=True, help="Shades of Gray in the graph."
)
@click.option(
    "--metadata-dropout",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="Hide each metadata field with this probability while training.",
)
@click.option(
    "--metadata-dropout-all",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="Hide all metadata fields together with this probability while training.",
)
@click.option(
    "--keep",
    type=click.Choice(["best", "last"]),
    default="best",
    show_default=True,
    help="Fold students: the best epoch by validation AUC, or the last (the final student's rule).",
)
@click.option(
    "--init-seed",
    type=click.IntRange(1, 2**31),
    help="Seed of the training alone (weights, augmentation, batch order; the split keeps its own): "
    "repeats a recipe to see the spread from run to run.",
)
@click.option(
    "--warm-start",
    multiple=True,
    metavar="FOLDER=SOURCE",
    help="Start a student from earlier weights of the same backbone instead of from scratch: e.g. "
    "final=model/bundles/default, fold0=teacher#1 (member 1 of an ensemble bundle; it must not have trained on "
    "fold 0). The differential's head starts fresh.",
)
@click.option("--learning-rate", type=click.FloatRange(1e-6, 1), default=1e-3, show_default=True)
@click.option("--folds", "only_folds", help="Fold students to train (e.g. 0 or 0,1,2): each validated on its fold.")
@click.option("--final/--no-final", default=True, show_default=True, help="Train the student on every development row.")
@click.option("--limit", type=int, help="Only the first N rows (smoke runs).")
@click.option("--backbone", type=click.Choice(["nasnet_mobile", "tiny"]), default="nasnet_mobile", show_default=True)
@_needs_train
def distill(
    teacher_dir, data_dir, work_dir, out_dir, version, image_size, epochs, alpha, ema_momentum, ema, lr_schedule,
    augment, diagnosis_weight, diagnosis_balance, colour_constancy, metadata_dropout, metadata_dropout_all, keep,
    init_seed, warm_start, learning_rate, only_folds, final, limit, backbone,
):  # fmt: skip
    """Distil an ensemble bundle into one network (resumable): fold students measure the recipe, the final student
    (every development row) ships; calibration, threshold and gate are fitted on the held-out calibration set."""
    from model.errors import ModelError
    from model.inference.network import CAMERA_AUGMENTATION, WIDE_CAMERA_AUGMENTATION
    from model.training.distill import STRONG_AUGMENTATION, DistillConfig
    from model.training.distill import distill as run_distill

    _log_progress()
    try:
        folds = [int(k) for k in only_folds.split(",")] if only_folds else []
    except ValueError:
        raise click.BadParameter("a comma-separated list of fold numbers", param_hint="--folds") from None
    starts = {}
    for item in warm_start:
        folder, _, source = item.partition("=")
        if not (folder == "final" or (folder.startswith("fold") and folder[4:].isdigit())) or not source:
            raise click.BadParameter(f"{item!r}: FOLDER=SOURCE, FOLDER final or fold<k>", param_hint="--warm-start")
        starts[folder] = source
    teacher_cfg = read_teacher_config(teacher_dir)
    cfg = DistillConfig(
        image_size=image_size, epochs=epochs, alpha=alpha, ema_momentum=ema_momentum if ema else None,
        lr_schedule=lr_schedule, init_seed=init_seed, limit=limit or teacher_cfg.limit, backbone=backbone,
        folds=teacher_cfg.folds, seed=teacher_cfg.seed, calibration_fraction=teacher_cfg.calibration_fraction,
        augmentation={
            "strong": STRONG_AUGMENTATION, "camera": CAMERA_AUGMENTATION, "camera-wide": WIDE_CAMERA_AUGMENTATION,
        }.get(augment, {}),
        diagnosis_weight=diagnosis_weight, diagnosis_balance=diagnosis_balance, colour_constancy=colour_constancy,
        metadata_dropout=metadata_dropout,
        metadata_dropout_all=metadata_dropout_all, keep=keep, warm_start=starts, learning_rate=learning_rate,
        verbose=1 if sys.stderr.isatty() else 2,
    )  # fmt: skip
    try:
        summary = run_distill(data_dir, teacher_dir, work_dir, cfg, folds, final)
        for row in summary["students"]:
            shown = {k: round(v, 4) for k, v in row.items() if isinstance(v, float)}
            click.echo(f"student {row['student']}: {shown}")
        if out_dir is not None and final:
            from model.training.distill import assemble

            manifest = assemble(data_dir, out_dir, work_dir, version, teacher_dir)
            click.echo(f"bundle {manifest['version']} written to {out_dir}")
            _echo_calibration_set(manifest)
    except ModelError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command("distill-compare")
@click.argument("work_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--fold", default=0, show_default=True, help="The fold whose students are compared.")
@click.option("--boot", "n_boot", default=2000, show_default=True, help="Bootstrap resamples of the patients.")
@_needs_train
def distill_compare(work_dirs, data_dir, fold, n_boot):
    """Fold students of several distill runs on the same patients: AUC and pAUC80 on the validation fold and the
    calibration set, and each run's paired difference from the first (95 % bootstrap interval over patients)."""
    from model.errors import ModelError
    from model.training.distill import compare

    try:
        rows = compare(data_dir, work_dirs, fold, n_boot)
    except ModelError as exc:
        raise click.ClickException(str(exc)) from exc

    def cell(row, key):
        if key not in row:
            return "—"
        text = f"{row[key]:.4f}"
        paired = row.get(f"{key}_vs_first")
        if paired:
            lo, hi = paired["ci95"]
            text += f" ({paired['difference']:+.4f} [{lo:+.4f}, {hi:+.4f}], ahead in {paired['share_ahead']:.0%})"
        return text

    keys = ("validation_auc", "validation_pauc80", "calibration_set_auc", "calibration_set_pauc80")
    click.echo(f"fold-{fold} students; in brackets: the difference from the first run, its 95 % interval")
    click.echo("| student | " + " | ".join(k.replace("_", " ") for k in keys) + " |")
    click.echo("|---" * (len(keys) + 1) + "|")
    for row in rows:
        click.echo(f"| {row['student']} | " + " | ".join(cell(row, k) for k in keys) + " |")
    click.echo(
        "The intervals resample patients only, not the training's own randomness: two runs of one recipe "
        "(distill --init-seed) can differ by more, so compare recipes by a few runs each."
    )


def read_teacher_config(teacher_dir: Path):
    from model.training.config import read_config

    return read_config(teacher_dir)


@main.command("export")
@click.argument("bundle_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["onnx", "litert"]), required=True)
@click.option("--int8", is_flag=True, help="Static post-training quantisation, calibrated on development images.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="The edge package folder.")
@click.option(
    "--data", "data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The bundle's development data (default: the folder its manifest names).",
)  # fmt: skip
@_needs_train
def export_bundle(bundle_dir, fmt, int8, out_dir, data_dir):
    """Export a bundle for the edge (ONNX Runtime or LiteRT, fp32 or int8) and check the package
    against the bundle; exit 1 when the check fails."""
    from dermascan.config import MissingExtra, require_extra
    from edge.scorer import EdgeScorer
    from model.errors import ModelError
    from model.training.export import export

    try:
        require_extra("tf2onnx" if fmt == "onnx" else "ai_edge_litert", "train", f"dermascan export --format {fmt}")
        if int8 or fmt == "onnx":
            require_extra("onnxruntime", "train", "dermascan export")
    except MissingExtra as exc:
        raise click.ClickException(str(exc)) from exc
    _log_progress()
    try:
        manifest = export(bundle_dir, fmt, out_dir, int8=int8, data_dir=data_dir, scorer=EdgeScorer)
    except ModelError as exc:
        raise click.ClickException(str(exc)) from exc
    check = manifest["check"]
    click.echo(f"{manifest['file']} ({manifest['bytes'] / 1e6:.1f} MB, {manifest['runtime']}, {manifest['precision']}) "
               f"written to {out_dir} in {manifest['exported_in_s']:.0f} s")  # fmt: skip
    from edge.scorer import check_summary

    click.echo(
        f"check on {check['n']} held-out lesions: {check_summary(check)} — {'passed' if check['passed'] else 'FAILED'}"
    )
    if not check["passed"]:
        click.echo("the package is kept for inspection; it is not scored with unless asked (--allow-failed-check)")
        raise SystemExit(1)


def _fit_on_bundle(what: str):
    """A command that fits part of an existing bundle on its own development data."""

    def decorate(command):
        command = click.option(
            "--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
            help=f"The bundle's development data (ISIC-2024 layout){what}.",
        )(command)  # fmt: skip
        return click.argument("bundle_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))(command)

    return decorate


@main.command("change-fit")
@_fit_on_bundle(" with a lesion_id column")
@_needs_train
def change_fit(bundle_dir, data_dir):
    """Fit a bundle's lesion change measure (follow-up: "changed since last visit") on the
    same-lesion image pairs of its development patients; report it on its held-out patients."""
    from model.errors import ModelError
    from model.training.gate_fit import add_change

    _log_progress()
    try:
        block = add_change(bundle_dir, data_dir)
    except ModelError as exc:
        raise click.ClickException(str(exc)) from exc
    r = block["report"]["report"]
    click.echo(
        f"change measure: threshold {block['threshold']:.3f} (units of a typical unchanged pair); "
        f"flags {r['flagged']} of {r['pairs']} unchanged same-lesion pairs of held-out patients "
        f"({100 * (r['flagged_share'] or 0):.1f} %, 95 % CI {100 * r['flagged_share_ci95'][0]:.1f}–"
        f"{100 * r['flagged_share_ci95'][1]:.1f} %); two different lesions: {100 * (r['different_lesions_flagged_share'] or 0):.0f} %"
    )


@main.command("missing-fit")
@_fit_on_bundle(": its held-out calibration set is scored")
@_needs_train
def missing_fit(bundle_dir, data_dir):
    """Fit a bundle's maps for studies sent without some metadata (one per pattern of missing
    fields) on its held-out patients with those fields hidden; print what each pattern does at
    the bundle's threshold."""
    from model.errors import ModelError
    from model.training.missing_fit import fit_bundle

    _log_progress()
    try:
        block = fit_bundle(bundle_dir, data_dir)
    except ModelError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(_missing_table(block["report"]))


@main.command("diagnosis-fit")
@_fit_on_bundle(": the differential is refitted on its development rows, reported on its held-out ones")
@click.option("--version", required=True, help="The refitted bundle's version (its weights change).")
@click.option(
    "--cell-stride",
    type=click.IntRange(min=0),
    default=8,
    show_default=True,
    help="The head also reads the network's cell at 1/N of the image's side, pooled as --cell-pool "
    "says (0: the head reads what it reads now).",
)
@click.option(
    "--cell-pool",
    default="average,max",
    show_default=True,
    help="How the cell is pooled: average, max, or both (each channel's mean and largest value).",
)
@click.option("--strength", type=click.FloatRange(min=0, min_open=True),
              help="The L2 strength C, where an earlier run's search chose it (default: the best of "
                   "0.003, 0.01, 0.03, 0.1 out of fold).")  # fmt: skip
@_needs_train
def diagnosis_fit(bundle_dir, data_dir, version, cell_stride, cell_pool, strength):
    """Refit a bundle's differential head (one dense layer on the network's fused features and, by
    default, a pooled earlier cell) with balanced class weights, its strength chosen across the
    bundle's folds; the malignancy output is untouched. Export the ONNX package again afterwards
    (dermascan export)."""
    from model.errors import ModelError
    from model.inference.network import CELL_POOLS
    from model.training.diagnosis_fit import refit

    pools = tuple(p.strip() for p in cell_pool.split(",") if p.strip())
    if not pools or set(pools) - set(CELL_POOLS):
        raise click.BadParameter(f"{cell_pool!r}: average, max or average,max", param_hint="--cell-pool")
    _log_progress()
    try:
        block = refit(bundle_dir, data_dir, version, cell_stride or None, pools, strength)
    except ModelError as exc:
        raise click.ClickException(str(exc)) from exc
    report = block["report"]
    rows = [("development rows, out of fold", report.get("development_out_of_fold")),
            ("calibration set (chose nothing)", report.get("calibration_set")),
            ("calibration set, the previous head", report["refit"]["previous_head"]["calibration_set"])]  # fmt: skip
    click.echo(f"{version}: C = {report['refit']['strength_chosen']}, tau = {block['prior_adjustment']['tau']}")
    codes = [c["code"] for c in block["classes"]]
    click.echo(f"{'':36s} {'n':>5s} {'bal.acc':>7s} {'mel AUC':>7s}   recall " + " / ".join(codes))
    for name, row in rows:
        if row:
            recall = " / ".join(f"{row['recall'].get(c, float('nan')):.2f}" for c in codes)
            click.echo(
                f"{name:36s} {row['n']:5d} {row['balanced_accuracy']:7.3f} {row['melanoma_auc']:7.3f}   {recall}"
            )
    click.echo(
        f"now export its ONNX package again: dermascan export {bundle_dir} --format onnx --out {bundle_dir}/onnx"
    )


@main.command("camera-fit")
@_fit_on_bundle(": the ranges are taken on its development rows")
@click.option("--version", required=True, help="The bundle's new version (what the network is given changes).")
@click.option(
    "--exposure-percentile",
    default="20",
    show_default=True,
    help="An image's exposure is moved into the development images' P-th..(100-P)-th percentiles; "
    "P:Q for P below and Q above (0: that side open; 0 alone: exposure left alone).",
)
@click.option("--colour-percentile", type=float, default=5.0, show_default=True,
              help="An image's colour cast is moved into the development images' P-th..(100-P)-th percentiles (0: left alone).")  # fmt: skip
def camera_fit(bundle_dir, data_dir, version, exposure_percentile, colour_percentile):
    """Fit a bundle's camera clamp: an image whose exposure or colour cast lies outside the development
    images' range is moved to its edge before the network (at most 25 % a channel; the quality checks
    see it as it came). The weights are untouched; export the ONNX package again afterwards."""
    from model.errors import ModelError
    from model.training.camera_fit import fit_bundle, percentiles

    _log_progress()
    try:
        block = fit_bundle(bundle_dir, data_dir, version, percentiles(exposure_percentile), colour_percentile)
    except ModelError as exc:
        raise click.ClickException(str(exc)) from exc
    if not block:
        click.echo(f"{version}: no camera clamp")
    else:
        ends = ["…" if v is None else f"{v:.0f}" for v in block["exposure"]["range"]] if "exposure" in block else []
        ranges = [f"exposure {ends[0]}–{ends[1]}"] if ends else []
        if "colour_cast" in block:
            (r0, b0), (r1, b1) = block["colour_cast"]["range"]
            ranges.append(f"log R/G {r0:+.3f}..{r1:+.3f}, log B/G {b0:+.3f}..{b1:+.3f}")
        click.echo(
            f"{version}: {'; '.join(ranges)} (from {block['fitted_on']} development images, "
            f"{block['development_images_moved']:.1%} of them moved)"
        )
    click.echo(
        f"now export its ONNX package again: dermascan export {bundle_dir} --format onnx --out {bundle_dir}/onnx"
    )


def _missing_table(report: dict) -> str:
    """What each pattern of missing fields does at the threshold, as a table."""
    lines = [
        f"{'fields missing':42s} {'AUC':>6s} {'ECE':>6s} {'sens':>6s} {'spec':>6s}   without its map: sens / spec",
    ]
    for pattern, row in report.items():
        if not isinstance(row, dict) or "auc" not in row:
            continue
        before = row["without_its_map"]
        lines.append(
            f"{pattern:42s} {row['auc']:6.4f} {row['ece']:6.3f} {row['sensitivity']:6.3f} {row['specificity']:6.3f}"
            f"   {before['sensitivity']:.3f} / {before['specificity']:.3f}"
        )
    return "\n".join(lines)


@main.command("heatmap-check")
@_fit_on_bundle(": its held-out calibration set's malignant lesions are used")
@click.option("-n", "n", default=120, show_default=True, help="Malignant lesions to measure on.")
@click.option("--gallery", type=click.Path(dir_okay=False, path_type=Path), help="Write a PNG of 24 maps here.")
@click.option("--draws", default=5, show_default=True, type=click.IntRange(1, 50),
              help="Networks with random weights to check the maps against (seeds 0, 1, …).")  # fmt: skip
@_needs_train
def heatmap_check(bundle_dir, data_dir, n, gallery, draws):
    """Do the bundle's heat maps point at the lesion? The pointing game and the heat's concentration
    on automatic lesion masks, as the images are and shifted sideways, against a map of the middle;
    how unlike they are to the maps of the same network with randomised weights; and a control, the
    map with its position-level factor taken from that randomised network."""
    import json

    from model.training.heatmaps import check_bundle

    _log_progress()
    result = check_bundle(bundle_dir, data_dir, n, gallery, draws=draws)
    for name in ("as_is", "shifted"):
        row = result[name]
        click.echo(
            f"{name.replace('_', ' '):8s}: peak on the lesion {row['map']['pointing']:.1%}, heat on the lesion "
            f"{row['map']['concentration']:.2f}x its share (a map of the middle: {row['centre_baseline']['pointing']:.1%}, "
            f"{row['centre_baseline']['concentration']:.2f}x); {row['map']['n']} lesions"
        )
    for draw in result["randomised_draws"]:
        control = draw["position_control"]
        click.echo(
            f"randomised weights, draw {draw['seed']}: median rank correlation {draw['rank_correlation']:.2f}; "
            f"the map with its position factor (HiResCAM) from this network: peak on the lesion "
            f"{control['as_is']['pointing']:.1%} as is, {control['shifted']['pointing']:.1%} shifted"
        )
    control = result["random_position_control"]
    click.echo(
        f"randomised weights, median of {len(result['randomised_draws'])} draws: rank correlation "
        f"{result['randomised_weights_rank_correlation']:.2f}; control {control['as_is']['pointing']:.1%} as is, "
        f"{control['shifted']['pointing']:.1%} shifted (where the map does no better than its control, its "
        "pointing comes from the image, not from the network)"
    )
    if "keras_difference_max" in result:
        click.echo(
            f"maps drawn by {result['serving_gradcam']} (the workers'), against the Keras network's Grad-CAM: largest "
            f"difference {result['keras_difference_max']:.2e} (median {result['keras_difference_median']:.2e}) on [0, 1]"
        )
    click.echo(json.dumps(result))
