"""Engine and session factory. The session lifecycle stays with the caller (request, task, CLI
command): ``with factory() as session, session.begin():``; domain functions take a ``Session``
and never commit on their own."""

from __future__ import annotations

from functools import lru_cache

from sqlalchemy import create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker


@lru_cache(maxsize=8)
def engine_for(url: str, pre_ping: bool = True) -> Engine:
    """The engine of a database URL (one per process). ``pre_ping=False`` skips the liveness
    round trip on every checkout, for hot loops that retry on a dropped connection themselves."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=pre_ping, pool_size=5, max_overflow=10)


def session_factory(url: str, pre_ping: bool = True) -> sessionmaker[Session]:
    return sessionmaker(engine_for(url, pre_ping), expire_on_commit=False)


def dialect_insert(session: Session, table):
    """An INSERT with the dialect's ``ON CONFLICT`` support (PostgreSQL, SQLite)."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"no ON CONFLICT support for {dialect}")


def insert_ignoring_conflicts(session: Session, table, rows: list[dict], conflict: list[str]) -> None:
    """INSERT ``rows`` (every row with the same keys); a row whose ``conflict`` columns already
    exist is skipped.

    One cached statement executed for many rows, not ``.values(rows)``, which compiled a new
    statement with a bound parameter per value on every call (a third of a result write's time).
    On PostgreSQL the statement returns its conflict columns: that makes it one that SQLAlchemy's
    "insertmanyvalues" sends as multi-row VALUES, a round trip per thousand rows, where an
    ``ON CONFLICT`` statement without RETURNING went to the driver's executemany, a round trip
    per row. (SQLite, in process, has no round trips to save.)"""
    if not rows:
        return
    statement = dialect_insert(session, table).on_conflict_do_nothing(index_elements=conflict)
    if session.get_bind().dialect.name == "postgresql":
        statement = statement.returning(*(table.c[name] for name in conflict))
    session.execute(statement, rows)
