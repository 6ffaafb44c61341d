"""The referral queue on a real PostgreSQL: concurrent claims, stale claims, who may decide."""

from __future__ import annotations

import datetime as dt
import threading

import pytest
from sqlalchemy import select, update

from dermascan.errors import NotAllowed
from dermascan.governance import bundles
from dermascan.infra.db import session_factory
from dermascan.infra.schema import Referral, ReferralStatus, Study, StudyStatus, utcnow
from dermascan.referrals import queue as referrals
from dermascan.screening import results
from dermascan.security.accounts import create_user
from dermascan.security.identity import get_or_create_program
from dermascan.upkeep.sweeper import sweep


def seed_referrals(settings, n: int, bundle_dir) -> list[int]:
    """n scored studies above the threshold → n open referrals (through the real result writer)."""
    factory = session_factory(settings.database_url)
    with factory() as session, session.begin():
        program = get_or_create_program(session, "queue-test")
        bundle = bundles.register(session, bundle_dir)
        studies = [
            Study(program_id=program.id, source="test", meta={"anatom_site_general": "torso" if i % 2 else "head/neck"},
                  image_sha256="0" * 64, image_format="jpeg", status=StudyStatus.PROCESSING)
            for i in range(n)
        ]  # fmt: skip
        session.add_all(studies)
        session.flush()
        scored = [results.ScoredStudy(s.id, 0.4 + 0.5 * (i / n)) for i, s in enumerate(studies)]
        results.record(session, bundle.version, 0.3, scored)
        return [s.id for s in studies]


def make_users(settings, n: int, role="specialist") -> list[int]:
    with session_factory(settings.database_url)() as session, session.begin():
        program = get_or_create_program(session, "queue-test")
        return [create_user(session, f"{role}{i}", "correct-horse-battery", role, program.id).id for i in range(n)]


def test_twenty_concurrent_claimers_each_case_claimed_exactly_once(pg_settings, tiny_bundle):
    settings = pg_settings
    seed_referrals(settings, 100, tiny_bundle)
    users = make_users(settings, 20)
    factory = session_factory(settings.database_url)
    claimed: dict[int, list[int]] = {u: [] for u in users}
    start = threading.Barrier(len(users))
    errors = []

    def claimer(user_id: int):
        try:
            start.wait()
            while True:
                with factory() as session, session.begin():
                    referral = referrals.claim_next(session, user_id, settings.claim_timeout_s)
                    if referral is None:
                        return
                    claimed[user_id].append(referral.id)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    everything = [rid for ids in claimed.values() for rid in ids]
    assert len(everything) == 100 and len(set(everything)) == 100
    assert sum(1 for ids in claimed.values() if ids) > 1  # the work really was shared
    with factory() as session:
        rows = list(session.scalars(select(Referral)))
        assert all(r.status == ReferralStatus.CLAIMED for r in rows)
        owner = {rid: u for u, ids in claimed.items() for rid in ids}
        assert all(r.claimed_by_id == owner[r.id] for r in rows)


