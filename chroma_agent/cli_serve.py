"""`chroma-agent serve KIND`'s arguments: one parser per server (twilio, phone, web,
realtime), each with the model's, the voice's and the server's options, and `--log-format`."""
from __future__ import annotations

import argparse

from .cli_args import add_model_args, add_system_prompt, add_voice_args, at_least, port, positive

# `serve phone`: each carrier's webhook and stream (here: --help loads no framework; tests check them)
PHONE_ROUTES = {"twilio": ("POST /twiml", "/ws"), "telnyx": ("POST /telnyx/texml", "/ws"), "plivo": (
    "POST or GET /plivo/answer", "/ws"), "exotel": ("none (set the Voicebot applet's URL in Exotel's dashboard)", "/ws"),
    "vonage": ("GET or POST /vonage/answer", "/ws")}
LOG_FORMATS = ("text", "json")


def add_serve_parser(sub, run) -> None:
    """`serve KIND` on the command line's subparsers `sub`; each kind runs `run(args)`."""
    s = sub.add_parser("serve", help="run a server that answers calls in a cloned voice")
    kinds = s.add_subparsers(dest="server", required=True, metavar="KIND")
    t = kinds.add_parser("twilio", help="a Twilio phone number (Media Streams over a websocket; Pipecat plugin)")
    _add_phone_args(t, "Twilio", "(required with TWILIO_AUTH_TOKEN: signatures are checked against it, not Host)")
    ph = _add_phone_parser(kinds)
    w = kinds.add_parser("web", help="talk to the voice from a browser page (WebRTC; Pipecat plugin)")
    add_model_args(w)
    add_voice_args(w)
    _add_server_args(w, host="127.0.0.1")
    w.add_argument("--max-calls", type=at_least(1), default=None,
                   help="browser sessions at once; more are refused (default: the server decides)")
    w.add_argument("--allowed-host", action="append", dest="allowed_hosts", default=[], metavar="NAME[:PORT]",
                   help="a Host name the page also answers to (repeatable; NAME: any port), e.g. a reverse proxy's "
                        "name (default: localhost, 127.0.0.1, [::1] on --port only; others get 421)")
    _add_drain_seconds(w, "sessions")
    _add_transcripts(w, "session")
    rt = kinds.add_parser("realtime", help="the OpenAI Realtime API on a websocket (any Realtime client)")
    add_model_args(rt)
    add_voice_args(rt)
    _add_server_args(rt)
    rt.add_argument("--voices", dest="voices_dir", metavar="DIR", help="voice files clients may name in audio.output.voice (by stem)")
    rt.add_argument("--api-key", default=None,
                    help="require 'Authorization: Bearer KEY' (default: $CHROMA_AGENT_API_KEY, which is safer: "
                         "a command line is readable by every local user; none: open)")
    rt.add_argument("--max-calls", type=at_least(1), default=None,
                    help="sessions at once; more are refused with 503 (default: the engine's capacity)")
    rt.add_argument("--max-sessions-per-client", type=at_least(1), default=None,
                    help="sessions at once per client address; more are refused with 429 (default: no cap)")
    rt.add_argument("--idle-timeout", dest="idle_timeout_s", type=at_least(0), default=None, metavar="S",
                    help="end a session after S seconds with no client event while no reply plays "
                         "(default 60, or $CHROMA_AGENT_REALTIME_IDLE_TIMEOUT_S; 0: never)")
    rt.add_argument("--max-session-seconds", dest="max_session_s", type=at_least(0), default=None, metavar="S",
                    help="end a session S seconds after it starts, as the hosted API does at 60 minutes "
                         "(default 3600, or $CHROMA_AGENT_REALTIME_MAX_SESSION_S; 0: never)")
    rt.add_argument("--max-instructions-tokens", type=at_least(1), default=None, metavar="N",
                    help="session instructions (session.update or a system item) at most N tokens (default 4000)")
    _add_drain_seconds(rt, "sessions")
    for kind in (t, ph, w, rt):   # one code path: every option not the model's or the voice's goes to `serve`
        kind.set_defaults(run=run)
        kind.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                          help="log lines as text (default) or one JSON object per line (time, level, logger, "
                               "message, call or session id)")


