"""Batched scoring in the worker: claim → read + decode (a thread, overlapped with the model) →
predict → write predictions, statuses and referrals in one transaction.

One study whose image cannot be read or decoded fails alone, with its reason; the rest of its
batch is scored. The task holds its studies' leases only while it runs (``worker.leases``). Each
task times its ``STAGES`` (summed over its pieces; reading and decoding overlap the model's work).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from dermascan.config import Settings
from dermascan.governance import bundles
from dermascan.infra.blobs import BlobError, BlobUnavailable, blob_store
from dermascan.infra.db import session_factory
from dermascan.infra.schema import ModelBundle, Study
from dermascan.screening import results
from worker import metrics, runtime
from worker.leases import Holding, holding, lease_owner
from worker.runtime import BundleNotActive, TransientError, predictor, register_bundle, score_in_shadow

log = logging.getLogger(__name__)
STAGES = ("claim", "read", "decode", "wait", "infer", "checks", "shadow", "write")


@dataclass
class Outcome:
    scored: int = 0
    failed: int = 0
    skipped: int = 0
    not_assessable: int = 0
    referred_ids: list[int] = field(default_factory=list)
    scored_ids: list[int] = field(default_factory=list)
    finished_batches: list[str] = field(default_factory=list)
    timings: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {
            "scored": self.scored, "failed": self.failed, "skipped": self.skipped,
            "referred": len(self.referred_ids), "not_assessable": self.not_assessable, "timings": self.timings,
        }  # fmt: skip

    def merge(self, other: Outcome) -> None:
        """Add what was served on the way (interactive studies between bulk pieces)."""
        self.referred_ids += other.referred_ids
        self.scored_ids += other.scored_ids
        self.finished_batches += other.finished_batches


@dataclass
class Item:
    study_id: int
    sha256: str
    meta: dict
    batch_id: str | None
    created_at: object = None
    priority: str = "bulk"

    @classmethod
    def of(cls, study) -> Item:
        """From a claimed row (``results.claim``) or a Study."""
        return cls(study.id, study.image_sha256, dict(study.meta or {}), study.batch_id, study.created_at,
                   str(study.priority.value))  # fmt: skip


@dataclass
class _Work:
    """What scoring the pieces of a claim produced, before it is written."""

    scored: list = field(default_factory=list)
    shadow: dict = field(default_factory=dict)
    failed: list = field(default_factory=list)
    served: list = field(default_factory=list)  # outcomes of interactive studies served between pieces
    timing: dict = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))


class ScoreStudies:
    """One score task: the studies of its message (and, for an interactive one, others waiting)."""

    def __init__(self, settings: Settings, study_ids: list[int], interactive: bool = False):
        self.settings = settings
        self.study_ids = list(study_ids)
        self.interactive = interactive
        self.factory = session_factory(settings.database_url)
        self.blobs = blob_store(settings)
        self.owner = lease_owner()
        self.claim_s = 0.0  # claiming (and, for an interactive task, gathering) the studies

    def run(self) -> Outcome:
        """Check the bundle may decide, claim, score the pieces (serving waiting interactive studies
        between bulk pieces), write in one transaction; the leases go with the task."""
        pred = predictor(self.settings)
        shadows = self._bundles_that_score(pred)
        with holding(self.settings, self.owner) as held:
            t0 = time.perf_counter()
            items = self._claim(held)
            self.claim_s = time.perf_counter() - t0
            asked = set(self.study_ids)
            outcome = Outcome(skipped=len(asked) - sum(1 for i in items if i.study_id in asked))
            if items:
                self._score_and_write(pred, shadows, items, outcome, held, serve_waiting=not self.interactive)
        return outcome

    def _claim(self, held: Holding) -> list[Item]:
        try:
            with self.factory() as session, session.begin():
                items = [Item.of(s) for s in results.claim(session, self.study_ids, self.owner, self.settings.lease_s)]
            held.claimed(i.study_id for i in items)
            if self.interactive:
                items += self._gather(held, len(items), [i.study_id for i in items])
        except OperationalError as exc:
            raise TransientError(str(exc)) from exc
        return items

    def _gather(self, held: Holding, have: int, seen: list[int], wait: bool = True) -> list[Item]:
        """Dynamic batching: add queued interactive studies until the batch is full or the maximum
        wait has passed (as Triton's dynamic batcher does); ``wait=False``: one look, no wait."""
        extra: list[Item] = []
        deadline = time.monotonic() + (self.settings.batch_max_wait_ms / 1000.0 if wait else 0.0)
        while have + len(extra) < self.settings.batch_max_size:
            with self.factory() as session, session.begin():
                room = self.settings.batch_max_size - have - len(extra)
                ids = results.gather_interactive(session, seen, room, self.owner, self.settings.lease_s)
                if ids:
                    extra += [Item.of(s) for s in session.scalars(select(Study).where(Study.id.in_(ids)))]
                    held.claimed(ids)
                    seen = [*seen, *ids]
            if time.monotonic() >= deadline:
                break
            if not ids:
                time.sleep(min(0.005, max(0.0, deadline - time.monotonic())))
        return extra

    def _bundles_that_score(self, pred) -> dict:
        """The active-bundle check (this worker's bundle must be the deciding one: registered
        again if the database lost it) and the shadow bundles' predictors."""
        with self.factory() as session, session.begin():
            row = session.get(ModelBundle, pred.version) or register_bundle(self.settings, session)
            if not row.active:
                raise BundleNotActive(f"bundle {pred.version} is not the active bundle")
            return runtime.shadow_predictors(self.settings, bundles.shadows(session))

    def _score_and_write(self, pred, shadows, items, outcome: Outcome, held: Holding, serve_waiting: bool) -> None:
        work = self._score_pieces(pred, shadows, items, held if serve_waiting else None)
        self._write(pred, items, work, outcome)
        held.written(i.study_id for i in items)
        metrics.record(outcome, items)
        for other in work.served:
            outcome.merge(other)
        log.info("scored %d, failed %d, referred %d (%s)", outcome.scored, outcome.failed, len(outcome.referred_ids), outcome.timings)  # fmt: skip

    def _serve_waiting(self, pred, shadows, held: Holding) -> list[Outcome]:
        """Between the pieces of a bulk chunk: score interactive studies that arrived meanwhile,
        so a person waits for at most one piece of bulk work, however large the chunk."""
        try:
            extra = self._gather(held, 0, [], wait=False)
        except OperationalError:
            return []
        if not extra:
            return []
        log.info("serving %d interactive studies between bulk pieces", len(extra))
        served = Outcome()
        self._score_and_write(pred, shadows, extra, served, held, serve_waiting=False)
        return [served]

    def _prepare(self, pred, items: list[Item]):
        """Read blobs and decode (runs in a thread while the model works on the previous piece)."""
        t0 = time.perf_counter()
        images, failed, keep = [], [], []
        # concurrently on the object store; BlobUnavailable propagates: the task is retried
        for item, data in zip(items, self.blobs.get_many([i.sha256 for i in items]), strict=True):
            if isinstance(data, BlobError):
                failed.append((item.study_id, str(data)))
            else:
                images.append(data)
                keep.append(item)
        t1 = time.perf_counter()
        prepared = pred.pre_process(images, [i.meta for i in keep], [i.study_id for i in keep])
        for index, error in prepared.errors.items():
            failed.append((keep[index].study_id, f"image cannot be decoded: {error.reason}"))
        ok = list(prepared.ok)
        return [keep[i] for i in ok], prepared, failed, (t1 - t0, time.perf_counter() - t1), [images[i] for i in ok]

    def _score_pieces(self, pred, shadows: dict, items: list[Item], serve_between: Holding | None) -> _Work:
        """Pieces of the largest batch shape; the next piece is read and decoded in a thread while
        the model scores this one; each piece is scored by the shadow bundles too."""
        piece = max(pred.batch_sizes)
        pieces = [items[i : i + piece] for i in range(0, len(items), piece)]
        work = _Work()
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(self._prepare, pred, pieces[0])
            for n in range(len(pieces)):
                if n and serve_between is not None:
                    work.served += self._serve_waiting(pred, shadows, serve_between)
                t_wait = time.perf_counter()
                try:
                    kept, prepared, bad, (t_read, t_decode), kept_images = future.result()
                except BlobUnavailable as exc:  # the task is retried; its leases are given back
                    raise TransientError(str(exc)) from exc
                # the part of read + decode the network did not hide (all of it for a task's first piece)
                work.timing["wait"] += time.perf_counter() - t_wait
                if n + 1 < len(pieces):
                    future = pool.submit(self._prepare, pred, pieces[n + 1])
                work.timing["read"] += t_read
                work.timing["decode"] += t_decode
                work.failed += bad
                t0 = time.perf_counter()
                predicted = pred.predict(prepared.pixels, prepared.meta)  # forward pass and calibration
                t1 = time.perf_counter()
                scores = pred.post_process(prepared, predicted)  # quality checks and the gate
                work.timing["infer"] += t1 - t0
                work.timing["checks"] += time.perf_counter() - t1
                work.scored += [results.ScoredStudy.of(i.study_id, s) for i, s in zip(kept, scores, strict=True)]
                t0 = time.perf_counter()
                for version, shadow in shadows.items():  # the same studies, deciding nothing
                    work.shadow.setdefault(version, []).extend(score_in_shadow(version, shadow, kept, kept_images))
                work.timing["shadow"] += time.perf_counter() - t0
        return work

    def _write(self, pred, items: list[Item], work: _Work, outcome: Outcome) -> None:
        """Predictions, statuses, referrals and shadow predictions in one transaction."""
        t0 = time.perf_counter()
        try:
            with self.factory() as session, session.begin():
                threshold = session.get(ModelBundle, pred.version).threshold
                written = results.record(
                    session, pred.version, threshold, work.scored, work.failed, self.owner, change=pred.change
                )
                for version, theirs in work.shadow.items():
                    results.record_shadow(session, version, session.get(ModelBundle, version).threshold, theirs)
                outcome.finished_batches = results.finished_batches(session, [i.batch_id for i in items])
        except OperationalError as exc:
            raise TransientError(str(exc)) from exc
        work.timing["write"] = time.perf_counter() - t0
        if written["lost_lease"]:
            log.warning(
                "%d studies were taken over by another worker while this one scored them (its lease ran out): "
                "their results are that worker's, nothing written here", len(written["lost_lease"]),
            )  # fmt: skip
        outcome.scored, outcome.failed = len(written["scored_ids"]), written["failed"]
        outcome.referred_ids, outcome.scored_ids = written["high_risk"], written["scored_ids"]
        outcome.not_assessable = len(written["not_assessable"])
        outcome.timings = {k: round(v, 4) for k, v in work.timing.items()}
        outcome.timings["claim"] = round(self.claim_s, 4)
        outcome.timings["batch_size"] = len(items)
