"""Find a checkpoint (local directory or Hugging Face hub id) and load its safetensors
into our modules, mapping the published tensor names and accounting for every tensor."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# What a local copy needs besides the weights (the processor files are checked by the processor).
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "merges.txt", "vocab.json"]

# Published names (transformers 5.0.0rc0 module trees) -> the module paths of the
# transformers release we run. First matching prefix wins.
_RENAMES = (
    ("thinker.model.", "thinker.model.language_model."),
    ("thinker.audio_tower.", "thinker.model.audio_tower."),
    ("codec_model.encoder.", "codec_model.encoder.encoder_seanet."),
    ("codec_model.encoder_transformer.", "codec_model.encoder.encoder_transformer."),
    ("codec_model.downsample.", "codec_model.encoder.downsample."),
    ("codec_model.decoder.", "codec_model.decoder.decoder_seanet."),
    ("codec_model.decoder_transformer.", "codec_model.decoder.decoder_transformer."),
    ("codec_model.upsample.", "codec_model.decoder.upsample."),
)
# Tensors that exist in the checkpoint but are not needed for speech.
_SKIPPED = ("thinker.visual.", "thinker.model.visual.")
TIED_LM_HEAD = "thinker.lm_head.weight"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not fit the architecture."""


def resolve(path_or_hub_id: str | os.PathLike, revision: str | None = None,
            cache_dir: str | None = None, token: str | bool | None = None) -> Path:
    """A local directory as is; anything else is a hub id downloaded (with progress bars,
    into the huggingface cache) by `huggingface_hub.snapshot_download`."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint directory that holds config.json")
    name = str(path_or_hub_id)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise CheckpointError(f"{name!r} is neither a local directory nor a hub id like 'FlashLabs/Chroma-4B'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, revision=revision, cache_dir=cache_dir, token=token,
                                      allow_patterns=_HUB_PATTERNS))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise CheckpointError(f"could not download {name!r} (revision {revision or 'main'}) from the hub: {e}. "
                              "Check the id and your network, or pass a local directory.") from e


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint: one file, or the shards its index names."""
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({directory / f for f in weight_map.values()})
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{directory} is incomplete: shards {', '.join(absent)} named in {INDEX_FILE} "
                                  "are missing")
        return files
    single = directory / SINGLE_FILE
    if single.is_file():
        return [single]
    raise CheckpointError(f"{directory} holds no weights: expected {SINGLE_FILE} or {INDEX_FILE} with its shards")


@contextlib.contextmanager
def open_weights(file: Path, device: torch.device):
    """`safe_open` one weights file; a damaged or truncated file (an interrupted download),
    found on opening it or on reading a tensor, raises CheckpointError saying what to do."""
    try:
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            yield f
    except (SafetensorError, OSError) as e:
        hub = next((p for p in file.parents if p.name.startswith("models--")), None)  # the hub cache's folder
        fix = f"delete its folder {hub} from the Hugging Face cache" if hub else "delete it"
        raise CheckpointError(f"{file} is damaged or incomplete ({e}): {fix} and download it again") from None


def module_name(published: str, own_names: set[str]) -> str | None:
    """Our parameter name for a checkpoint tensor name, or None when it is a skipped part."""
    if published in own_names:  # already in this transformers release's layout
        return published
    if published.startswith(_SKIPPED):
        return None
    for old, new in _RENAMES:
        if published.startswith(old):
            return new + published[len(old):]
    return published


def load_weights(model: nn.Module, directory: Path, device: torch.device, dtype: torch.dtype,
                 keep_float32: tuple[str, ...] = ()) -> dict[str, str]:
    """Load every checkpoint tensor into `model` (in place, by assignment) and return the
    published-name -> parameter-name map. Raises CheckpointError naming every missing
    or left-over tensor and every shape mismatch. Parameters under a prefix in
    `keep_float32` stay float32 whatever `dtype` is."""
    own = dict(model.state_dict(keep_vars=True))
    own_names = set(own)
    loaded: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    leftover, mismatched = [], []
    for file in weight_files(directory):
        with open_weights(file, device) as f:
            for published in f.keys():
                target = module_name(published, own_names)
                if target is None:
                    continue
                if target not in own:
                    leftover.append(published)
                    continue
                tensor = f.get_tensor(published)
                if tuple(tensor.shape) != tuple(own[target].shape):
                    shapes = f"checkpoint {tuple(tensor.shape)} vs model {tuple(own[target].shape)}"
                    mismatched.append(f"{published}: {shapes}")
                    continue
                want = torch.float32 if target.startswith(keep_float32) or not tensor.is_floating_point() else dtype
                loaded[target] = tensor.to(want)
                names[published] = target
    tied = TIED_LM_HEAD in own and TIED_LM_HEAD not in loaded
    missing = sorted(n for n in own_names - set(loaded) if not (tied and n == TIED_LM_HEAD))
    listed = lambda names, sep=", ": sep.join(names[:20]) + (" ..." if len(names) > 20 else "")  # noqa: E731
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {listed(missing)}")
    if leftover:
        problems.append(f"unexpected tensors ({len(leftover)}): {listed(sorted(leftover))}")
    if mismatched:
        problems.append(f"shape mismatches: {listed(mismatched, '; ')}")
    if problems:
        raise CheckpointError(f"checkpoint {directory} does not fit the model in its config.json: "
                              + " | ".join(problems))
    if tied:
        loaded[TIED_LM_HEAD] = loaded["thinker.model.language_model.embed_tokens.weight"]
        names.setdefault("thinker.lm_head.weight", TIED_LM_HEAD)
    model.load_state_dict(loaded, strict=True, assign=True)
    if tied:  # assign=True copies references; make the tie explicit so edits to one show in the other
        model.thinker.lm_head.weight = model.thinker.model.language_model.embed_tokens.weight
    return names