def _add_phone_args(p: argparse.ArgumentParser, carrier: str, public_url_note: str) -> None:
    """What `serve twilio` and `serve phone` take."""
    add_model_args(p)
    add_voice_args(p)
    _add_server_args(p)
    p.add_argument("--public-url", help=f"the https URL {carrier} reaches this server at {public_url_note}")
    p.add_argument("--media-timeout", dest="media_timeout_s", type=positive, default=None, metavar="S",
                   help=f"end a stream that sends no {carrier} start, or no audio after it, for S seconds "
                        "(default 10, or $CHROMA_AGENT_TWILIO_MEDIA_TIMEOUT_S)")
    p.add_argument("--max-calls", type=at_least(1), default=None, help="calls answered at once; more are rejected as "
                   "busy (default: the engine's capacity, measured at start)")
    p.add_argument("--greeting", help="a line spoken in the voice when a call connects (an outbound call's: "
                                      "once the callee spoke or a short pause passed)")
    _add_drain_seconds(p, "calls")
    _add_transcripts(p, "call")


def _add_phone_parser(kinds) -> argparse.ArgumentParser:
    """`serve phone --provider NAME`: one phone server for every carrier (Pipecat plugin)."""
    routes = "".join(f"\n  {name:<7} answer webhook: {hook}; media stream: WS {ws}"
                     for name, (hook, ws) in PHONE_ROUTES.items())
    p = kinds.add_parser("phone", help="a phone number at Twilio, Telnyx, Plivo, Exotel or Vonage (Pipecat plugin)",
                         formatter_class=argparse.RawDescriptionHelpFormatter, epilog="each carrier's routes on this "
                         f"server (point the carrier at https://PUBLIC-URL...):{routes}\nalso: GET /health, GET /metrics, "
                         "POST /calls (outbound calls, with the API key)")
    p.add_argument("--provider", required=True, choices=list(PHONE_ROUTES), help="the carrier whose calls this serves")
    _add_phone_args(p, "the carrier", "(required where it signs the URL it calls and its secret is set)")
    p.add_argument("--record", dest="record_dir", metavar="DIR",
                   help="record each call to DIR (a stereo WAV, caller left, agent right, and its JSON); "
                        "personal data: tell your callers (default: no recordings)")
    p.add_argument("--transfer-to", metavar="NUMBER", help="where --transfer-digit sends a call (E.164: +1...)")
    p.add_argument("--transfer-digit", metavar="D", help="the key that transfers a call (0-9, *, #; default 0)")
    p.add_argument("--voicemail-message", metavar="TEXT",
                   help="left on a machine an outbound call reaches, after the beep (default: hang up)")
    p.add_argument("--api-key", help="the key of POST /calls, outbound calls ('Authorization: Bearer KEY'; default: "
                                     "$CHROMA_AGENT_PHONE_API_KEY, which is safer; none: POST /calls is off)")
    return p


def _add_server_args(p: argparse.ArgumentParser, host: str = "0.0.0.0") -> None:
    """What every `serve KIND` takes besides the model and the voice."""
    where = "all" if host == "0.0.0.0" else "this machine only"
    p.add_argument("--host", default=host, help=f"address to listen on (default {host}: {where})")
    p.add_argument("--port", type=port, default=8765, help="port to listen on (default 8765)")
    add_system_prompt(p)
    p.add_argument("--max-frames", type=at_least(1), default=None,
                   help="reply length cap in 80 ms frames (default: the server decides)")
    p.add_argument("--torch-threads", type=at_least(1), default=None,
                   help="the model's CPU threads (default: one fewer than the cores, leaving one to the calls' audio)")


def _add_drain_seconds(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--drain-seconds", type=at_least(0), default=30,
                   help=f"on SIGTERM: no new {what}, running ones may go on this long, then end (default 30)")


def _add_transcripts(p: argparse.ArgumentParser, what: str) -> None:
    # not given: not passed to `serve` at all (SUPPRESS), so a server without the option still runs
    p.add_argument("--transcripts", dest="transcripts_dir", metavar="DIR", default=argparse.SUPPRESS,
                   help=f"write each {what}'s transcript (both sides, turn by turn) to DIR/<{what} id>.jsonl when it "
                        "ends; personal data, never logged (default: not written)")
