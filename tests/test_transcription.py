"""Caller transcripts by the reasoner: the recognition prompt follows the checkpoint's own chat
template, the side pass reuses the turn's features on a reasoner of its own, streams exact
text, stops at im_end or at its token limit, and fails into an event, not an exception."""
import json
import shutil

import pytest
import torch

from chroma_agent.events import TranscriptDelta, TranscriptDone
from chroma_agent.model.processor import ChromaProcessor, audio_token_count
from chroma_agent.runtime import transcription
from chroma_agent.runtime.transcription import (RECOGNITION_SYSTEM, recognition_instruction, recognition_messages,
                                                recognition_prompt, transcribe)

OTHER_TEMPLATE = (  # other role markers and layout than the tiny (Qwen-style) template
    "{% for message in messages %}### {{ message['role'] | upper }} ###\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}[{{ part['text'] }}]"
    "{% elif part['type'] == 'audio' %}<|AUDIO|>"
    "{% endif %}{% endfor %}{% endif %}\n\n{% endfor %}"
    "{% if add_generation_prompt %}### ASSISTANT ###\n{% endif %}"
)


@pytest.fixture(scope="module")
def clip(model, speech):
    return model.processor.load_user_audio(speech["question"])


@pytest.fixture(scope="module")
def features(model, clip):
    return model.processor.features(clip)


@pytest.fixture(scope="module")
def other_processor(model, tiny_checkpoint, tmp_path_factory):
    """The tiny processor files (not the weights) with another chat template."""
    d = tmp_path_factory.mktemp("other_template")
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        shutil.copy(tiny_checkpoint / name, d / name)
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["chat_template"] = OTHER_TEMPLATE
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return ChromaProcessor.from_pretrained(d, model.config)


def run(model, feats, **kw) -> tuple[list[TranscriptDelta], TranscriptDone]:
    events = list(transcribe(model, *feats, **kw))
    assert all(isinstance(e, TranscriptDelta) for e in events[:-1]) and isinstance(events[-1], TranscriptDone)
    return events[:-1], events[-1]


class Counting(transcription.Reasoner):
    """The real reasoner, counting its steps; `script` teacher-forces its tokens."""

    steps = 0
    script: list[int] = []

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.forced = list(Counting.script)

    def step(self, token):
        Counting.steps += 1
        return super().step(token)


@pytest.fixture
def counting(monkeypatch):
    Counting.steps, Counting.script = 0, []
    monkeypatch.setattr(transcription, "Reasoner", Counting)
    return Counting


@pytest.mark.parametrize("which", ["tiny", "other"])
def test_prompt_is_the_checkpoint_templates_rendering(model, other_processor, clip, features, which):
    proc = model.processor if which == "tiny" else other_processor
    messages = [{"role": "system", "content": "You are a speech recognition model."},
                {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text":
                 "Transcribe the English audio into text without any punctuation marks."}]}]
    assert recognition_messages() == messages
    rendered = proc.render(messages, add_generation_prompt=True)
    placeholders = proc.audio_token * audio_token_count(int(features[1].sum()))
    expected = proc.tokenizer(rendered.replace(proc.audio_token, placeholders), add_special_tokens=False)["input_ids"]

    prompt = recognition_prompt(proc, *features)
    assert prompt.input_ids[0].tolist() == expected
    # the processor's own path (which extracts the features anew) gives the same ids and features
    own = proc.reasoner_input(messages, [clip])
    assert torch.equal(own.input_ids, prompt.input_ids)
    assert torch.equal(own.input_features, prompt.input_features)
    assert prompt.input_features is features[0] and prompt.feature_attention_mask is features[1]  # reused
    text = proc.tokenizer.decode(expected)
    assert RECOGNITION_SYSTEM in text and recognition_instruction() in text
    assert ("### SYSTEM ###" in text) == (which == "other") and ("<|im_start|>" in text) == (which == "tiny")


