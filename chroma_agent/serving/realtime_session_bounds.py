"""Per-session bounds of the Realtime server: the conversation items a session keeps (count
and JSON bytes), its pending user input (items and bytes not yet answered), how far its
audio may run ahead of real time, and its time (idle timeout, maximum length).

Over a bound a client's event is refused with an `error` event naming the bound and the
field (`ProtocolError`) and the session goes on; the time bounds end the session, with an
`error` event first (`SessionTimeout`).
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import Awaitable, Callable

import numpy as np

from .realtime_limits import Limits
from .realtime_protocol import ProtocolError

LIMIT_CODE = "session_limit_reached"


def item_bytes(item: dict) -> int:
    """An item's size as it is kept (its JSON)."""
    return len(json.dumps(item, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass"))


class Items:
    """The conversation items by id, in order, with their JSON size. A client's item over
    the count or byte cap is refused (`check`); the server's own items (a committed turn, a
    reply) push the oldest out instead, since nothing could be refused there."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.by_id: dict[str, dict] = {}
        self.sizes: dict[str, int] = {}
        self.bytes = 0

    def check(self, item: dict, event_id: str | None = None) -> int:
        """The item's size, or a ProtocolError if keeping it would pass a cap."""
        size = item_bytes(item)
        if len(self.by_id) >= self.limits.max_items:
            raise ProtocolError(f"this session keeps at most {self.limits.max_items} conversation items; delete "
                                "some (conversation.item.delete) first", code=LIMIT_CODE, param="item",
                                event_id=event_id)
        if self.bytes + size > self.limits.max_items_bytes:
            raise ProtocolError(f"this session keeps at most {self.limits.max_items_bytes} bytes of conversation "
                                f"items ({self.bytes} kept, this one {size}); delete some first", code=LIMIT_CODE,
                                param="item", event_id=event_id)
        return size

    def put(self, item: dict) -> None:
        """Keep `item` (one with a kept id is replaced in its place); the oldest go while over a cap."""
        size = item_bytes(item)
        self.bytes += size - self.sizes.get(item["id"], 0)
        self.by_id[item["id"]], self.sizes[item["id"]] = item, size
        while len(self.by_id) > 1 and (len(self.by_id) > self.limits.max_items
                                       or self.bytes > self.limits.max_items_bytes):
            self.pop(next(iter(self.by_id)))

    def pop(self, item_id: str) -> dict | None:
        self.bytes -= self.sizes.pop(item_id, 0)
        return self.by_id.pop(item_id, None)

    def __contains__(self, item_id) -> bool:
        return item_id in self.by_id

    def __getitem__(self, item_id: str) -> dict:
        return self.by_id[item_id]

    def __len__(self) -> int:
        return len(self.by_id)

    def __iter__(self):
        return iter(self.by_id)

    def __reversed__(self):
        return reversed(self.by_id)

    def last(self) -> str | None:
        return next(reversed(self.by_id), None)


def pending_bytes(audio: list[np.ndarray], text: str) -> int:
    return sum(a.nbytes for a in audio) + len(text)


def check_pending(limits: Limits, pending: list[tuple[str, list[np.ndarray], str]], size: int,
                  param: str | None, event_id: str | None = None) -> None:
    """A ProtocolError if one more pending input of `size` bytes passes the pending caps."""
    if len(pending) >= limits.max_pending_items:
        raise ProtocolError(f"at most {limits.max_pending_items} user inputs may wait for a reply; send "
                            "response.create (or delete some) first", code=LIMIT_CODE, param=param and "item",
                            event_id=event_id)
    held = sum(pending_bytes(chunks, text) for _, chunks, text in pending)
    if held + size > limits.max_pending_bytes:
        raise ProtocolError(f"the user input waiting for a reply may hold at most {limits.max_pending_bytes} bytes "
                            f"({held} held, this one {size}); send response.create first", code=LIMIT_CODE,
                            param=param, event_id=event_id)


class AudioPace:
    """Audio appended against the wall clock since the session's first append: an append
    that would put it more than `max_audio_ahead_s` ahead is refused (and not buffered)."""

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic):
        self.allowance, self.clock = limits.max_audio_ahead_s, clock
        self.started: float | None = None
        self.appended_s = 0.0

    def take(self, seconds: float, event_id: str | None = None) -> None:
        if self.allowance is None or seconds <= 0:
            return
        now = self.clock()
        if self.started is None:
            self.started = now
        ahead = self.appended_s + seconds - (now - self.started)
        if ahead > self.allowance:
            raise ProtocolError(f"input audio may run at most {self.allowance:g} s ahead of real time; this append "
                                f"({seconds:.2f} s) would put it {ahead:.2f} s ahead and was dropped: send audio as "
                                "it is captured", code="input_audio_ahead_of_real_time", param="audio",
                                event_id=event_id)
        self.appended_s += seconds


class SessionTimeout(Exception):
    """The session's time is up: `code` and `message` go to the client in an error event."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class SessionClock:
    """The idle timeout (no client event while no reply plays; a reply's end counts as
    activity) and the maximum session length, enforced while waiting for the next message."""

    def __init__(self, limits: Limits):
        self.idle_s, self.max_s = limits.idle_timeout_s, limits.max_session_s
        self.started = self.last = time.monotonic()
        self._receiving: asyncio.Future | None = None

    def touch(self) -> None:
        self.last = time.monotonic()

    @property
    def expires_at(self) -> int:
        """The session's end as a unix time (session.created's `expires_at`; 0: none)."""
        return 0 if self.max_s is None else int(time.time() + self.max_s - (time.monotonic() - self.started))

    async def receive(self, receive: Callable[[], Awaitable[dict]], busy: Callable[[], bool]) -> dict:
        """The next websocket message, or SessionTimeout. `busy()`: a reply is playing."""
        if self._receiving is None:
            self._receiving = asyncio.ensure_future(receive())
        while True:
            now = time.monotonic()
            end = float("inf") if self.max_s is None else self.started + self.max_s
            idle_end = float("inf") if self.idle_s is None else self.last + self.idle_s
            if now >= end:
                self.stop()
                minutes = f"{self.max_s / 60:g} minutes" if self.max_s >= 60 else f"{self.max_s:g} s"
                raise SessionTimeout("session_expired", f"Your session hit the maximum duration of {minutes}.")
            if now >= idle_end:
                if busy():  # a reply is playing: the client may well be listening
                    self.last = now
                    continue
                self.stop()
                raise SessionTimeout("idle_timeout", f"the session was idle for {self.idle_s:g} s (no client event "
                                                     "while no reply was playing); closing it")
            done, _ = await asyncio.wait({self._receiving}, timeout=min(end, idle_end) - now)
            if done:
                message, self._receiving = self._receiving.result(), None
                self.last = time.monotonic()
                return message

    def stop(self) -> None:
        """Stop waiting for a message (the session ends)."""
        if self._receiving is not None:
            self._receiving.cancel()
            self._receiving = None
