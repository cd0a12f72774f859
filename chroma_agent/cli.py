"""`chroma-agent` command line: clone a voice, answer a spoken question, serve calls.

Exit codes: 0 done, 2 a usage or input error (as argparse), 1 a failure that is not the
user's, 130 interrupted (Ctrl-C). Every check that needs no model runs before the model
loads (or downloads), and nothing heavy is imported at module level: `--help` and argument
errors return at once, without torch.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_MODEL = "FlashLabs/Chroma-4B"
DTYPES = ("auto", "float32", "bfloat16", "float16")
USAGE_ERROR, FAILURE, INTERRUPTED = 2, 1, 130
# `serve KIND`: each package names its servers' modules in this entry-point group; a module
# has `serve(model=, voice=, **options)` and may have `check_serve_args(**options)`, run before
# the model loads
SERVER_GROUP = "chroma_agent.servers"
# the kinds this command line has options for: the module, where no entry point names it yet
# (a checkout installed before the group existed), and what installs it
SERVERS = {"twilio": ("pipecat_chroma.twilio_server", "the Pipecat plugin: pip install -e plugins/pipecat"),
           "web": ("pipecat_chroma.web_server", "the Pipecat plugin: pip install -e plugins/pipecat"),
           "realtime": ("chroma_agent.serving.realtime_server", "FastAPI and uvicorn: pip install 'chroma-agent[server]'")}


class UsageError(Exception):
    """Bad input found by the CLI's own checks: its message, exit code 2, no traceback."""


# -- arguments --
def _at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def _port(text: str) -> int:
    port = _at_least(1)(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"a port is at most 65535, got {port}")
    return port


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"checkpoint directory or hub id (default: {DEFAULT_MODEL})")
    g.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="weights' precision (default: auto = bfloat16 on CUDA, float32 on the CPU)")


def _add_voice_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("voice (either a saved voice or a reference clip and its transcript)")
    g.add_argument("--voice", help="voice file made by `chroma-agent voice`")
    g.add_argument("--voice-audio", help="reference clip of the voice to clone (0.5-30 s of speech, any rate)")
    g.add_argument("--voice-text", help="transcript of the reference clip")


