"""The command line's argument types and the argument groups its commands share (cli.py,
cli_serve.py): plain argparse, nothing heavy imported."""
from __future__ import annotations

import argparse

DEFAULT_MODEL = "FlashLabs/Chroma-4B"
DTYPES = ("auto", "float32", "bfloat16", "float16")


def at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def positive_at_most(high: float, what: str):
    """A number above 0 and at most `high` (`what` names the bound in the error, "a day")."""
    def parse(text: str) -> float:
        value = positive(text)
        if value > high:
            raise argparse.ArgumentTypeError(f"must be above 0 and at most {what}, got {text}")
        return value
    return parse


def port(text: str) -> int:
    port = at_least(1)(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"a port is at most 65535, got {port}")
    return port


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"checkpoint directory or hub id (default: {DEFAULT_MODEL})")
    g.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="weights' precision (default: auto = bfloat16 on CUDA, float32 on the CPU)")


def add_voice_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("voice (either a saved voice or a reference clip and its transcript)")
    g.add_argument("--voice", help="voice file made by `chroma-agent voice`")
    g.add_argument("--voice-audio", help="reference clip of the voice to clone (0.5-30 s of speech, any rate)")
    g.add_argument("--voice-text", help="transcript of the reference clip")


def add_system_prompt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system-prompt", default=None,
                   help="system prompt for the reasoner (default: a brief, spoken-style assistant; '' for none)")
