"""`BodyLimit`: the cap on every request body of a server, checked before a route reads it.

    app.add_middleware(BodyLimit, max_bytes=16 * 1024, on_refused=log_line)

A declared `Content-Length` over `max_bytes` is refused (413) before a byte is read; a body
without one (chunked) is read up to the cap, then refused, the rest never read; with
`timeout_s`, a body that has not arrived whole by then gets 408. The route then gets the
body already read. Refusals answer `{"error": ...}` with `Connection: close` (a body left
unread cannot carry another request). Pure ASGI: no framework imported.
"""
from __future__ import annotations

import asyncio
import json
from typing import Callable


class BodyLimit:
    """ASGI middleware over `app`: HTTP bodies at most `max_bytes`. `on_refused(reason)` is
    told of each refusal (e.g. a rate-limited log); `timeout_s`: the most a body may take
    to arrive (None: no limit here, the connection's own request deadline applies)."""

    def __init__(self, app, max_bytes: int, on_refused: Callable[[str], object] | None = None,
                 timeout_s: float | None = None):
        self.app, self.max_bytes, self.on_refused, self.timeout_s = app, max_bytes, on_refused, timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers", ()))
        length = headers.get(b"content-length", b"").strip()
        if length and (not length.isdigit() or int(length) > self.max_bytes):
            return await self.refuse(send, 413, f"request body over {self.max_bytes} bytes",
                                     "a request body over the cap (by its Content-Length)")
        try:
            async with asyncio.timeout(self.timeout_s):
                body = await self.read(receive)
        except TimeoutError:
            return await self.refuse(send, 408, f"the body did not arrive within {self.timeout_s:g} s",
                                     "a request body too slow")
        if body is None:
            return await self.refuse(send, 413, f"request body over {self.max_bytes} bytes",
                                     "a request body over the cap (read up to the cap)")
        await self.app(scope, replay(body, receive), send)

    async def read(self, receive) -> bytes | None:
        """The whole body, chunk by chunk; None once it passes the cap (the rest unread)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"".join(chunks)   # the client left: the app sees what came
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def refuse(self, send, status: int, message: str, reason: str) -> None:
        if self.on_refused is not None:
            self.on_refused(reason)
        await send_error(send, status, message)


async def send_error(send, status: int, message: str) -> None:
    """An HTTP `{"error": message}` answer that closes the connection."""
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def replay(body: bytes, receive):
    """A `receive` that gives the body already read, then the client's own messages (its disconnect)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