def _add_system_prompt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system-prompt", default=None,
                   help="system prompt for the reasoner (default: a brief, spoken-style assistant; '' for none)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chroma-agent", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("respond", help="answer a spoken (or typed) question in a cloned voice")
    _add_model_args(r)
    _add_voice_args(r)
    r.add_argument("--input", help="the user's speech (WAV/FLAC/OGG, any rate, up to 30 s)")
    r.add_argument("--text", help="the user's words as text (instead of or with --input)")
    r.add_argument("--output", required=True, help="where to write the reply (WAV, 24 kHz)")
    _add_system_prompt(r)
    r.add_argument("--max-frames", type=_at_least(1), default=375,
                   help="reply length cap in 80 ms frames (default 375 = 30 s)")
    r.add_argument("--greedy", action="store_true", help="argmax audio codes (deterministic)")
    r.add_argument("--temperature", type=_positive, default=0.9, help="audio code sampling temperature (default 0.9)")
    r.add_argument("--top-k", type=_at_least(1), default=50, help="audio code sampling top-k (default 50)")
    r.add_argument("--seed", type=int, default=None, help="sampling seed, for repeatable replies")
    r.set_defaults(run=_respond)

    v = sub.add_parser("voice", help="clone a voice from a reference clip and save it")
    _add_model_args(v)
    v.add_argument("--audio", required=True, help="reference clip (0.5-30 s of clean speech, any rate)")
    v.add_argument("--text", required=True, help="transcript of the reference clip")
    v.add_argument("--output", required=True, help="voice file to write (e.g. alice.voice.safetensors)")
    v.set_defaults(run=_clone)

    s = sub.add_parser("serve", help="run a server that answers calls in a cloned voice")
    kinds = s.add_subparsers(dest="server", required=True, metavar="KIND")
    t = kinds.add_parser("twilio", help="a Twilio phone number (Media Streams over a websocket; Pipecat plugin)")
    _add_model_args(t)
    _add_voice_args(t)
    _add_server_args(t)
    t.add_argument("--public-url", help="the https URL Twilio reaches this server at; required with "
                                        "TWILIO_AUTH_TOKEN (signatures are checked against it, never the request's Host)")
    t.add_argument("--media-timeout", dest="media_timeout_s", type=_positive, default=None, metavar="S",
                   help="end a stream that sends no Twilio start, or no audio after it, for S seconds "
                        "(default 10, or $CHROMA_AGENT_TWILIO_MEDIA_TIMEOUT_S)")
    t.add_argument("--max-calls", type=_at_least(1), default=None,
                   help="calls answered at once; more are rejected as busy (default: the engine's capacity, "
                        "measured at start)")
    t.add_argument("--greeting", help="a line spoken in the voice when a call connects")
    _add_drain_seconds(t, "calls")
    _add_transcripts(t, "call")
    w = kinds.add_parser("web", help="talk to the voice from a browser page (WebRTC; Pipecat plugin)")
    _add_model_args(w)
    _add_voice_args(w)
    _add_server_args(w, host="127.0.0.1")
    w.add_argument("--max-calls", type=_at_least(1), default=None,
                   help="browser sessions at once; more are refused (default: the server decides)")
    w.add_argument("--allowed-host", action="append", dest="allowed_hosts", default=[], metavar="NAME[:PORT]",
                   help="a Host name the page also answers to (repeatable; NAME: any port), e.g. a reverse proxy's "
                        "name (default: localhost, 127.0.0.1, [::1] on --port only; others get 421)")
    _add_drain_seconds(w, "sessions")
    _add_transcripts(w, "session")
    rt = kinds.add_parser("realtime", help="the OpenAI Realtime API on a websocket (any Realtime client)")
    _add_model_args(rt)
    _add_voice_args(rt)
    _add_server_args(rt)
    rt.add_argument("--voices", dest="voices_dir", metavar="DIR", help="voice files clients may name in audio.output.voice (by stem)")
    rt.add_argument("--api-key", default=None,
                    help="require 'Authorization: Bearer KEY' (default: $CHROMA_AGENT_API_KEY, which is safer: "
                         "a command line is readable by every local user; none: open)")
    rt.add_argument("--max-calls", type=_at_least(1), default=None,
                    help="sessions at once; more are refused with 503 (default: the engine's capacity)")
    rt.add_argument("--max-sessions-per-client", type=_at_least(1), default=None,
                    help="sessions at once per client address; more are refused with 429 (default: no cap)")
    rt.add_argument("--idle-timeout", dest="idle_timeout_s", type=_at_least(0), default=None, metavar="S",
                    help="end a session after S seconds with no client event while no reply plays "
                         "(default 60, or $CHROMA_AGENT_REALTIME_IDLE_TIMEOUT_S; 0: never)")
    rt.add_argument("--max-session-seconds", dest="max_session_s", type=_at_least(0), default=None, metavar="S",
                    help="end a session S seconds after it starts, as the hosted API does at 60 minutes "
                         "(default 3600, or $CHROMA_AGENT_REALTIME_MAX_SESSION_S; 0: never)")
    rt.add_argument("--max-instructions-tokens", type=_at_least(1), default=None, metavar="N",
                    help="session instructions (session.update or a system item) at most N tokens (default 4000)")
    _add_drain_seconds(rt, "sessions")
    for kind in (t, w, rt):   # one code path: every option not the model's or the voice's goes to `serve`
        kind.set_defaults(run=_serve)
    return parser


def _add_server_args(p: argparse.ArgumentParser, host: str = "0.0.0.0") -> None:
    """What every `serve KIND` takes besides the model and the voice."""
    where = "all" if host == "0.0.0.0" else "this machine only"
    p.add_argument("--host", default=host, help=f"address to listen on (default {host}: {where})")
    p.add_argument("--port", type=_port, default=8765, help="port to listen on (default 8765)")
    _add_system_prompt(p)
    p.add_argument("--max-frames", type=_at_least(1), default=None,
                   help="reply length cap in 80 ms frames (default: the server decides)")
    p.add_argument("--torch-threads", type=_at_least(1), default=None,
                   help="the model's CPU threads (default: one fewer than the cores, leaving one to the calls' audio)")


def _add_drain_seconds(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--drain-seconds", type=_at_least(0), default=30,
                   help=f"on SIGTERM: no new {what}, running ones may go on this long, then end (default 30)")


def _add_transcripts(p: argparse.ArgumentParser, what: str) -> None:
    # not given: not passed to `serve` at all (SUPPRESS), so a server without the option still runs
    p.add_argument("--transcripts", dest="transcripts_dir", metavar="DIR", default=argparse.SUPPRESS,
                   help=f"write each {what}'s transcript (both sides, turn by turn) to DIR/<{what} id>.jsonl when it "
                        "ends; personal data, never logged (default: not written)")


# -- checks that need no model --
def _audio(flag: str, path: str, reference: bool = False):
    """(samples, rate) of a clip (a voice `reference`, else user speech) that passes every
    check the model would make on it."""
    from .model import audio

    try:
        data, rate = audio.read_audio(path)
        limits = audio.VOICE_LIMITS if reference else audio.USER_LIMITS
        audio.load_audio(data, rate, rate, limits)  # empty, silent, too short or too long
    except audio.AudioError as e:
        raise UsageError(f"{flag} {path}: {e}") from None
    return data, rate


