"""Security: who may do what, and the trace of what they did — the installation secret's keys per
purpose (``keys``: sessions and CSRF, patient pseudonyms, callback signing, token hashing),
portal accounts and API tokens (``accounts``), programs and the keyed pseudonyms that replace
patient identifiers (``identity``), the append-only audit trail (``audit``), where DermaScan may
connect out to (``outbound``) and the CSV cell guard against formula injection (``csv_cells``). It
stands on ``infra`` only; every other room may use it."""