def test_templates_differ_and_language_is_asked(model, other_processor, features):
    tiny, other = recognition_prompt(model.processor, *features), recognition_prompt(other_processor, *features)
    assert tiny.input_ids.tolist() != other.input_ids.tolist()
    french = model.processor.tokenizer.decode(recognition_prompt(model.processor, *features, "French").input_ids[0])
    assert "Transcribe the French audio into text without any punctuation marks." in french


def test_truncated_at_max_tokens_deterministic_and_exact(model, features, counting):
    deltas, done = run(model, features, max_tokens=5, turn=7, language="English")
    assert done.truncated and done.error is None and (done.turn, done.language) == (7, "English")
    assert counting.steps == 5  # 5 tokens taken; the last step only says whether the model had ended
    assert "".join(d.text for d in deltas) == done.text and all(d.turn == 7 for d in deltas)
    assert run(model, features, max_tokens=5, turn=7) == (deltas, done)


def test_stops_at_im_end_with_exact_text(model, features, counting):
    text = "Café 你好 ok"
    ids = model.processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    counting.script = ids + [model.config.im_end_token_id]
    deltas, done = run(model, features, max_tokens=len(ids) + 3)
    assert not done.truncated and done.error is None
    assert done.text == text == "".join(d.text for d in deltas)
    assert counting.steps == len(ids)  # no step after im_end was predicted


def test_ending_exactly_at_the_limit_is_not_truncated(model, features, counting):
    counting.script = [model.config.im_end_token_id]
    deltas, done = run(model, features, max_tokens=1)
    assert (deltas, done.text, done.truncated) == ([], "", False)  # no words: empty, not an error
    ids = model.processor.tokenizer("ok", add_special_tokens=False)["input_ids"]
    counting.script = ids + [model.config.im_end_token_id]
    assert not run(model, features, max_tokens=len(ids))[1].truncated


def test_no_audio_is_an_empty_transcript(model):
    assert list(transcribe(model, None, None, turn=2)) == [TranscriptDone("", 2, "English", False)]


def test_audio_features_are_reused(model, features, monkeypatch):
    tower = model.thinker.model.audio_tower
    calls = {"tower": 0, "extractor": 0}
    forward, extract = tower.forward, model.processor.features

    def counted_forward(*a, **kw):
        calls["tower"] += 1
        return forward(*a, **kw)

    def counted_features(*a, **kw):
        calls["extractor"] += 1
        return extract(*a, **kw)

    monkeypatch.setattr(tower, "forward", counted_forward)
    monkeypatch.setattr(model.processor, "features", counted_features)
    run(model, features, max_tokens=3)
    # no new feature extraction; the encoder runs once, in the side pass's own prefill
    assert calls == {"tower": 1, "extractor": 0}


def test_failure_ends_in_an_event(model, features, counting, monkeypatch):
    real = Counting.step

    def failing(self, token):
        if Counting.steps == 2:
            raise RuntimeError("device lost")
        return real(self, token)

    monkeypatch.setattr(Counting, "step", failing)
    deltas, done = run(model, features, max_tokens=10, turn=1)
    assert done.error == "device lost" and not done.truncated
    assert done.text == "".join(d.text for d in deltas)
    # a failure building the prompt (a mask that does not fit the features) is an event too
    broken = run(model, (features[0], features[1][:, :5]))[1]
    assert broken.error and broken.text == ""


def test_bad_arguments_raise_at_once(model, features):
    with pytest.raises(ValueError):
        transcribe(model, *features, max_tokens=0)
    with pytest.raises(ValueError):
        transcribe(model, features[0], None)


def test_conversation_cache_untouched(model, voice, features, clip):
    conv = model.conversation(voice=voice, frame_graphs=False)
    list(conv.respond(clip, 16000, max_frames=2, greedy=True))
    mark, cache = conv.reasoner.mark(), conv.reasoner.cache
    keys = [k.clone() for k in cache.keys]
    run(model, features, max_tokens=4)
    assert conv.reasoner.mark() == mark and conv.reasoner.cache is cache
    assert all(torch.equal(a, b) for a, b in zip(keys, cache.keys))
