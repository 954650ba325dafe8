"""Request admission and body reading, before any model work.

``read_body`` enforces the body size limit from ``Content-Length`` (before reading) and while
streaming (chunked bodies), decompresses ``Content-Encoding: gzip`` within the same limit and
refuses other encodings. ``Gate`` is the ingress's own admission (a request runs, waits in a
bounded queue, or gets a JSON 503 at once); ``Reservation`` admits a request's documents to a
model deployment as a whole, so a request that does not fit costs no model work.
"""

from __future__ import annotations

import asyncio
import math
import zlib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

from starlette.requests import Request

ENCODINGS = ("identity", "gzip")


class WireError(Exception):
    """A refusal with an HTTP status, a message and headers (the ingress answers it as JSON)."""

    def __init__(self, status: int, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def retry_after(seconds: float) -> dict[str, str]:
    """The Retry-After header, rounded up to whole seconds (RFC 9110 delay-seconds)."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def _too_large(limit: int, what: str = "request body") -> WireError:
    return WireError(413, f"{what} over {limit:,} bytes; at most {limit:,} per request: split "
                          "the texts over several requests")


def _encoding(request: Request) -> str:
    encoding = request.headers.get("content-encoding", "identity").strip().lower() or "identity"
    if encoding not in ENCODINGS:
        raise WireError(415, f"Content-Encoding {encoding!r} is not supported; send "
                             f"{' or '.join(ENCODINGS)}", {"Accept-Encoding": ", ".join(ENCODINGS)})
    return encoding


def _declared_length(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is None:
        return
    if not declared.isdigit():
        raise WireError(400, f"Content-Length {declared!r} is not a number of bytes")
    if int(declared) > limit:
        raise _too_large(limit)


async def _raw(request: Request, limit: int) -> bytes:
    """The body as sent, read chunk by chunk and refused as soon as it passes ``limit``."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def gunzip(data: bytes, limit: int) -> bytes:
    """``data`` decompressed, refused (413) as soon as the output passes ``limit`` bytes."""
    inflater = zlib.decompressobj(wbits=31)  # gzip header and trailer
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise WireError(400, f"request body is not valid gzip ({exc})") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise _too_large(limit, "decompressed request body")
    if not inflater.eof:
        raise WireError(400, "request body is not valid gzip (truncated stream)")
    return out


async def read_body(request: Request, limit: int) -> bytes:
    """The request body (decompressed), at most ``limit`` bytes before and after gzip."""
    encoding = _encoding(request)
    _declared_length(request, limit)
    data = await _raw(request, limit)
    return gunzip(data, limit) if encoding == "gzip" else data


class Gate:
    """At most ``running`` requests at once, ``waiting`` more queued (-1: any number); others
    are refused with a JSON 503 at once."""

    def __init__(self, running: int, waiting: int, retry_after_s: float) -> None:
        self.slots = asyncio.Semaphore(running)
        self.waiting, self.queued = waiting, 0
        self.retry_after_s = retry_after_s

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        if self.slots.locked() and 0 <= self.waiting <= self.queued:
            raise WireError(503, "the service is busy (too many requests at once); retry "
                                 "shortly", retry_after(self.retry_after_s))
        self.queued += 1
        try:
            await self.slots.acquire()
        finally:
            self.queued -= 1
        try:
            yield
        finally:
            self.slots.release()


class Reservation:
    """Documents in flight to one model deployment, at most ``capacity`` (None: no bound)."""

    def __init__(self, capacity: int | None, retry_after_s: float) -> None:
        self.capacity, self.in_flight = capacity, 0
        self.retry_after_s = retry_after_s

    @contextmanager
    def hold(self, documents: int) -> Iterator[None]:
        """Room for all ``documents`` of a request, or a JSON 503 before any is sent."""
        if self.capacity is not None and self.in_flight + documents > self.capacity:
            raise WireError(503, f"the model is overloaded ({self.in_flight} documents in "
                                 f"flight, room for {self.capacity}); retry shortly",
                            retry_after(self.retry_after_s))
        self.in_flight += documents
        try:
            yield
        finally:
            self.in_flight -= documents
