"""`chroma-agent` command line: clone a voice, answer a spoken question."""
from __future__ import annotations

import argparse
import sys
import time

from .audio import AudioError
from .checkpoint import CheckpointError
from .config import ConfigError
from .processor import DEFAULT_SYSTEM_PROMPT

DEFAULT_MODEL = "FlashLabs/Chroma-4B"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"checkpoint directory or hub id (default: {DEFAULT_MODEL})")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default: auto)")


def _add_voice_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("voice (either a saved voice or a reference clip and its transcript)")
    g.add_argument("--voice", help="voice file made by `chroma-agent voice`")
    g.add_argument("--voice-audio", help="reference clip of the voice to clone (a few seconds, any rate)")
    g.add_argument("--voice-text", help="transcript of the reference clip")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chroma-agent", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    r = sub.add_parser("respond", help="answer a spoken (or typed) question in a cloned voice")
    _add_model_args(r)
    _add_voice_args(r)
    r.add_argument("--input", help="the user's speech (WAV/FLAC/OGG, any rate)")
    r.add_argument("--text", help="the user's words as text (instead of or with --input)")
    r.add_argument("--output", required=True, help="where to write the reply (WAV, 24 kHz)")
    r.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT, help="system prompt for the reasoner")
    r.add_argument("--max-frames", type=int, default=375, help="reply length cap in 80 ms frames (default 375 = 30 s)")
    r.add_argument("--greedy", action="store_true", help="argmax audio codes (deterministic)")
    r.add_argument("--temperature", type=float, default=0.9, help="audio code sampling temperature (default 0.9)")
    r.add_argument("--top-k", type=int, default=50, help="audio code sampling top-k (default 50)")
    r.add_argument("--seed", type=int, default=None, help="sampling seed, for repeatable replies")

    v = sub.add_parser("voice", help="clone a voice from a reference clip and save it")
    _add_model_args(v)
    v.add_argument("--audio", required=True, help="reference clip (a few seconds of clean speech, any rate)")
    v.add_argument("--text", required=True, help="transcript of the reference clip")
    v.add_argument("--output", required=True, help="voice file to write (e.g. alice.voice.safetensors)")
    return parser


def _load_model(args):
    from .api import ChromaModel

    t0 = time.perf_counter()
    model = ChromaModel.from_pretrained(args.model, device=args.device, dtype=args.dtype, revision=args.revision)
    print(f"loaded {args.model} on {model.device} ({str(model.dtype).replace('torch.', '')}) "
          f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return model


def _voice(args, model):
    from .voice import Voice

    if args.voice:
        if args.voice_audio or args.voice_text:
            raise SystemExit("error: give either --voice or --voice-audio with --voice-text, not both")
        return Voice.load(args.voice)
    if not (args.voice_audio and args.voice_text):
        raise SystemExit("error: a voice is needed: --voice FILE, or --voice-audio CLIP with --voice-text TRANSCRIPT")
    return model.voice_from_audio(args.voice_audio, args.voice_text)


def _respond(args) -> None:
    import soundfile as sf

    from .conversation import AudioChunk, ResponseDone, TextDelta

    if not args.input and not args.text:
        raise SystemExit("error: give the user's turn with --input AUDIO and/or --text TEXT")
    model = _load_model(args)
    voice = _voice(args, model)
    conv = model.conversation(voice, system_prompt=args.system_prompt or None)
    # the streaming runtime: text and audio are written as each 80 ms frame exists
    response = conv.respond(audio=args.input, text=args.text, max_frames=args.max_frames, greedy=args.greedy,
                            temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    done = None
    with sf.SoundFile(args.output, "w", samplerate=model.sample_rate, channels=1, subtype="PCM_16") as out:
        for event in response:
            if isinstance(event, AudioChunk):
                out.write(event.pcm)
            elif isinstance(event, TextDelta):
                print(event.text, end="", flush=True)
            elif isinstance(event, ResponseDone):
                done = event
    print()
    stats = done.stats
    first = "no audio" if stats.time_to_first_audio_s is None else f"{stats.time_to_first_audio_s * 1000:.0f} ms"
    print(f"wrote {args.output}: {stats.audio_s:.2f} s of audio, {stats.frames} frames, stop: {done.stop_reason}; "
          f"first audio after {first}, real-time factor {stats.real_time_factor:.2f}", file=sys.stderr)


def _clone(args) -> None:
    model = _load_model(args)
    voice = model.voice_from_audio(args.audio, args.text)
    voice.save(args.output)
    print(f"wrote {args.output}: {voice.num_frames} frames ({voice.num_frames * 0.08:.2f} s), "
          f"{len(voice.transcript_ids)} transcript tokens", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        {"respond": _respond, "voice": _clone}[args.command](args)
    except (AudioError, CheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