def _text(flag: str, text: str | None, what: str) -> None:
    if text is not None and not text.strip():
        raise UsageError(f"{flag} is empty: give {what}")


def _voice_source(args):
    """The saved voice, or (samples, rate, transcript) to clone once the model is loaded."""
    if args.voice is not None:
        if args.voice_audio is not None or args.voice_text is not None:
            raise UsageError("give either --voice FILE or --voice-audio CLIP with --voice-text TRANSCRIPT, not both")
        from .model.voice import Voice

        try:
            return Voice.load(args.voice)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(f"--voice: {e}") from None
    if args.voice_audio is None and args.voice_text is None:
        raise UsageError("a voice is needed: --voice FILE, or --voice-audio CLIP with --voice-text TRANSCRIPT")
    if args.voice_text is None:
        raise UsageError("--voice-audio needs --voice-text: the words spoken in the clip")
    if args.voice_audio is None:
        raise UsageError("--voice-text needs --voice-audio: the clip that says those words")
    _text("--voice-text", args.voice_text, "the words spoken in the reference clip (--voice-audio)")
    return (*_audio("--voice-audio", args.voice_audio, reference=True), args.voice_text)


def _check_output(path: str) -> None:
    """The output can be written: its folder exists and takes a new file."""
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        raise UsageError(f"--output {path} is a folder; give a file name")
    if not folder.is_dir():
        raise UsageError(f"--output {path}: the folder {folder} does not exist; create it first")
    try:
        with tempfile.TemporaryFile(dir=folder):  # what actually writing needs (os.access is wrong for root)
            pass
        if target.exists() and not os.access(target, os.W_OK):
            raise PermissionError(f"{target} is read-only")
    except OSError as e:
        raise UsageError(f"--output {path}: cannot write there ({e.strerror or e})") from None


def _check_device(args) -> None:
    from .model.device import check_device

    check_device(args.device)  # DeviceError (exit 2) before any download


