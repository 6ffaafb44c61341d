"""Streaming multipart/related (RFC 2387) for STOW-RS, on python-multipart's push parser.

The body is read in small chunks and parsed as it arrives: only the part being received is held
in memory, and a part over ``max_part_bytes`` stops being kept the moment it passes the limit
(its remaining bytes are read and dropped), so a 512 MB request never becomes one 512 MB buffer
or a list of slices of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser

CHUNK = 64 * 1024


class MultipartError(ValueError):
    pass


@dataclass
class Part:
    headers: dict[str, str] = field(default_factory=dict)
    payload: bytearray = field(default_factory=bytearray)
    size: int = 0  # bytes received, kept or not
    too_large: bool = False


def iter_parts(stream: BinaryIO, boundary: str, max_part_bytes: int) -> Iterator[Part]:
    """Yield each part of the body as soon as it is complete."""
    done: list[Part] = []
    current: list[Part] = []
    header = {"field": bytearray(), "value": bytearray()}
    ended = []

    def on_part_begin():
        current[:] = [Part()]

    def on_header_field(data, start, end):
        header["field"] += data[start:end]

    def on_header_value(data, start, end):
        header["value"] += data[start:end]

    def on_header_end():
        name = header["field"].decode("latin-1").strip().lower()
        current[0].headers[name] = header["value"].decode("latin-1").strip()
        header["field"], header["value"] = bytearray(), bytearray()

    def on_part_data(data, start, end):
        part = current[0]
        part.size += end - start
        if part.size > max_part_bytes:
            part.too_large = True
            part.payload = bytearray()
        elif not part.too_large:
            part.payload += data[start:end]

    def on_part_end():
        done.append(current.pop())

    callbacks = {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_part_data": on_part_data, "on_part_end": on_part_end,
        "on_end": lambda: ended.append(True),
    }  # fmt: skip
    parser = MultipartParser(boundary.encode("latin-1"), callbacks)
    seen = 0
    try:
        while chunk := stream.read(CHUNK):
            seen += len(chunk)
            parser.write(chunk)
            while done:
                yield done.pop(0)
        parser.finalize()
    except MultipartParseError as exc:
        raise MultipartError(f"the multipart body cannot be parsed: {exc}") from None
    while done:
        yield done.pop(0)
    if not ended and seen:
        raise MultipartError("the multipart body ends before its closing boundary")
    if not seen:
        raise MultipartError("the body is empty")
