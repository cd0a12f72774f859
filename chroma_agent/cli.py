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

from .cli_args import add_model_args, add_system_prompt, add_voice_args, at_least, positive
from .cli_serve import add_serve_parser

USAGE_ERROR, FAILURE, INTERRUPTED = 2, 1, 130
# `serve KIND`: each package names its servers' modules in this entry-point group; a module
# has `serve(model=, voice=, **options)` and may have `check_serve_args(**options)`, run before
# the model loads
SERVER_GROUP = "chroma_agent.servers"
# the kinds this command line has options for: the module, where no entry point names it yet
# (a checkout installed before the group existed), and what installs it
SERVERS = {"phone": ("pipecat_chroma.phone.server", "the Pipecat plugin: pip install -e plugins/pipecat"),
           "twilio": ("pipecat_chroma.twilio_server", "the Pipecat plugin: pip install -e plugins/pipecat"),
           "web": ("pipecat_chroma.web_server", "the Pipecat plugin: pip install -e plugins/pipecat"),
           "realtime": ("chroma_agent.serving.realtime_server", "FastAPI and uvicorn: pip install 'chroma-agent[server]'")}

API_KEY_ENV = {"phone": "CHROMA_AGENT_PHONE_API_KEY"}   # --api-key's default per server; else CHROMA_AGENT_API_KEY

_log = logging.getLogger("chroma_agent.cli")  # its lines: plain text on stderr, or JSON (--log-format)


class UsageError(Exception):
    """Bad input found by the CLI's own checks: its message, exit code 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chroma-agent", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("respond", help="answer a spoken (or typed) question in a cloned voice")
    add_model_args(r)
    add_voice_args(r)
    r.add_argument("--input", help="the user's speech (WAV/FLAC/OGG, any rate, up to 30 s)")
    r.add_argument("--text", help="the user's words as text (instead of or with --input)")
    r.add_argument("--output", required=True, help="where to write the reply (WAV, 24 kHz)")
    add_system_prompt(r)
    r.add_argument("--max-frames", type=at_least(1), default=375,
                   help="reply length cap in 80 ms frames (default 375 = 30 s)")
    r.add_argument("--greedy", action="store_true", help="argmax audio codes (deterministic)")
    r.add_argument("--temperature", type=positive, default=0.9, help="audio code sampling temperature (default 0.9)")
    r.add_argument("--top-k", type=at_least(1), default=50, help="audio code sampling top-k (default 50)")
    r.add_argument("--seed", type=int, default=None, help="sampling seed, for repeatable replies")
    r.set_defaults(run=_respond)

    v = sub.add_parser("voice", help="clone a voice from a reference clip and save it")
    add_model_args(v)
    v.add_argument("--audio", required=True, help="reference clip (0.5-30 s of clean speech, any rate)")
    v.add_argument("--text", required=True, help="transcript of the reference clip")
    v.add_argument("--output", required=True, help="voice file to write (e.g. alice.voice.safetensors)")
    v.set_defaults(run=_clone)

    add_serve_parser(sub, _serve)
    _add_call_command(sub)
    return parser


def _add_call_command(sub) -> None:
    """`chroma-agent call NUMBER ...` (call_command.py): an outbound call through a running `serve phone`."""
    try:
        from .call_command import add_call_parser
    except ImportError as e:   # an install without it: the command says so
        c = sub.add_parser("call", help="place an outbound call through a running `serve phone` (not available)")
        c.add_argument("rest", nargs=argparse.REMAINDER)
        c.set_defaults(run=_unavailable, why=f"chroma-agent call is not available ({e})")
        return
    add_call_parser(sub)


def _unavailable(args) -> None:
    raise UsageError(args.why)


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
    _log.info(f"loaded {args.model} on {model.device} ({str(model.dtype).replace('torch.', '')}) "
              f"in {time.perf_counter() - t0:.1f} s")
    return model


def _share_cpu(args) -> None:
    from .serving.runner import share_cpu_with_calls

    threads = share_cpu_with_calls(args.torch_threads)
    _log.info(f"model threads: {threads} ({os.cpu_count()} cores)")


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
             "voice_text", "torch_threads", "log_format")


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
        options["api_key"] = _api_key(options["api_key"], API_KEY_ENV.get(args.server, "CHROMA_AGENT_API_KEY"))
    if (check := getattr(module, "check_serve_args", None)) is not None:   # e.g. a missing --public-url
        try:
            check(**options)
        except ImportError as e:   # a library the server needs at run time
            raise UsageError(f"chroma-agent serve {args.server} needs {SERVERS.get(args.server, ('', 'its plugin'))[1]} "
                             f"({e})") from None
    _share_cpu(args)
    from .serving.tracing import configure_tracing

    configure_tracing(f"chroma-agent-{args.server}")   # OTLP traces when OTEL_EXPORTER_OTLP_ENDPOINT is set
    model = _load_model(args)
    module.serve(model=model, voice=_make_voice(model, source), **options)


def _api_key(given: str | None, env: str = "CHROMA_AGENT_API_KEY") -> str | None:
    """The server's API key: `--api-key` (with a warning: any local user can read a process's
    command line, /proc/PID/cmdline) or the environment variable `env`."""
    if given is None:
        return os.environ.get(env) or None
    _log.warning("warning: --api-key on the command line is readable by other local users (ps, /proc/PID/cmdline); "
                 f"set {env} in the environment instead")
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
    json_logs = getattr(args, "log_format", "text") == "json"
    handler = logging.NullHandler() if json_logs else _Stderr(logging.INFO)   # JSON: the one handler is log_format's
    # serve commands: JSON lines, or text with Pipecat's loguru DEBUG lines left out
    undo_logging = _configure_logging(args.log_format) if hasattr(args, "log_format") else (lambda: None)
    log.addHandler(handler)
    level = log.level
    log.setLevel(logging.INFO)
    try:
        code = args.run(args)   # a command may return its exit code (e.g. `call`: 1 for a failed call)
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
        undo_logging()
    return code if isinstance(code, int) else 0


def _configure_logging(fmt: str):
    """`--log-format`: "json" makes every log line one JSON object, "text" keeps them for people
    (serving/log_format.py); its undo."""
    from .serving.log_format import configure_logging

    return configure_logging(fmt)


if __name__ == "__main__":
    sys.exit(main())
