"""The README's Python snippets run as written (on the tiny checkpoint instead of the hub id)."""
import re
from pathlib import Path

import pytest
import soundfile as sf

README = Path(__file__).resolve().parents[1] / "README.md"


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_its_snippets():
    found = snippets()
    assert len(found) >= 2 and any("asyncio.run(" in s for s in found)


@pytest.mark.parametrize("index", range(len(snippets())))
def test_snippet_runs_as_written(index, model, voice, speech, tmp_path, monkeypatch):
    from chroma_agent import api

    loaded = []

    def from_pretrained(name, **kwargs):
        assert name == "FlashLabs/Chroma-4B"
        loaded.append(name)
        return model

    monkeypatch.setattr(api.ChromaModel, "from_pretrained", from_pretrained)
    monkeypatch.chdir(tmp_path)
    # the files the snippets name: the user's question, a reference clip, a saved voice
    for name, source in (("question.wav", "question"), ("my_voice.wav", "reference")):
        (tmp_path / name).write_bytes(speech[source].read_bytes())
    voice.save(tmp_path / "me.voice.safetensors")
    code = snippets()[index]
    exec(compile(code, f"README.md snippet {index + 1}", "exec"), {"__name__": "__main__"})
    assert loaded
    if "answer.wav" in code:
        audio, rate = sf.read(tmp_path / "answer.wav")
        assert rate == 24000 and len(audio) > 0