def test_queue_order_stale_claims_and_decisions(pg_settings, tiny_bundle):
    settings = pg_settings
    seed_referrals(settings, 6, tiny_bundle)
    alice, bob = make_users(settings, 2)
    factory = session_factory(settings.database_url)
    with factory() as session, session.begin():
        top = referrals.claim_next(session, alice, 60)
        ordered = referrals.open_cases(session, 60)
        assert top.tier <= min(r.tier for r in ordered)
        assert [r.tier for r in ordered] == sorted(r.tier for r in ordered)
    # bob cannot decide alice's case
    with factory() as session, session.begin(), pytest.raises(referrals.ReferralError) as refused:
        referrals.decide(session, top.id, bob, "benign_no_action", None, 60)
    assert isinstance(refused.value, NotAllowed)  # the web layer answers 403
    # alice's claim goes stale → back in the queue, bob can take it, alice can no longer decide
    with factory() as session, session.begin():
        session.execute(
            update(Referral).where(Referral.id == top.id).values(claimed_at=utcnow() - dt.timedelta(seconds=120))
        )
    with factory() as session, session.begin():
        assert top.id in [r.id for r in referrals.open_cases(session, 60)]
    # the sweeper also returns it to the queue explicitly
    assert sweep(settings.replace(claim_timeout_s=60))["stale_claims"] == 1
    with factory() as session, session.begin():
        assert session.get(Referral, top.id).status == ReferralStatus.OPEN
        again = referrals.claim_next(session, bob, 60)
        assert again.id == top.id
    with factory() as session, session.begin(), pytest.raises(referrals.ReferralError):
        referrals.decide(session, top.id, alice, "benign_no_action", None, 60)
    with factory() as session, session.begin():
        decided = referrals.decide(session, top.id, bob, "biopsy_or_excision", "irregular network", 60)
        assert decided.status == ReferralStatus.DECIDED and decided.decided_by_id == bob
    with factory() as session, session.begin(), pytest.raises(referrals.ReferralError, match="already been decided"):
        referrals.decide(session, top.id, bob, "benign_no_action", None, 60)
    # the study's result carries the decision back to its sender (REST, CSV); an undecided one says null
    with factory() as session:
        from dermascan.screening.reports import study_result

        decided_study = session.get(Study, session.get(Referral, top.id).study_id)
        row = study_result(session, decided_study)
        assert (row["referral_id"], row["decision"], row["decision_label"]) == (
            top.id,
            "biopsy_or_excision",
            "Biopsy or excision",
        ) and row["decided_at"]
        other = session.scalar(select(Referral).where(Referral.id != top.id))
        waiting = study_result(session, session.get(Study, other.study_id))
        assert waiting["referral_id"] == other.id and waiting["decision"] is None and waiting["decided_at"] is None
    # filters: by site
    with factory() as session:
        torso = referrals.open_cases(session, 60, referrals.QueueFilter(site="torso"))
        assert torso and all(r.study.meta["anatom_site_general"] == "torso" for r in torso)
        stats = referrals.queue_stats(session, 60)
        assert stats["waiting"] == 5 and stats["oldest_age_s"] is not None


