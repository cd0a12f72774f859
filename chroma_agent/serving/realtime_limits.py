"""What one Realtime client may send (`Limits`, documented in the README) and the token
budgets measured at the protocol edge: session instructions, each text item, a response's
instructions and the joined pending turn, in the model's own tokens, so what reaches
`Conversation.respond` fits the conversation's history cap (8192 tokens).

A string is first bounded by its length (no tokenizing a 2 MB string): at most one token
per UTF-8 byte (byte-level BPE), so a string of `limit` bytes or fewer is within the
limit as it is; one over `limit * MAX_CHARS_PER_TOKEN` characters is over it. Only the
strings in between are tokenized, the big ones in a worker thread.
"""
from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, replace
from typing import Any

from .realtime_protocol import ProtocolError

MAX_CHARS_PER_TOKEN = 16          # English averages ~4 characters a token: 16 leaves room for odd text
TOKENIZE_INLINE_CHARS = 1024      # longer strings are tokenized off the event loop
TOO_LONG = "string_above_max_length"   # the hosted API's code for a string over its limit
ENV = {"idle_timeout_s": "CHROMA_AGENT_REALTIME_IDLE_TIMEOUT_S",
       "max_session_s": "CHROMA_AGENT_REALTIME_MAX_SESSION_S",
       "max_audio_ahead_s": "CHROMA_AGENT_REALTIME_MAX_AUDIO_AHEAD_S"}


@dataclass(frozen=True)
class Limits:
    """What one client may send. A message over `max_message_bytes` closes the websocket
    (1009, by uvicorn); an append over `max_append_s`, or that would put the session's
    audio more than `max_audio_ahead_s` ahead of real time, is an error event; a turn past
    `max_turn_s` keeps its latest part (the model hears at most 30 s). Token budgets:
    session instructions, one text item, a response's instructions, all pending text
    together. Session bounds: conversation items kept (count, JSON bytes), pending user
    input (items, bytes). Time: `idle_timeout_s` without a client event while no reply
    plays, `max_session_s` in all (None: no limit). Each is refused with an error event
    and the session goes on, but the time bounds, which end it."""

    max_message_bytes: int = 2 * 1024 * 1024   # ~43 s of 24 kHz pcm16 as base64
    max_append_s: float = 30.0
    max_turn_s: float = 30.0
    max_items: int = 1000
    max_sessions_per_client: int | None = None  # None: no per-address cap (behind a proxy all share one)
    max_instructions_tokens: int = 4000          # the conversation's system prompt cap (4096) less its chat template
    max_text_item_tokens: int = 2048
    max_response_instructions_tokens: int = 2048
    max_pending_text_tokens: int = 3072          # a turn may take 8192 - 4096: 3072 text + 30 s audio (750) + template
    max_items_bytes: int = 4 * 1024 * 1024       # the kept items as JSON (function calls carry client payloads)
    max_pending_items: int = 64
    max_pending_bytes: int = 8 * 1024 * 1024     # pending audio (16 kHz float32: 64 KB/s, ~2 min) and text
    max_audio_ahead_s: float | None = 2.0        # as the Twilio server: no session buffers a fast sender's audio
    idle_timeout_s: float | None = 60.0
    max_session_s: float | None = 3600.0         # the hosted API's 60 minutes


def limits_for_serve(limits: Limits | None = None, **options: Any) -> Limits:
    """`limits` with `serve(...)`'s keyword options applied (None: keep), then the
    CHROMA_AGENT_REALTIME_* variables of `ENV` for the time bounds not given; 0 or less
    in a variable means no limit."""
    limits = limits or Limits()
    given = {k: v for k, v in options.items() if v is not None}
    for name, variable in ENV.items():
        value = os.environ.get(variable, "").strip()
        if name not in given and value:
            try:
                seconds = float(value)
            except ValueError:
                raise ValueError(f"{variable}={value!r}: not a number of seconds") from None
            given[name] = seconds if seconds > 0 else None
    for name in ("idle_timeout_s", "max_session_s", "max_audio_ahead_s"):
        if name in given and given[name] is not None and given[name] <= 0:
            given[name] = None
    return replace(limits, **given)


def tokenizer_of(engine) -> Any:
    """The model's tokenizer, or None (a test's stand-in engine): then a string's UTF-8 bytes
    stand for its tokens, an upper bound."""
    processor = getattr(getattr(engine, "model", None), "processor", None)
    return getattr(processor, "tokenizer", None)


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


async def tokens_within(tokenizer, text: str, limit: int, param: str, what: str,
                        event_id: str | None = None) -> int:
    """The tokens of `text` (0 for none; with no tokenizer its UTF-8 bytes, an upper bound),
    or a ProtocolError naming the limit and `param` when over `limit`."""
    if not text:
        return 0
    size = len(text.encode("utf-8", "surrogatepass"))
    if size <= limit:  # one token per byte at most: within, whatever the tokenizer says
        return size if tokenizer is None else await _measure(tokenizer, text)
    if tokenizer is None or len(text) > limit * MAX_CHARS_PER_TOKEN:
        raise ProtocolError(f"{what} is too long: {len(text)} characters, over the limit of {limit} tokens",
                            code=TOO_LONG, param=param, event_id=event_id)
    count = await _measure(tokenizer, text)
    if count > limit:
        raise ProtocolError(f"{what} is too long: {count} tokens, over the limit of {limit} tokens",
                            code=TOO_LONG, param=param, event_id=event_id)
    return count


async def _measure(tokenizer, text: str) -> int:
    # measured: ~1.5 ms per 1 KB (the test checkpoint's tokenizer): the longer strings go to a worker thread
    if len(text) <= TOKENIZE_INLINE_CHARS:
        return _count(tokenizer, text)
    return await asyncio.to_thread(_count, tokenizer, text)
