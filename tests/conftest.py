"""Shared fixtures: the tiny checkpoint (generated once per session, never committed),
the model loaded from it, the golden cases (tests/data/golden) and spoken test audio from espeak-ng."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
# measured matmul plans go to a fresh folder, not the user's cache (subprocesses inherit it)
os.environ.setdefault("CHROMA_AGENT_CACHE_DIR", tempfile.mkdtemp(prefix="chroma-agent-test-cache-"))
GOLDEN = REPO / "tests" / "data" / "golden" / "tiny_seed0.json"   # made by the original implementation


def make_checkpoint(out: Path, seed: int = 0) -> Path:
    from chroma_agent.testing.tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(out, seed)


@pytest.fixture(autouse=True)
def _torch_threads_kept():
    """A `serve` command run in-process sets torch's threads for the whole process (one
    core left to the calls): every test gets the suite's back."""
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    yield
    if before is not None:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny_chroma"))


@pytest.fixture(scope="session")
def model(tiny_checkpoint):
    from chroma_agent import ChromaModel

    return ChromaModel.from_pretrained(tiny_checkpoint, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def golden_cases() -> list[dict]:
    return json.loads(GOLDEN.read_text())["cases"]


@pytest.fixture(scope="session")
def voice(model, golden_cases):
    case = golden_cases[0]
    return model.voice_from_audio(np.asarray(case["prompt_audio_24k"], np.float32), case["prompt_text_ids"],
                                  sample_rate=24000)


def speak(text: str, path: Path) -> Path:
    """espeak-ng speech as a WAV (22.05 kHz mono)."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is not installed (apt-get install espeak-ng); the tests speak with it")
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
    return path


@pytest.fixture(scope="session")
def speech(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("speech")
    return {
        "question": speak("What time does the store open on Saturday?", d / "question.wav"),
        "reference": speak("Hello, thanks for calling. How can I help you today?", d / "reference.wav"),
    }


@pytest.fixture
def wav(tmp_path):
    """Write samples to a WAV and return its path."""
    def write(samples: np.ndarray, rate: int, name: str = "clip.wav") -> Path:
        path = tmp_path / name
        sf.write(path, samples, rate)
        return path
    return write


@pytest.fixture
def tower_calls(model, monkeypatch) -> list:
    """The audio tower's runs (one item each) from here on: the encoder runs once per turn."""
    tower, calls = model.thinker.model.audio_tower, []
    forward = tower.forward

    def counted(*a, **kw):
        calls.append(1)
        return forward(*a, **kw)

    monkeypatch.setattr(tower, "forward", counted)
    return calls
