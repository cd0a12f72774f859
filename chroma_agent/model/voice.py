"""A cloned voice: the Mimi codes of a reference clip and the ids of its transcript,
saved as one small safetensors file (no pickle)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from safetensors import safe_open

FORMAT = "chroma-voice"
VERSION = "1"


@dataclass(frozen=True, eq=False)
class Voice:
    """The voice prompt of a reply.

    `codes` is [frames, codebooks] int64 Mimi codes of the reference audio at 24 kHz,
    `transcript_ids` the reasoner tokenizer's ids of what it says.
    """

    codes: np.ndarray
    transcript: str
    transcript_ids: tuple[int, ...]
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        codes = np.ascontiguousarray(self.codes, dtype=np.int64)  # safetensors writes raw buffers
        if codes.ndim != 2 or codes.shape[0] == 0:
            raise ValueError(f"voice codes must be [frames, codebooks] with at least one frame, got {codes.shape}")
        object.__setattr__(self, "codes", codes)
        object.__setattr__(self, "transcript_ids", tuple(int(i) for i in self.transcript_ids))

    @property
    def num_frames(self) -> int:
        return int(self.codes.shape[0])

    def codes_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.from_numpy(self.codes).to(device)

    def save(self, path: str | Path) -> Path:
        """Write the voice to `path` (conventionally `*.voice.safetensors`)."""
        path = Path(path)
        meta = {"format": FORMAT, "version": VERSION, "transcript": self.transcript,
                "metadata": json.dumps(self.metadata)}
        save_file({"codes": self.codes, "transcript_ids": np.asarray(self.transcript_ids, dtype=np.int64)},
                  str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Voice":
        """Read a file written by `Voice.save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"voice file {path} does not exist")
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except Exception as e:  # safetensors raises several types for a corrupt header
            raise ValueError(f"{path} is not a voice file ({e})") from None
        if meta.get("format") != FORMAT or "codes" not in tensors:
            raise ValueError(f"{path} is not a chroma-agent voice file (made by Voice.save / `chroma-agent voice`)")
        return cls(tensors["codes"], meta.get("transcript", ""), tuple(tensors["transcript_ids"].tolist()),
                   json.loads(meta.get("metadata", "{}")))
