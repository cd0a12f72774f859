"""Streamed text is exact in every script: deltas join to the whole decode, no U+FFFD midway."""
import pytest

from chroma_agent.events import ResponseDone, TextDelta
from chroma_agent.runtime.detokenizer import IncrementalDetokenizer

LINES = ["Café naïve, déjà vu.", "你好，世界！今天天气很好。", "Bye 👋🏽 and 🎉🎉!", "mixed: Ελληνικά, العربية, 日本語 😀 ok"]


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint)


def decoder(tokenizer):
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("line", LINES)
@pytest.mark.parametrize("step", [1, 2, 3])
def test_deltas_join_to_the_whole_decode(tokenizer, line, step):
    ids = tokenizer(line, add_special_tokens=False)["input_ids"]
    # the tiny tokenizer is byte-level: some of these characters span several tokens
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    detok = IncrementalDetokenizer(decoder(tokenizer))
    deltas = [detok.push(ids[i:i + step]) for i in range(0, len(ids), step)]
    deltas.append(detok.flush())
    assert "".join(deltas) == line == detok.text
    assert not any("\ufffd" in d for d in deltas)


def test_an_incomplete_character_is_held_until_the_token_that_completes_it(tokenizer):
    ids = tokenizer("é", add_special_tokens=False)["input_ids"]
    assert len(ids) == 2   # two UTF-8 bytes, two byte-level tokens
    detok = IncrementalDetokenizer(decoder(tokenizer))
    assert detok.push(ids[:1]) == ""
    assert detok.push(ids[1:]) == "é"
    assert detok.flush() == ""


def test_flush_releases_a_character_that_never_completes(tokenizer):
    ids = tokenizer("aé", add_special_tokens=False)["input_ids"]
    assert len(ids) == 3
    detok = IncrementalDetokenizer(decoder(tokenizer))
    assert detok.push(ids[:1]) == "a"
    assert detok.push(ids[1:2]) == ""
    assert detok.flush() == "\ufffd" == tokenizer.decode(ids[:2])[1:]   # as the whole decode has it


@pytest.mark.parametrize("line", LINES)
def test_say_streams_exact_text(model, voice, line):
    conv = model.conversation(voice)
    ids = model.processor.tokenizer(line, add_special_tokens=False)["input_ids"]
    events = list(conv.say(line, max_frames=2 * len(ids) + 4, seed=0))
    deltas = [e for e in events if isinstance(e, TextDelta)]
    done = events[-1]
    assert isinstance(done, ResponseDone)
    assert "".join(d.text for d in deltas) == line == done.text
    assert all(d.text and "\ufffd" not in d.text for d in deltas)
    # one reasoner token per two frames: every token is spoken, each in exactly one delta, in order
    assert [t for d in deltas for t in d.token_ids] == ids


def test_a_cut_off_reply_still_joins_to_its_decode(model, voice):
    """Cut midway through an emoji: the held bytes come out last, as the whole decode has them."""
    conv = model.conversation(voice)
    events = list(conv.say(LINES[2], max_frames=10, seed=0))   # 5 tokens: "Bye " and an emoji's first byte
    done = events[-1]
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert done.stop_reason == "max_frames" and done.text == "Bye \ufffd"
    assert "".join(d.text for d in deltas) == done.text and deltas[-1].text == "\ufffd"
    assert model.processor.decode([t for d in deltas for t in d.token_ids]) == done.text


def test_respond_streams_exact_text(model, voice, speech):
    """A reply of the tiny model (any tokens at all, byte pieces among them): the deltas
    join to the decode of their tokens, taken whole."""
    conv = model.conversation(voice)
    events = list(conv.respond(audio=speech["question"], max_frames=40, seed=0))
    deltas = [e for e in events if isinstance(e, TextDelta)]
    ids = [t for d in deltas for t in d.token_ids]
    assert ids and "".join(d.text for d in deltas) == model.processor.decode(ids) == events[-1].text
