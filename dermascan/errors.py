"""The core's one error style: domain exceptions that say what kind of refusal they are, never
an HTTP status. The web layer maps the kind to a response (``web/errors.py``); the CLI prints the
message; a worker logs it."""

from __future__ import annotations


class DomainError(Exception):
    """A request the domain refuses, with a message for people."""


class Invalid(DomainError):
    """The input is wrong (a bad value, an unknown choice)."""


class NotFound(DomainError):
    """The thing asked for does not exist (or is not the caller's to see)."""


class NotAllowed(DomainError):
    """The caller may not do this."""


class Conflict(DomainError):
    """The thing is not in a state that allows this (already decided, claimed by someone else)."""


class TooLarge(DomainError):
    """The input is over a size limit."""