def test_melanoma_first_hand_overs_claims_and_search(pg_settings, tiny_bundle):
    """Within a tier suspected melanoma comes first; a case handed to a colleague is theirs to
    claim; a case opened from a link can be claimed; cases are found again by reference, patient
    and day, and by who decided them."""
    from dermascan.security.identity import pseudonymise

    settings = pg_settings
    factory = session_factory(settings.database_url)
    with factory() as session, session.begin():
        program = get_or_create_program(session, "queue-test")
        bundle = bundles.register(session, tiny_bundle)
        studies = [
            Study(program_id=program.id, source="test", meta={}, image_sha256="0" * 64, image_format="jpeg",
                  status=StudyStatus.PROCESSING, external_id=f"REF-{i}",
                  patient_pseudonym=pseudonymise(settings.secret_key, program.id, "patient-7" if i == 2 else f"p{i}"))
            for i in range(4)
        ]  # fmt: skip
        session.add_all(studies)
        session.flush()
        nevus, melanoma = [0.1, 0.8, 0.02, 0.02, 0.02, 0.02, 0.02], [0.7, 0.2, 0.02, 0.02, 0.02, 0.02, 0.02]
        # the same tier (probability below 0.5), the melanoma ones sent later
        scored = [results.ScoredStudy(s.id, 0.45, differential=d) for s, d in zip(studies, [nevus, nevus, melanoma, melanoma], strict=True)]  # fmt: skip
        results.record(session, bundle.version, 0.3, scored)
        ids, program_id = [s.id for s in studies], program.id
    alice, bob, carol = make_users(settings, 3)
    with factory() as session, session.begin():
        ordered = referrals.open_cases(session, 60)
        assert [r.study_id for r in ordered] == [ids[2], ids[3], ids[0], ids[1]]
        assert [r.suspected for r in ordered] == ["mel", "mel", "nv", "nv"]
        assert [r.study_id for r in referrals.open_cases(session, 60, referrals.QueueFilter(suspected="nv"))] == ids[:2]
        first = referrals.claim_next(session, alice, 60)
        assert first.study_id == ids[2]
    # alice asks bob for a second opinion: the case leaves her hands and waits for him
    with factory() as session, session.begin():
        handed = referrals.hand_over(session, first.id, alice, bob, "second_opinion", "look at the border", 60)
        assert (handed.status, handed.assigned_to_id, handed.assignment_kind) == (
            ReferralStatus.OPEN,
            bob,
            "second_opinion",
        )
    with factory() as session, session.begin():
        assert referrals.claim_next(session, carol, 60).study_id == ids[3]  # carol does not get bob's case
        with pytest.raises(referrals.NotYourClaim):
            referrals.claim(session, first.id, carol, 60)
    with factory() as session, session.begin():
        assert [r.id for r in referrals.handed_to(session, bob)] == [first.id]
        assert referrals.claim_next(session, bob, 60).id == first.id  # handed to him: his first
        referrals.decide(session, first.id, bob, "biopsy_or_excision", None, 60, diagnosis="mel")
    with factory() as session, session.begin(), pytest.raises(referrals.UnknownDecision):
        other = referrals.claim(
            session, session.scalar(select(Referral.id).where(Referral.study_id == ids[0])), alice, 60
        )
        referrals.decide(session, other.id, alice, "benign_no_action", None, 60, diagnosis="psoriasis")
    with factory() as session, session.begin(), pytest.raises(referrals.UnknownColleague):
        case0 = session.scalar(select(Referral.id).where(Referral.study_id == ids[0]))
        referrals.hand_over(session, case0, alice, alice, "assign", None, 60)
    # found again: by part of the reference, by the patient's own id (pseudonymised as at intake), by who decided
    with factory() as session:
        search = referrals.search
        assert [r.study_id for r in search(session, referrals.Search(text="ref-3"))] == [ids[3]]
        by_patient = search(
            session, referrals.Search(text="patient-7"), [pseudonymise(settings.secret_key, program_id, "patient-7")]
        )
        assert [r.study_id for r in by_patient] == [ids[2]]
        assert [r.study_id for r in search(session, referrals.Search(decided_by_id=bob))] == [ids[2]]
        assert search(session, referrals.Search(text="%")) == []  # a wildcard is a character
        today = utcnow().date()
        assert len(search(session, referrals.Search(received_from=today, received_to=today))) == 4
        assert search(session, referrals.Search(received_to=today - dt.timedelta(days=1))) == []


def test_a_decision_is_amended_by_its_decider_or_an_admin_with_a_reason(pg_settings, tiny_bundle):
    settings = pg_settings
    seed_referrals(settings, 1, tiny_bundle)
    alice, bob = make_users(settings, 2)
    (chief,) = make_users(settings, 1, role="admin")
    factory = session_factory(settings.database_url)
    with factory() as session, session.begin():
        case = referrals.claim_next(session, alice, 60)
        with pytest.raises(referrals.ReferralError, match="only a decided case"):
            referrals.amend(session, case.id, alice, "benign_no_action", None, "wrong")
        referrals.decide(session, case.id, alice, "biopsy_or_excision", "first look", 60, diagnosis="mel")
        first_at = session.get(Referral, case.id).decided_at
    with factory() as session, session.begin(), pytest.raises(referrals.NotYourClaim):
        referrals.amend(session, case.id, bob, "benign_no_action", None, "I disagree")  # not his decision
    with factory() as session, session.begin(), pytest.raises(referrals.UnknownDecision, match="reason"):
        referrals.amend(session, case.id, alice, "benign_no_action", None, "  ")
    with factory() as session, session.begin():
        amended = referrals.amend(
            session, case.id, alice, "routine_follow_up", "second look", "histology came back", "nv"
        )
        assert (amended.decision, amended.specialist_diagnosis, amended.note) == (
            "routine_follow_up",
            "nv",
            "second look",
        )
    with factory() as session, session.begin():
        referrals.amend(session, case.id, chief, "benign_no_action", None, "board review", is_admin=True)
    with factory() as session:
        history = referrals.amendments(session, case.id)
        assert [(h.decision, h.reason) for h in history] == [
            ("biopsy_or_excision", "histology came back"),
            ("routine_follow_up", "board review"),
        ]
        assert history[0].decided_at == first_at and history[0].specialist_diagnosis == "mel"
        from dermascan.screening.reports import study_result

        referral = session.get(Referral, case.id)
        row = study_result(session, session.get(Study, referral.study_id))
        assert (row["decision"], row["decision_amendments"], row["decision_amendment_reason"]) == (
            "benign_no_action",
            2,
            "board review",
        )


