"""The OpenAI Realtime (GA) protocol as data: client events parsed and checked, the session
object, server events built, and the audio formats (pcm16 24 kHz, G.711 mu-law and A-law
8 kHz). Pure functions and small classes, no I/O: `realtime_server.py` runs sessions on
them, and the tests fuzz them.

Every parse failure is a `ProtocolError` carrying the real API's error `type`, `code` and
`param`, which the server sends as an `error` event (the session goes on).
"""
from __future__ import annotations

import base64
import binascii
import copy
import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .pcm import int16_samples

DEFAULT_TURN_DETECTION = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                          "silence_duration_ms": 500, "create_response": True, "interrupt_response": True,
                          "idle_timeout_ms": None}
PCM_FORMAT = {"type": "audio/pcm", "rate": 24000}
FORMAT_RATES = {"audio/pcm": 24000, "audio/pcmu": 8000, "audio/pcma": 8000}
MAX_JSON_DEPTH = 32   # a client event is a few levels deep; deeper nesting is refused before it is walked
TRANSCRIPTION_KEYS = ("model", "language", "prompt")
MAX_TRANSCRIPTION_MODEL_CHARS = 128      # echoed in every session object
MAX_TRANSCRIPTION_PROMPT_CHARS = 1024    # only a hint (the recognition prompt is the model's own): kept and echoed
TRANSCRIPTION_MODEL = "chroma"           # echoed when the client names none: the reasoner itself transcribes
_LANGUAGE = re.compile(r"[A-Za-z][A-Za-z _-]{0,31}")   # a code ("en", "pt-BR") or a name: it goes into the prompt


class ProtocolError(ValueError):
    """A client event the server cannot take: sent back as an `error` event."""

    def __init__(self, message: str, *, code: str | None = "invalid_value", param: str | None = None,
                 event_id: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.code, self.param, self.event_id, self.type = message, code, param, event_id, type


def new_id(prefix: str) -> str:
    """An id in the API's style (`event_...`, `resp_...`, `item_...`)."""
    return f"{prefix}_{secrets.token_hex(10)}"


# -- client events -----------------------------------------------------------------------

_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)   # unrolled: one C pass, no per-character branch
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


def _depth(text: str) -> int:
    """The deepest bracket nesting in `text` (strings skipped), without parsing it, in C:
    the strings cut out (a regex), the brackets kept (bytes.translate), the running depth
    a numpy cumsum. 2 MB of brackets: ~60 ms, a quarter of what json.loads takes for it."""
    brackets = _JSON_STRING.sub("", text).encode("utf-8", "surrogatepass").translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1).astype(np.int32)
    return int(np.cumsum(steps).max())


def parse_event(data: str | bytes) -> dict[str, Any]:
    """A client event from one websocket message: a JSON object with a string `type`.
    Binary frames, non-JSON, nesting past MAX_JSON_DEPTH and a missing type are refused."""
    if isinstance(data, (bytes, bytearray)):
        raise ProtocolError("binary frames are not part of the protocol: send each event as JSON text",
                            code="invalid_json")
    # a quick bound first: nesting costs only when there are brackets to nest
    if data.count("[") + data.count("{") > MAX_JSON_DEPTH and _depth(data) > MAX_JSON_DEPTH:
        raise ProtocolError(f"the event is nested more than {MAX_JSON_DEPTH} levels deep", code="invalid_json")
    try:
        event = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"the message is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(event, dict):
        raise ProtocolError("an event must be a JSON object", code="invalid_json")
    event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
    if not isinstance(event.get("type"), str) or not event["type"]:
        raise ProtocolError("the event has no 'type' string", code="missing_required_parameter", param="type",
                            event_id=event_id)
    return event


def field_of(event: dict, name: str, kinds: type | tuple, *, required: bool = False, default: Any = None,
             path: str | None = None) -> Any:
    """`event[name]` checked against `kinds` (bool is never taken for int or float); an
    error's `param` is `path`, the field's full path (default: `name`)."""
    path = path or name
    if name not in event or (event[name] is None and not required):
        if required:
            raise ProtocolError(f"missing required parameter '{path}'", code="missing_required_parameter",
                                param=path, event_id=event.get("event_id"))
        return default
    value = event[name]
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ProtocolError(f"'{path}' must be {names}, got {type(value).__name__}", code="invalid_type",
                            param=path, event_id=event.get("event_id"))
    return value