# -- commands --
def _load_model(args):
    from .api import ChromaModel

    t0 = time.perf_counter()
    model = ChromaModel.from_pretrained(args.model, device=args.device, dtype=args.dtype, revision=args.revision)
    print(f"loaded {args.model} on {model.device} ({str(model.dtype).replace('torch.', '')}) "
          f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return model


def _share_cpu(args) -> None:
    from .serving.runner import share_cpu_with_calls

    threads = share_cpu_with_calls(args.torch_threads)
    print(f"model threads: {threads} ({os.cpu_count()} cores)", file=sys.stderr)


def _make_voice(model, source):
    if isinstance(source, tuple):
        data, rate, transcript = source
        return model.voice_from_audio(data, transcript, sample_rate=rate)
    return source


def _prompt(args) -> dict:
    return {} if args.system_prompt is None else {"system_prompt": args.system_prompt or None}


def _respond(args) -> None:
    _text("--text", args.text, "the user's words, or leave --text out")
    if args.input is None and args.text is None:
        raise UsageError("give the user's turn with --input AUDIO and/or --text TEXT")
    clip = None if args.input is None else _audio("--input", args.input)
    source = _voice_source(args)
    _check_output(args.output)
    _check_device(args)

    model = _load_model(args)
    conv = model.conversation(_make_voice(model, source), **_prompt(args))
    data, rate = clip if clip is not None else (None, None)
    response = conv.respond(audio=data, sample_rate=rate, text=args.text, max_frames=args.max_frames,
                            greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    done = _write_reply(response, args.output, model.sample_rate)
    stats = done.stats
    first = "no audio" if stats.time_to_first_audio_s is None else f"{stats.time_to_first_audio_s * 1000:.0f} ms"
    print(f"wrote {args.output}: {stats.audio_s:.2f} s of audio, {stats.frames} frames, stop: {done.stop_reason}; "
          f"first audio after {first}, real-time factor {stats.real_time_factor:.2f}", file=sys.stderr)


def _write_reply(response, output: str, sample_rate: int):
    """Stream the reply: its text to stdout, each 80 ms frame to the WAV as it exists. On
    Ctrl-C the WAV is closed (valid) with what was written; with no audio yet it is removed."""
    import soundfile as sf

    from .events import AudioChunk, ResponseDone, TextDelta

    done, frames = None, 0
    try:
        with sf.SoundFile(output, "w", samplerate=sample_rate, channels=1, subtype="PCM_16") as out:
            for event in response:
                if isinstance(event, AudioChunk):
                    out.write(event.pcm)
                    frames += 1
                elif isinstance(event, TextDelta):
                    print(event.text, end="", flush=True)
                elif isinstance(event, ResponseDone):
                    done = event
    except BaseException as e:
        print(flush=True)  # end the reply's text line
        if not frames:
            Path(output).unlink(missing_ok=True)
        elif isinstance(e, KeyboardInterrupt):
            raise KeyboardInterrupt(f"{output} keeps the {frames * 0.08:.2f} s of the reply written so far") from None
        raise
    print()
    return done


def _clone(args) -> None:
    _text("--text", args.text, "the words spoken in the reference clip (--audio)")
    data, rate = _audio("--audio", args.audio, reference=True)
    _check_output(args.output)
    _check_device(args)

    model = _load_model(args)
    voice = model.voice_from_audio(data, args.text, sample_rate=rate)
    voice.save(args.output)
    print(f"wrote {args.output}: {voice.num_frames} frames ({voice.num_frames * 0.08:.2f} s), "
          f"{len(voice.transcript_ids)} transcript tokens", file=sys.stderr)


# the arguments the command line uses itself; every other one of `serve KIND` is the server's
_OWN_ARGS = ("command", "server", "run", "model", "revision", "device", "dtype", "voice", "voice_audio",
             "voice_text", "torch_threads")


def server_module(kind: str):
    """The module that serves `kind`: its entry point in SERVER_GROUP, else the known module
    of SERVERS (an install from before the group). UsageError, naming what to install, when
    it cannot be imported: found before the model loads (or downloads)."""
    from importlib.metadata import entry_points

    found = [ep for ep in entry_points(group=SERVER_GROUP) if ep.name == kind]
    module, install = SERVERS.get(kind, (None, f"a package that declares {kind!r} in {SERVER_GROUP}"))
    try:
        if found:
            return found[0].load()
        if module is None:
            raise ImportError(f"no entry point {kind!r} in {SERVER_GROUP}")
        return importlib.import_module(module)
    except ImportError as e:
        raise UsageError(f"chroma-agent serve {kind} needs {install} ({e})") from None


def _serve(args) -> None:
    """`serve KIND`: every check without a model first (the voice, the device, the server's
    module and its `check_serve_args`), then the model loads and the module's `serve` runs."""
    source = _voice_source(args)
    _check_device(args)
    module = server_module(args.server)
    options = {name: value for name, value in vars(args).items() if name not in _OWN_ARGS}
    if "api_key" in options:
        options["api_key"] = _api_key(options["api_key"])
    if (check := getattr(module, "check_serve_args", None)) is not None:   # e.g. a missing --public-url
        try:
            check(**options)
        except ImportError as e:   # a library the server needs at run time
            raise UsageError(f"chroma-agent serve {args.server} needs {SERVERS.get(args.server, ('', 'its plugin'))[1]} "
                             f"({e})") from None
    _share_cpu(args)
    model = _load_model(args)
    module.serve(model=model, voice=_make_voice(model, source), **options)


def _api_key(given: str | None) -> str | None:
    """The server's API key: `--api-key` (with a warning: any local user can read a process's
    command line, /proc/PID/cmdline) or $CHROMA_AGENT_API_KEY."""
    if given is None:
        return os.environ.get("CHROMA_AGENT_API_KEY") or None
    print("warning: --api-key on the command line is readable by other local users (ps, /proc/PID/cmdline); "
          "set CHROMA_AGENT_API_KEY in the environment instead", file=sys.stderr)
    return given or None


# -- entry point --
class _Stderr(logging.Handler):
    """Log lines to whatever sys.stderr is at the time (tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input (exit 2); imported only once something failed."""
    from .model.audio import AudioError
    from .model.checkpoint import CheckpointError
    from .model.config import ConfigError
    from .model.device import DeviceError

    return AudioError, CheckpointError, ConfigError, DeviceError, FileNotFoundError, ValueError


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = build_parser().parse_args(argv)
    log = logging.getLogger("chroma_agent")  # what loading spends its time on, for the user to see
    handler = _Stderr(logging.INFO)
    log.addHandler(handler)
    level = log.level
    log.setLevel(logging.INFO)
    try:
        args.run(args)
    except KeyboardInterrupt as e:
        print(f"interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return INTERRUPTED
    except Exception as e:
        if isinstance(e, UsageError) or isinstance(e, _user_errors()):
            print(f"error: {e}", file=sys.stderr)
            return USAGE_ERROR
        if os.environ.get("CHROMA_AGENT_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {e}\n(not a problem with your input; rerun with CHROMA_AGENT_DEBUG=1 "
              "to see the traceback)", file=sys.stderr)
        return FAILURE
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