def test_one_lesion_one_item_settled_together(pg_settings, tiny_bundle):
    """A lesion's waiting visits are one queue item: claiming it claims them all, deciding it
    settles the others with the same decision — except a visit another specialist is reviewing."""
    from dermascan.infra.schema import Lesion

    settings = pg_settings
    factory = session_factory(settings.database_url)
    with factory() as session, session.begin():
        program = get_or_create_program(session, "queue-test")
        bundle = bundles.register(session, tiny_bundle)
        lesion = Lesion(program_id=program.id, key_pseudonym="k" * 32)
        session.add(lesion)
        session.flush()
        studies = [
            Study(program_id=program.id, source="test", meta={}, image_sha256="0" * 64, image_format="jpeg",
                  status=StudyStatus.PROCESSING, lesion_id=lesion.id if i < 3 else None,
                  acquired_at=utcnow() - dt.timedelta(days=30 * (3 - i)))
            for i in range(4)
        ]  # fmt: skip
        session.add_all(studies)
        session.flush()
        results.record(session, bundle.version, 0.3, [results.ScoredStudy(s.id, 0.6) for s in studies])
        ids = [s.id for s in studies]
    alice, bob = make_users(settings, 2)
    with factory() as session, session.begin():
        items = referrals.group_by_lesion(referrals.open_cases(session, 60))
        assert len(items) == 2  # three visits of one lesion, one study without a lesion
        grouped = next(visits for r, visits in items if r.study.lesion_id is not None)
        assert len(grouped) == 2
        by_study = {r.study_id: r.id for r in session.scalars(select(Referral))}
        # bob is reviewing the lesion's second visit (claimed alone, as before visits were grouped)
        session.execute(update(Referral).where(Referral.id == by_study[ids[1]]).values(
            status=ReferralStatus.CLAIMED, claimed_by_id=bob, claimed_at=utcnow()))  # fmt: skip
    with factory() as session, session.begin():
        # claiming the first visit claims the lesion's other visits nobody else holds
        mine = referrals.claim(session, by_study[ids[2]], alice, 60)
        assert [(r.study_id, r.claimed_by_id) for r in referrals.siblings(session, mine)] == [
            (ids[0], alice),
            (ids[1], bob),
        ]
        decided = referrals.decide(session, mine.id, alice, "biopsy_or_excision", "irregular", 60)
        assert [r.study_id for r in decided.settled] == [ids[0]]  # bob's stays with bob
    with factory() as session:
        states = {r.study_id: (r.status, r.decision, r.note) for r in session.scalars(select(Referral))}
        assert states[ids[0]][:2] == (ReferralStatus.DECIDED, "biopsy_or_excision")
        assert states[ids[0]][2] == f"Settled with case #{mine.id} (the same lesion): irregular"
        assert states[ids[1]][0] == ReferralStatus.CLAIMED and states[ids[3]][0] == ReferralStatus.OPEN
