"""DermaScan's domain core, in rooms by domain (each room's docstring says what it holds):

- ``infra``: database, schema, migrations, blob store, the broker app;
- ``security``: keys, accounts and tokens, programs and pseudonyms, the audit trail;
- ``ingest``: parsing the ways in (manifests, ZIPs, JSON, DICOM, multipart) into study inputs;
- ``screening``: writing results, the referral rule, reading results;
- ``intake``: submission (the one path from parsed input to stored, queued studies) and the
  C-STORE receiver;
- ``referrals``: the specialists' queue and outcomes;
- ``results_out``: every way a result leaves (DICOM objects, FHIR, callbacks, PACS delivery);
- ``governance``: bundle states, operating point, monitoring, the monthly report;
- ``upkeep``: the sweeper and retention;
- ``cli``: the ``dermascan`` command.

Beside them only ``config`` (settings) and ``errors`` (the domain's kinds of refusal). Nothing here
imports ``web/`` or ``worker/``; Keras is only imported inside the CLI's model commands, so the
portal never loads it. The doors between rooms are enforced by ``tests/test_project.py``.
"""

__version__ = "0.1.0"