def decode_base64(text: Any, param: str = "audio", event_id: str | None = None) -> bytes:
    """Strict base64 (the alphabet, whole quanta): anything else is a ProtocolError."""
    if not isinstance(text, str):
        raise ProtocolError(f"'{param}' must be a base64 string", code="invalid_type", param=param,
                            event_id=event_id)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ProtocolError(f"'{param}' is not valid base64: {e}", param=param, event_id=event_id) from None


# -- the session -------------------------------------------------------------------------

def _format(value: Any, param: str) -> dict:
    if not isinstance(value, dict) or value.get("type") not in FORMAT_RATES:
        raise ProtocolError(f"{param} must be {{'type': 'audio/pcm', 'rate': 24000}}, {{'type': 'audio/pcmu'}} "
                            "or {'type': 'audio/pcma'}", param=param)
    if value["type"] == "audio/pcm":
        if value.get("rate", 24000) != 24000:
            raise ProtocolError("audio/pcm is 24000 Hz only", param=f"{param}.rate")
        return dict(PCM_FORMAT)
    return {"type": value["type"]}


def _number(td: dict, key: str, low: float, high: float, integer: bool) -> None:
    if key not in td or td[key] is None:
        return
    value = td[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise ProtocolError(f"turn_detection.{key} must be a number", code="invalid_type",
                            param=f"session.audio.input.turn_detection.{key}")
    if not low <= value <= high:
        raise ProtocolError(f"turn_detection.{key} must be between {low} and {high}, got {value}",
                            param=f"session.audio.input.turn_detection.{key}")


def _transcription(value: Any) -> dict | None:
    """`audio.input.transcription`: null (off) or {model, language, prompt}, each optional;
    any model name is taken and echoed, `language` (ISO-639-1 or a name) is the recognition
    prompt's language, `prompt` is bounded and kept (the recognition prompt is fixed)."""
    param = "session.audio.input.transcription"
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ProtocolError("transcription must be null or an object {model, language, prompt}", code="invalid_type",
                            param=param)
    for key in value:
        if key not in TRANSCRIPTION_KEYS:
            raise ProtocolError(f"Unknown parameter: '{param}.{str(key)[:40]}'.", code="unknown_parameter",
                                param=f"{param}.{str(key)[:40]}")
    got = {key: field_of(value, key, str, path=f"{param}.{key}") for key in TRANSCRIPTION_KEYS}
    for key, most in (("model", MAX_TRANSCRIPTION_MODEL_CHARS), ("prompt", MAX_TRANSCRIPTION_PROMPT_CHARS)):
        if got[key] is not None and len(got[key]) > most:
            raise ProtocolError(f"transcription.{key} may be at most {most} characters, got {len(got[key])}",
                                code="string_above_max_length", param=f"{param}.{key}")
    got["language"] = got["language"] or None  # "": none (English)
    if got["language"] is not None and not _LANGUAGE.fullmatch(got["language"]):
        raise ProtocolError("transcription.language must be an ISO-639-1 code (e.g. 'en') or a language name",
                            param=f"{param}.language")
    return {**got, "model": got["model"] or TRANSCRIPTION_MODEL}


def _turn_detection(value: Any) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in ("server_vad", "semantic_vad"):
        raise ProtocolError("turn_detection must be null, or an object with type 'server_vad' or 'semantic_vad'",
                            param="session.audio.input.turn_detection")
    _number(value, "threshold", 0.0, 1.0, integer=False)
    _number(value, "prefix_padding_ms", 0, 10_000, integer=True)
    _number(value, "silence_duration_ms", 0, 10_000, integer=True)
    for key in ("create_response", "interrupt_response"):
        if key in value and value[key] is not None and not isinstance(value[key], bool):
            raise ProtocolError(f"turn_detection.{key} must be a boolean", code="invalid_type",
                                param=f"session.audio.input.turn_detection.{key}")
    # semantic_vad is run as server_vad (its eagerness kept for the echo)
    merged = {**DEFAULT_TURN_DETECTION, **{k: v for k, v in value.items() if v is not None}}
    if value["type"] == "semantic_vad":
        merged.setdefault("eagerness", "auto")
    return merged


@dataclass
class SessionConfig:
    """What a session.update can change, with the server's defaults."""

    id: str = field(default_factory=lambda: new_id("sess"))
    model: str = "chroma"
    instructions: str = ""
    voice: str = "default"
    voice_given: Any = None      # the client's voice as given (a name or a GA {"id": ...} object): echoed
    expires_at: int = 0
    input_format: dict = field(default_factory=lambda: dict(PCM_FORMAT))
    output_format: dict = field(default_factory=lambda: dict(PCM_FORMAT))
    turn_detection: dict | None = field(default_factory=lambda: dict(DEFAULT_TURN_DETECTION))
    transcription: dict | None = None   # {model, language, prompt} when committed user audio is transcribed
    output_modalities: list = field(default_factory=lambda: ["audio"])
    tool_choice: str = "auto"
    max_output_tokens: int | str = "inf"
    tracing: Any = None
    speed: float = 1.0

    def updated(self, session: Any) -> "SessionConfig":
        """A copy with a client's `session` object applied (unknown fields ignored), or a
        ProtocolError and no change at all."""
        if not isinstance(session, dict):
            raise ProtocolError("'session' must be an object", code="invalid_type", param="session")
        new = copy.deepcopy(self)
        if session.get("type", "realtime") != "realtime":
            raise ProtocolError("only 'realtime' sessions are served here", param="session.type")
        if "model" in session:
            new.model = field_of(session, "model", str, default=new.model, path="session.model")
        if "instructions" in session:
            new.instructions = field_of(session, "instructions", str, default="", path="session.instructions")
        if "output_modalities" in session and session["output_modalities"] is not None:
            modalities = session["output_modalities"]
            if not isinstance(modalities, list) or not modalities or not set(modalities) <= {"text", "audio"} \
                    or not all(isinstance(m, str) for m in modalities):
                raise ProtocolError("output_modalities must be ['audio'] or ['text']",
                                    param="session.output_modalities")
            new.output_modalities = list(dict.fromkeys(modalities))
        if "tool_choice" in session and session["tool_choice"] is not None:
            if session["tool_choice"] not in ("auto", "none", "required"):
                if not isinstance(session["tool_choice"], dict):
                    raise ProtocolError("tool_choice must be auto, none, required or a function",
                                        param="session.tool_choice")
            new.tool_choice = session["tool_choice"] if isinstance(session["tool_choice"], str) else "auto"
        if "max_output_tokens" in session and session["max_output_tokens"] is not None:
            value = session["max_output_tokens"]
            if value != "inf" and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096):
                raise ProtocolError("max_output_tokens must be 1..4096 or 'inf'", param="session.max_output_tokens")
            new.max_output_tokens = value
        if "tracing" in session:
            new.tracing = session["tracing"] if session["tracing"] in (None, "auto") else "auto"
        audio = session.get("audio")
        if audio is not None:
            if not isinstance(audio, dict):
                raise ProtocolError("'audio' must be an object", code="invalid_type", param="session.audio")
            inp, out = audio.get("input") or {}, audio.get("output") or {}
            if not isinstance(inp, dict) or not isinstance(out, dict):
                raise ProtocolError("audio.input and audio.output must be objects", code="invalid_type",
                                    param="session.audio")
            if inp.get("format") is not None:
                new.input_format = _format(inp["format"], "session.audio.input.format")
            if "turn_detection" in inp:  # present and null means: the client takes the turns
                new.turn_detection = _turn_detection(inp["turn_detection"])
            if "transcription" in inp:  # present and null: off
                new.transcription = _transcription(inp["transcription"])
            if out.get("format") is not None:
                new.output_format = _format(out["format"], "session.audio.output.format")
            if out.get("voice") is not None:
                new.voice, new.voice_given = voice_name(out["voice"]), copy.deepcopy(out["voice"])
            if out.get("speed") is not None:
                speed = out["speed"]
                if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not 0.25 <= speed <= 1.5:
                    raise ProtocolError("audio.output.speed must be 0.25..1.5", param="session.audio.output.speed")
                new.speed = float(speed)
        return new

    @property
    def voice_echo(self) -> Any:
        """The voice as the client gave it (the GA API echoes a custom voice object as is)."""
        return self.voice if self.voice_given is None else copy.deepcopy(self.voice_given)

    def as_dict(self) -> dict:
        """The whole session object, as session.created / session.updated carry it."""
        return {
            "type": "realtime", "object": "realtime.session", "id": self.id, "model": self.model,
            "output_modalities": list(self.output_modalities), "instructions": self.instructions,
            "tools": [], "tool_choice": self.tool_choice, "max_output_tokens": self.max_output_tokens,
            "tracing": self.tracing, "prompt": None, "expires_at": self.expires_at, "include": None,
            "audio": {
                "input": {"format": dict(self.input_format), "noise_reduction": None,
                          "transcription": copy.deepcopy(self.transcription),
                          "turn_detection": copy.deepcopy(self.turn_detection)},
                "output": {"format": dict(self.output_format), "voice": self.voice_echo, "speed": self.speed},
            },
        }


