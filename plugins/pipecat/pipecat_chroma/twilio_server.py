"""`chroma-agent serve twilio`: the phone server (`pipecat_chroma.phone`) with provider
twilio, under the names it had before carriers (this module is kept for them).

    from pipecat_chroma.twilio_server import serve
    serve(model=model, voice=voice, port=8765, public_url="https://abc.ngrok.app")   # blocks

Routes: `POST /twiml` (Twilio's voice webhook), `WS /ws` (Twilio Media Streams), `GET
/health`, `GET /metrics` (Prometheus text), `GET /calls` (each call's record: admin key only)
(see `pipecat_chroma.phone.server` and `pipecat_chroma.phone.twilio`).
`serve` is `chroma-agent serve twilio` (entry point `chroma_agent.servers`: `twilio`);
`check_serve_args` runs before the model loads.
"""
from __future__ import annotations

from chroma_agent.serving.runner import DEFAULT_DRAIN_S

from .phone.carrier import public, stream_url
from .phone.media import MAX_AUDIO_AHEAD_S, MAX_MEDIA_BASE64, MAX_MEDIA_BYTES, AudioBudget, SafeMedia, Upsampler2x
from .phone.records import CallRecord, CallWatcher, LiveCall, Turn
from .phone.server import FINISHED_CALLS_KEPT, PHONE_VAD, PhoneServer, create_app, run_app
from .phone.server import check_serve_args as check_phone_args
from .phone.server import serve as serve_phone
from .phone.twilio import (
    TWILIO_EVENTS,
    TWIML_BUSY,
    SafeTwilioSerializer,
    TwilioCarrier,
    TwilioSignatures,
)

__all__ = ["AudioBudget", "CallRecord", "CallWatcher", "FINISHED_CALLS_KEPT", "LiveCall", "MAX_AUDIO_AHEAD_S",
           "MAX_MEDIA_BASE64", "MAX_MEDIA_BYTES", "MAX_MESSAGE_BYTES", "PHONE_VAD", "PhoneServer", "SafeMedia",
           "SafeTwilioSerializer", "TWILIO_EVENTS", "TWIML_BUSY", "TwilioCarrier", "TwilioSignatures", "Turn",
           "Upsampler2x", "check_serve_args", "create_app", "public", "run_app", "serve", "stream_url"]
MAX_MESSAGE_BYTES = TwilioCarrier.max_message_bytes   # one websocket message; past it uvicorn closes with 1009


def check_serve_args(*, public_url: str | None = None, media_timeout_s: float | None = None,
                     transcripts_dir: str | None = None, **_other) -> None:
    """What `serve` refuses (ValueError, naming the fix), checked without a model:
    TWILIO_AUTH_TOKEN without `public_url`, a media timeout (given, or
    CHROMA_AGENT_TWILIO_MEDIA_TIMEOUT_S) that is not above 0, a transcripts folder that
    cannot be made or written. Takes `serve`'s options."""
    check_phone_args(provider="twilio", public_url=public_url, media_timeout_s=media_timeout_s,
                     transcripts_dir=transcripts_dir)


def serve(*, model, voice, host: str = "0.0.0.0", port: int = 8765, public_url: str | None = None,
          max_calls: int | None = None, system_prompt: str | None = None, max_frames: int | None = None,
          greeting: str | None = None, drain_seconds: float = DEFAULT_DRAIN_S,
          media_timeout_s: float | None = None, transcripts_dir: str | None = None) -> None:
    """`chroma-agent serve twilio`: `pipecat_chroma.phone.server.serve` with provider twilio
    (blocks until SIGTERM, drained, or Ctrl-C)."""
    serve_phone(model=model, voice=voice, provider="twilio", host=host, port=port, public_url=public_url,
                max_calls=max_calls, system_prompt=system_prompt, max_frames=max_frames, greeting=greeting,
                drain_seconds=drain_seconds, media_timeout_s=media_timeout_s, transcripts_dir=transcripts_dir)
