"""Single-use, short-lived media stream tokens, each bound to one Twilio call.

Twilio signs only the URL it calls, so a media stream's `X-Twilio-Signature` is the same
for every stream of the server: anyone who saw one can replay it. The webhook's TwiML
therefore names a token for its call (a `<Parameter>` of the `<Stream>`, which Twilio hands
back in the `start` message's `customParameters`), and the stream is taken only with a
valid token for the same CallSid that nobody used before.

    tokens = StreamTokens()
    twiml = connect_twiml(stream_url, tokens.issue(call_sid))   # the webhook's answer
    problem = tokens.redeem(token, start_call_sid)              # None: take the stream; else why not

A token is `EXPIRY.NONCE.MAC`: the MAC is an HMAC-SHA256 over the call sid, the expiry
and the nonce with a per-process random secret (a restarted server refuses the streams of
webhooks the previous one answered, which Twilio connects within a second anyway).
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from typing import Callable
from xml.sax.saxutils import quoteattr

TOKEN_PARAMETER = "chroma_stream_token"   # the <Parameter name> in the TwiML
DEFAULT_TOKEN_TTL_S = 45.0                # Twilio opens the stream within a second of the webhook
MAX_TOKEN_CHARS = 200                     # ours are ~100: anything longer is not ours (checked before the MAC)


class StreamTokens:
    """Issues and redeems stream tokens: `issue(call_sid)` in the webhook, `redeem(token,
    call_sid)` once the stream's `start` arrives. `ttl_s`: how long a token is good for;
    `clock`: wall-clock seconds (tests)."""

    def __init__(self, ttl_s: float = DEFAULT_TOKEN_TTL_S, clock: Callable[[], float] = time.time):
        self.ttl_s = ttl_s
        self._clock = clock
        self._secret = secrets.token_bytes(32)
        self._used: dict[str, float] = {}   # redeemed token -> its expiry (forgotten once expired)

    def issue(self, call_sid: str) -> str:
        expires = int(self._clock() + self.ttl_s) + 1   # whole seconds, never short of ttl_s
        nonce = secrets.token_hex(8)                    # two webhooks for one call get two tokens
        return f"{expires}.{nonce}.{self._mac(call_sid, expires, nonce)}"

    def redeem(self, token: object, call_sid: object) -> str | None:
        """None when `token` is valid for `call_sid`, unexpired and unused (it is used from
        now on); else why it is refused, as a fixed phrase (never the client's text)."""
        if not isinstance(token, str) or not token:
            return "no stream token in the start message"
        if not isinstance(call_sid, str) or len(token) > MAX_TOKEN_CHARS:
            return "a malformed stream token"
        parts = token.split(".")
        if len(parts) != 3 or not parts[0].isdigit():
            return "a malformed stream token"
        expires, nonce, mac = int(parts[0]), parts[1], parts[2]
        if not hmac.compare_digest(mac, self._mac(call_sid, expires, nonce)):
            return "a stream token not issued for this call"
        now = self._clock()
        if expires < now:
            return "an expired stream token"
        self._forget_expired(now)
        if token in self._used:
            return "a stream token used before (a replayed stream)"
        self._used[token] = expires
        return None

    def _mac(self, call_sid: str, expires: int, nonce: str) -> str:
        message = f"{len(call_sid)}:{call_sid}|{expires}|{nonce}".encode("utf-8", "surrogatepass")
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def _forget_expired(self, now: float) -> None:
        # an expired token is refused by its expiry alone: the used set holds only live ones
        for token in [t for t, expires in self._used.items() if expires < now]:
            del self._used[token]


def connect_twiml(stream_url: str, token: str | None = None) -> str:
    """The webhook's answer: `<Connect><Stream url>`, with `token` as the stream's
    TOKEN_PARAMETER `<Parameter>` when given."""
    stream = f"<Stream url={quoteattr(stream_url)}"
    if token is None:
        stream += "/>"
    else:   # Twilio hands it back in the `start` message's customParameters
        stream += f"><Parameter name={quoteattr(TOKEN_PARAMETER)} value={quoteattr(token)}/></Stream>"
    return f'<?xml version="1.0" encoding="UTF-8"?><Response><Connect>{stream}</Connect></Response>'
