"""Write a tiny, deterministic Chroma checkpoint in the FlashLabs/Chroma-4B layout.

The checkpoint has the exact tensor names, shapes and config.json layout of the
published FlashLabs/Chroma-4B checkpoint, only with tiny sizes (1 layer per
transformer, small MLPs, a 1000-token text vocabulary) and weights filled from a
counter-based generator keyed by each tensor's name, so every machine and every
library version writes the very same bytes.

It also writes a tiny processor in the published form: a byte-level BPE tokenizer
(`tokenizer.json`, `tokenizer_config.json` with the Qwen2.5-Omni style chat template) whose
special tokens sit at the ids the tiny config uses, and a Whisper feature-extractor config
(`preprocessor_config.json`, 128 mel bins), so the full text-and-audio path can be tested.

The golden cases in tests/data/golden/ were produced by the original FlashLabs
implementation running on this checkpoint (seed 0): a faithful implementation must
reproduce them.

    python -m chroma_agent.testing.tiny_checkpoint OUT_DIR            # config.json + model.safetensors (~280 MB)
    python -m chroma_agent.testing.tiny_checkpoint OUT_DIR --seed 7   # another deterministic variant

    from chroma_agent.testing.tiny_checkpoint import make_tiny_checkpoint
    make_tiny_checkpoint("/tmp/tiny", seed=0)

Needs numpy and safetensors; the processor files also need `tokenizers`.
"""
import argparse
import json
import shutil
import zlib
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

DATA = Path(__file__).resolve().parent / "data"
CONFIG = DATA / "tiny_config.json"              # the layout of the published config.json, tiny sizes
MANIFEST = DATA / "tiny_manifest.json"          # the published tensor names with tiny shapes
FULL_SIZE_CONFIG = DATA / "full_size_config.json"   # Chroma-4B's architecture, for random-weight benchmarks


def uniform(name: str, seed: int, count: int) -> np.ndarray:
    """`count` floats in [-1, 1), a pure function of (name, seed)."""
    key = zlib.crc32(name.encode()) ^ (seed * 0x9E3779B1 & 0xFFFFFFFF)
    raw = np.random.PCG64(key).random_raw(count)
    return ((raw >> np.uint64(11)).astype(np.float64) / float(1 << 53) * 2.0 - 1.0)


def fill(name: str, shape: list, seed: int) -> np.ndarray:
    n = int(np.prod(shape)) if shape else 1
    u = uniform(name, seed, n).reshape(shape)
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith("codebook.initialized"):
        return np.ones(shape, np.float32)
    if name.endswith("codebook.cluster_usage"):
        return (1.0 + 0.5 * u).astype(np.float32)
    if name.endswith("codebook.embed_sum"):
        return u.astype(np.float32)
    if "layer_scale" in name or leaf == "scale":
        return (0.01 + 0.005 * u).astype(np.float32)
    if len(shape) == 1:
        if "norm" in name or "ln_" in name:
            return (1.0 + 0.1 * u).astype(np.float32)
        return (0.02 * u).astype(np.float32)
    fan_in = int(np.prod(shape[1:]))
    if name.startswith("codec_model.") or "audio_tower.conv" in name:
        bound = 1.0 / np.sqrt(fan_in)          # keep the random codec numerically tame
    else:
        bound = 0.02 * np.sqrt(3.0)            # std 0.02, like the model's initializer
    return (bound * u).astype(np.float32)


# Special tokens of the tiny processor, at the ids the tiny config.json uses.
SPECIAL_TOKENS = {
    980: "<|im_start|>", 981: "<|endoftext|>",
    990: "<|text_start|>", 991: "<|text_end|>", 992: "<|im_end|>",
    993: "<|audio_bos|>", 994: "<|audio_eos|>", 995: "<|AUDIO|>",
    996: "<|IMAGE|>", 997: "<|VIDEO|>", 998: "<|vision_bos|>", 999: "<|vision_eos|>",
}
VOCAB_SIZE = 1000

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'audio' %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = """\
Hello, thanks for calling. How can I help you today?
I would like to book a table for two people tomorrow evening at seven.
Sure, let me check the schedule. Could you tell me your name and phone number?
My order has not arrived yet and the tracking page has not changed since Monday.
I am sorry to hear that. I can send a replacement or refund the payment right away.
What time does the store open on Saturday, and is there parking nearby?
The weather will be sunny in the morning with some rain later in the afternoon.
Please hold on for a moment while I transfer your call to the right department.
Can you repeat that more slowly? The line is a little noisy on my side.
Thank you very much, that was really helpful. Have a wonderful day. Goodbye!
One, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve.
The quick brown fox jumps over the lazy dog while the band plays a quiet song.
"""


def write_processor(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    n_plain = min(SPECIAL_TOKENS)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=n_plain, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines() * 4, trainer)
    trained = json.loads(tok.to_str())["model"]
    vocab = dict(trained["vocab"])
    vocab.update({f"<|reserved_{i}|>": i for i in range(len(vocab), n_plain)})  # pad the BPE vocab itself
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok.model = models.BPE(vocab=vocab, merges=merges)
    for i in range(n_plain, VOCAB_SIZE):
        name = SPECIAL_TOKENS.get(i, f"<|reserved_{i}|>")
        assert tok.add_special_tokens([name]) == 1 and tok.token_to_id(name) == i, name
    tok.save(str(out / "tokenizer.json"))
    added = {str(i): {"content": SPECIAL_TOKENS.get(i, f"<|reserved_{i}|>"), "special": True, "lstrip": False,
                      "rstrip": False, "normalized": False, "single_word": False} for i in range(n_plain, VOCAB_SIZE)}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "model_max_length": 32768, "errors": "replace",
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "added_tokens_decoder": added, "chat_template": CHAT_TEMPLATE,
    }, indent=1))
    (out / "preprocessor_config.json").write_text(json.dumps({
        "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 128, "sampling_rate": 16000,
        "hop_length": 160, "chunk_length": 30, "n_fft": 400, "padding_side": "right", "padding_value": 0.0,
        "return_attention_mask": True,
    }, indent=1))


def make_tiny_checkpoint(out_dir, seed: int = 0) -> Path:
    """Write the tiny checkpoint for `seed` into `out_dir` (created); returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = json.loads(MANIFEST.read_text())
    tensors = {m["name"]: fill(m["name"], m["shape"], seed) for m in manifest}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(CONFIG, out / "config.json")
    write_processor(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = make_tiny_checkpoint(args.out_dir, args.seed)
    print(f"wrote the tiny checkpoint (seed {args.seed}) and its processor files to {out}")


if __name__ == "__main__":
    main()
