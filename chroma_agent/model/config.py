"""Parse a Chroma `config.json` into the transformers configs of its four parts."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import LlamaConfig, MimiConfig, Qwen2_5OmniThinkerConfig


class ConfigError(ValueError):
    """The checkpoint's config.json is missing, unreadable or not a Chroma config."""


_REQUIRED = ("thinker_config", "backbone_config", "decoder_config", "codec_config",
             "audio_num_codebooks", "codebook_pad_token_id", "codebook_eos_token_id",
             "text_start_token_id", "text_end_token_id", "im_end_token_id")


def _llama(sub: dict[str, Any]) -> LlamaConfig:
    sub = {k: v for k, v in sub.items() if k not in ("model_type", "audio_num_codebooks", "audio_embedding_dim")}
    cfg = LlamaConfig(**sub)
    cfg._attn_implementation = "sdpa"
    return cfg


@dataclass(frozen=True)
class ChromaConfig:
    """Everything the runtime needs from a checkpoint's config.json.

    `raw` keeps the file as read (its `auto_map` for remote code is ignored on purpose).
    """

    thinker: Qwen2_5OmniThinkerConfig
    backbone: LlamaConfig
    decoder: LlamaConfig
    codec: MimiConfig
    num_codebooks: int
    codebook_vocab: int          # ids per codebook: Mimi's 2048 codes + 3 specials
    pad_token_id: int
    eos_token_id: int
    text_start_token_id: int
    text_end_token_id: int
    im_end_token_id: int
    frame_size: int              # samples per 80 ms frame at 24 kHz
    audio_embedding_dim: int
    raw: dict[str, Any]

    @property
    def sample_rate(self) -> int:
        return int(self.codec.sampling_rate)

    @property
    def codec_vocab(self) -> int:
        """Ids Mimi can decode (the specials above it cannot)."""
        return int(self.codec.codebook_size)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ChromaConfig":
        if raw.get("model_type") != "chroma":
            raise ConfigError(f"config.json has model_type={raw.get('model_type')!r}; expected 'chroma' "
                              "(a FlashLabs Chroma checkpoint such as FlashLabs/Chroma-4B)")
        missing = [k for k in _REQUIRED if k not in raw]
        if missing:
            raise ConfigError(f"config.json lacks {', '.join(missing)}")
        thinker_raw = {k: v for k, v in raw["thinker_config"].items() if k != "model_type"}
        thinker = Qwen2_5OmniThinkerConfig(**thinker_raw)
        codec = MimiConfig(**{k: v for k, v in raw["codec_config"].items() if k != "model_type"})
        backbone, decoder = _llama(raw["backbone_config"]), _llama(raw["decoder_config"])
        num_codebooks = int(raw["audio_num_codebooks"])
        if num_codebooks > codec.num_quantizers:
            raise ConfigError(f"audio_num_codebooks={num_codebooks} exceeds Mimi's {codec.num_quantizers} quantizers")
        return cls(
            thinker=thinker, backbone=backbone, decoder=decoder, codec=codec,
            num_codebooks=num_codebooks,
            codebook_vocab=int(raw["backbone_config"]["vocab_size"]),
            pad_token_id=int(raw["codebook_pad_token_id"]),
            eos_token_id=int(raw["codebook_eos_token_id"]),
            text_start_token_id=int(raw["text_start_token_id"]),
            text_end_token_id=int(raw["text_end_token_id"]),
            im_end_token_id=int(raw["im_end_token_id"]),
            frame_size=int(raw.get("audio_frame_freq", 1920)),
            audio_embedding_dim=int(raw["decoder_config"].get("audio_embedding_dim",
                                                              raw["backbone_config"]["hidden_size"])),
            raw=raw,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "ChromaConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path} not found: a Chroma checkpoint directory holds config.json") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e})") from None
        return cls.from_dict(raw)