def voice_name(value: Any) -> str:
    """The name in a session's `audio.output.voice`: a name, or a GA custom voice object
    `{"id": "..."}` (its id is looked up like a name)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("id"), str):
        return value["id"]
    raise ProtocolError("audio.output.voice must be a voice name or an object {'id': '...'}", code="invalid_type",
                        param="session.audio.output.voice")


# -- conversation items ------------------------------------------------------------------

@dataclass
class UserInput:
    """What a client-created item asks the model to hear: text and/or pcm16 audio bytes in
    the session's input format (None when it adds nothing to answer)."""

    text: str = ""
    audio: bytes = b""


def parse_item(item: Any, input_format: dict) -> tuple[dict, UserInput | None]:
    """A client's `conversation.item.create` item, normalised to the GA item shape, and the
    user input it carries. Messages (user, system, assistant) and function call outputs."""
    if not isinstance(item, dict):
        raise ProtocolError("'item' must be an object", code="invalid_type", param="item")
    kind = item.get("type", "message")
    item_id = item.get("id")
    if item_id is not None and (not isinstance(item_id, str) or not 0 < len(item_id) <= 64):
        raise ProtocolError("item.id must be a string of 1-64 characters", param="item.id")
    item_id = item_id or new_id("item")
    if kind in ("function_call", "function_call_output"):
        return {**{k: v for k, v in item.items() if isinstance(k, str)}, "id": item_id, "type": kind,
                "object": "realtime.item", "status": "completed"}, None
    if kind != "message":
        raise ProtocolError(f"item.type {kind!r} is not supported", param="item.type")
    role = item.get("role")
    if role not in ("user", "assistant", "system"):
        raise ProtocolError("item.role must be user, assistant or system", param="item.role")
    content = item.get("content")
    if not isinstance(content, list):
        raise ProtocolError("item.content must be a list", code="invalid_type", param="item.content")
    parts, got = [], UserInput()
    for i, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise ProtocolError(f"item.content[{i}] must be an object with a type", param=f"item.content[{i}]")
        kind = part["type"]
        if kind in ("input_text", "text", "output_text"):
            text = field_of(part, "text", str, default="", path=f"item.content[{i}].text")
            parts.append({"type": kind, "text": text})
            got.text = "\n".join(t for t in (got.text, text) if t)
        elif kind == "input_audio":
            audio = decode_base64(part.get("audio", ""), f"item.content[{i}].audio")
            if len(audio) % 2 and input_format["type"] == "audio/pcm":
                raise ProtocolError("pcm16 audio has an even number of bytes", param=f"item.content[{i}].audio")
            parts.append({"type": "input_audio", "transcript": None})
            got.audio += audio
        elif kind in ("input_image", "output_audio", "audio"):
            parts.append({"type": kind, **({"transcript": part.get("transcript")} if "audio" in kind else {})})
        else:
            raise ProtocolError(f"content type {kind!r} is not supported", param=f"item.content[{i}].type")
    normal = {"id": item_id, "type": "message", "object": "realtime.item", "status": "completed", "role": role,
              "content": parts}
    return normal, (got if role != "assistant" and (got.text or got.audio) else None)


