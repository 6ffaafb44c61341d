"""Upkeep: the work that keeps a deployment whole without anyone's help — the sweeper (``sweeper``:
studies whose message was lost or whose worker died are sent again, stale referral claims return to
the queue), the retention policy (``retention``: images and heat maps of finished, decided studies
deleted after the configured days) and the consistency check (``check``: what is stored, read back
against its sha256). It runs on a schedule in every worker and from the CLI, and is the one room
that may call into the side rooms (intake's enqueue, the referral queue)."""