def assistant_item(item_id: str, status: str, transcript: str | None = None) -> dict:
    """The assistant message of a reply: `in_progress` with no content while it speaks."""
    content = [] if transcript is None else [{"type": "output_audio", "transcript": transcript}]
    return {"id": item_id, "type": "message", "object": "realtime.item", "status": status, "role": "assistant",
            "content": content}


def user_audio_item(item_id: str, transcript: str | None = None) -> dict:
    """The user message a committed input buffer becomes; `transcript` once it is transcribed."""
    return {"id": item_id, "type": "message", "object": "realtime.item", "status": "completed", "role": "user",
            "content": [{"type": "input_audio", "transcript": transcript}]}


# -- server events -----------------------------------------------------------------------

def event(kind: str, **payload: Any) -> dict:
    """A server event: `type`, a fresh `event_id`, the payload."""
    return {"type": kind, "event_id": new_id("event"), **payload}


def error_event(err: ProtocolError) -> dict:
    return event("error", error={"type": err.type, "code": err.code, "message": err.message, "param": err.param,
                                 "event_id": err.event_id})


def response_object(response_id: str, status: str, *, output: list | None = None, metadata: Any = None,
                    status_details: dict | None = None, usage: dict | None = None,
                    config: SessionConfig | None = None, conversation_id: str | None = "conv_default") -> dict:
    """The `response` of response.created (status in_progress) and response.done;
    `conversation_id` None for an out-of-band reply (`conversation: "none"`)."""
    config = config or SessionConfig()
    return {"id": response_id, "object": "realtime.response", "status": status, "status_details": status_details,
            "output": output or [], "conversation_id": conversation_id, "output_modalities": config.output_modalities,
            "max_output_tokens": config.max_output_tokens,
            "audio": {"output": {"format": dict(config.output_format), "voice": config.voice_echo}},
            "usage": usage, "metadata": metadata}


def usage(input_tokens: int, text_tokens: int, audio_tokens: int, input_audio_tokens: int = 0) -> dict:
    """A reply's usage: `input_tokens` in all, of which `input_audio_tokens` are the user's
    audio (the rest text: the prompt's template, instructions and typed turns)."""
    output = text_tokens + audio_tokens
    heard = min(input_audio_tokens, input_tokens)
    return {"total_tokens": input_tokens + output, "input_tokens": input_tokens, "output_tokens": output,
            "input_token_details": {"text_tokens": input_tokens - heard, "audio_tokens": heard, "cached_tokens": 0},
            "output_token_details": {"text_tokens": text_tokens, "audio_tokens": audio_tokens}}


# -- audio formats -----------------------------------------------------------------------
# G.711 (ITU-T), the segment arithmetic on numpy arrays: decoded once into 256-entry tables,
# encoded with the standard bias/segment search, vectorised.

def _ulaw_decode_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, 0x84 - t, t - 0x84).astype(np.int16)


def _alaw_decode_table() -> np.ndarray:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    seg = (a & 0x70) >> 4
    t = (a & 0x0F) << 4
    t = np.where(seg == 0, t + 8, np.where(seg == 1, t + 0x108, (t + 0x108) << np.maximum(seg - 1, 0)))
    return np.where(a & 0x80, t, -t).astype(np.int16)


ULAW_TO_PCM = _ulaw_decode_table()
ALAW_TO_PCM = _alaw_decode_table()
_ULAW_SEG_END = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
_ALAW_SEG_END = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])


def pcm_to_ulaw(pcm: np.ndarray) -> bytes:
    """int16 samples -> G.711 mu-law bytes."""
    x = pcm.astype(np.int32) >> 2  # 14-bit
    mask = np.where(x < 0, 0x7F, 0xFF)
    x = np.minimum(np.abs(x), 8159) + 0x21
    seg = np.searchsorted(_ULAW_SEG_END, x, side="left")
    code = np.where(seg >= 8, 0x7F, (seg << 4) | ((x >> (seg + 1)) & 0x0F))
    return (code ^ mask).astype(np.uint8).tobytes()


def pcm_to_alaw(pcm: np.ndarray) -> bytes:
    """int16 samples -> G.711 A-law bytes."""
    x = pcm.astype(np.int32) >> 3  # 13-bit
    mask = np.where(x >= 0, 0xD5, 0x55)
    x = np.where(x >= 0, x, -x - 1)
    seg = np.searchsorted(_ALAW_SEG_END, x, side="left")
    code = np.where(seg >= 8, 0x7F, (seg << 4) | ((x >> np.where(seg < 2, 1, seg)) & 0x0F))
    return (code ^ mask).astype(np.uint8).tobytes()


def decode_audio(data: bytes, fmt: dict) -> np.ndarray:
    """Client audio bytes in `fmt` -> float32 samples at the format's rate."""
    if fmt["type"] == "audio/pcmu":
        pcm = ULAW_TO_PCM[np.frombuffer(data, np.uint8)]
    elif fmt["type"] == "audio/pcma":
        pcm = ALAW_TO_PCM[np.frombuffer(data, np.uint8)]
    else:
        pcm = np.frombuffer(data[: len(data) // 2 * 2], "<i2")
    return pcm.astype(np.float32) / 32768.0


def encode_audio(samples: np.ndarray, fmt: dict) -> bytes:
    """float32 samples at the format's rate -> bytes in `fmt`."""
    pcm = int16_samples(samples)
    if fmt["type"] == "audio/pcmu":
        return pcm_to_ulaw(pcm)
    if fmt["type"] == "audio/pcma":
        return pcm_to_alaw(pcm)
    return pcm.astype("<i2").tobytes()
