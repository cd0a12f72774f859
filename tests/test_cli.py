"""The `chroma-agent` command line, end to end on spoken input."""
import sys
import types

import numpy as np
import pytest
import soundfile as sf
import torch

from chroma_agent import Voice
from chroma_agent.cli import main

TRANSCRIPT = "Hello, thanks for calling. How can I help you today?"


def test_respond_with_reference_clip(tiny_checkpoint, speech, tmp_path, capsys):
    out = tmp_path / "answer.wav"
    rc = main(["respond", "--model", str(tiny_checkpoint), "--voice-audio", str(speech["reference"]),
               "--voice-text", TRANSCRIPT, "--input", str(speech["question"]), "--output", str(out),
               "--max-frames", "6", "--seed", "0", "--device", "cpu"])
    assert rc == 0
    audio, rate = sf.read(out)
    assert rate == 24000 and audio.shape == (6 * 1920,)
    err = capsys.readouterr().err
    assert "6 frames" in err and "real-time factor" in err
    assert "read the weights onto cpu" in err and "CPU matmul plans" in err  # what loading spent its time on


def test_voice_file_then_respond_is_repeatable(tiny_checkpoint, speech, tmp_path):
    voice_file = tmp_path / "caller.voice.safetensors"
    assert main(["voice", "--model", str(tiny_checkpoint), "--audio", str(speech["reference"]),
                 "--text", TRANSCRIPT, "--output", str(voice_file), "--device", "cpu"]) == 0
    assert Voice.load(voice_file).transcript == TRANSCRIPT
    outs = []
    for name in ("a.wav", "b.wav"):
        assert main(["respond", "--model", str(tiny_checkpoint), "--voice", str(voice_file),
                     "--input", str(speech["question"]), "--output", str(tmp_path / name),
                     "--max-frames", "4", "--greedy", "--device", "cpu"]) == 0
        outs.append(sf.read(tmp_path / name)[0])
    assert np.array_equal(outs[0], outs[1])


def test_bad_input_is_a_clear_error(tiny_checkpoint, speech, tmp_path, capsys):
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    rc = main(["respond", "--model", str(tiny_checkpoint), "--voice-audio", str(speech["reference"]),
               "--voice-text", TRANSCRIPT, "--input", str(bad), "--output", str(tmp_path / "o.wav"),
               "--device", "cpu"])
    assert rc == 2
    assert "cannot read audio file" in capsys.readouterr().err
    assert not (tmp_path / "o.wav").exists()


def test_missing_checkpoint_is_a_clear_error(tmp_path, speech, capsys):
    rc = main(["voice", "--model", str(tmp_path), "--audio", str(speech["reference"]), "--text", "hi",
               "--output", str(tmp_path / "v.safetensors"), "--device", "cpu"])
    assert rc == 2
    assert "config.json not found" in capsys.readouterr().err


def test_serve_twilio_loads_once_then_hands_over(tiny_checkpoint, voice, tmp_path, monkeypatch):
    """The CLI side of `serve twilio`: the plugin's `serve` gets the loaded model, the voice
    and every option; the plugin is imported only for the command."""
    calls, threads = [], []
    plugin = types.ModuleType("pipecat_chroma.twilio_server")
    plugin.serve = lambda **kwargs: (calls.append(kwargs), threads.append(torch.get_num_threads()))
    monkeypatch.setitem(sys.modules, "pipecat_chroma.twilio_server", plugin)
    voice.save(tmp_path / "me.voice.safetensors")
    assert main(["serve", "twilio", "--model", str(tiny_checkpoint), "--device", "cpu", "--voice",
                 str(tmp_path / "me.voice.safetensors"), "--port", "9000", "--public-url", "https://x.example",
                 "--max-calls", "3", "--system-prompt", "Be brief.", "--max-frames", "100",
                 "--torch-threads", "3"]) == 0
    assert threads == [3]   # set before the model loaded and served
    (kwargs,) = calls
    model = kwargs.pop("model")
    assert model.device.type == "cpu" and np.array_equal(kwargs.pop("voice").codes, voice.codes)
    assert kwargs == {"host": "0.0.0.0", "port": 9000, "public_url": "https://x.example", "max_calls": 3,
                      "system_prompt": "Be brief.", "max_frames": 100, "greeting": None,
                      "drain_seconds": 30, "media_timeout_s": None}


@pytest.mark.parametrize("argv, message", [
    (["serve", "twilio", "--max-calls", "0"], "--max-calls: must be at least 1"),
    (["serve", "twilio", "--port", "0"], "--port: must be at least 1"),
    (["serve", "realtime", "--torch-threads", "0"], "--torch-threads: must be at least 1"),
    (["serve", "nosuchserver"], "invalid choice: 'nosuchserver'"),
    (["respond", "--output", "a.wav", "--temperature", "nan"], "--temperature: must be above 0"),
])
def test_argument_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("flag, env, warned", [(["--api-key", "k1"], {}, True),
                                                ([], {"CHROMA_AGENT_API_KEY": "k1"}, False)])
def test_serve_realtime_api_key_from_the_environment_or_a_warned_flag(flag, env, warned, tiny_checkpoint, voice,
                                                                       tmp_path, monkeypatch, capsys):
    """A key on the command line is readable by every local user (/proc/PID/cmdline): it
    still works, with a warning that names the environment variable."""
    import chroma_agent.serving.realtime_server as realtime_server

    calls = []
    monkeypatch.setattr(realtime_server, "serve", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv("CHROMA_AGENT_API_KEY", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    voice.save(tmp_path / "me.voice.safetensors")
    assert main(["serve", "realtime", "--model", str(tiny_checkpoint), "--device", "cpu", "--voice",
                 str(tmp_path / "me.voice.safetensors"), *flag]) == 0
    assert calls[0]["api_key"] == "k1"
    err = capsys.readouterr().err
    assert ("CHROMA_AGENT_API_KEY in the environment instead" in err) == warned



def test_serve_log_format_json_makes_every_line_a_json_object(tiny_checkpoint, voice, tmp_path, monkeypatch, capsys):
    """`serve KIND --log-format json`: the lines logged while serving (the model's loading
    included) are JSON objects; the server gets no `log_format` option; text again after."""
    import json
    import logging

    import chroma_agent.serving.realtime_server as realtime_server

    calls = []

    def serve(**kwargs):
        logging.getLogger("chroma_agent.test").info("serving now")
        calls.append(kwargs)

    monkeypatch.setattr(realtime_server, "serve", serve)
    voice.save(tmp_path / "me.voice.safetensors")
    assert main(["serve", "realtime", "--model", str(tiny_checkpoint), "--device", "cpu", "--voice",
                 str(tmp_path / "me.voice.safetensors"), "--log-format", "json"]) == 0
    assert "log_format" not in calls[0]
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]   # every line: one JSON object
    assert any(r["message"] == "serving now" and r["level"] == "INFO" for r in records)
    assert any(r["message"].startswith("loaded ") for r in records)   # the command line's own lines too
    logging.getLogger("chroma_agent.test").info("after")   # undone: no JSON line any more
    assert "{" not in capsys.readouterr().err

# -- serve KIND: the servers' entry points --

def _no_model_load(monkeypatch):
    import chroma_agent.cli as cli

    monkeypatch.setattr(cli, "_load_model", lambda args: pytest.fail("the model loaded before the server's checks"))


def test_serve_finds_its_server_through_the_entry_point_group(speech, monkeypatch, capsys):
    """A package's entry point in `chroma_agent.servers` names the module; its
    `check_serve_args` gets every server option before the model loads."""
    import importlib.metadata

    from chroma_agent.cli import SERVER_GROUP

    checked = []
    plugin = types.ModuleType("elsewhere_twilio_server")

    def check_serve_args(**options):
        checked.append(options)
        raise ValueError("--public-url: checked by the plugin")

    plugin.check_serve_args, plugin.serve = check_serve_args, lambda **kwargs: pytest.fail("served")
    monkeypatch.setitem(sys.modules, "elsewhere_twilio_server", plugin)
    found = importlib.metadata.EntryPoint(name="twilio", value="elsewhere_twilio_server", group=SERVER_GROUP)
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group=None: [found] if group == SERVER_GROUP else [])
    _no_model_load(monkeypatch)
    assert main(["serve", "twilio", "--voice-audio", str(speech["reference"]), "--voice-text", TRANSCRIPT,
                 "--device", "cpu", "--max-calls", "2"]) == 2
    assert "error: --public-url: checked by the plugin" in capsys.readouterr().err
    assert checked == [{"host": "0.0.0.0", "port": 8765, "system_prompt": None, "max_frames": None,
                        "public_url": None, "media_timeout_s": None, "max_calls": 2, "greeting": None,
                        "drain_seconds": 30}]


@pytest.mark.parametrize("kind", ["twilio", "web"])
def test_serve_without_its_plugin_names_what_to_install_before_the_model_loads(kind, speech, monkeypatch, capsys):
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: [])   # no package declares it
    monkeypatch.setitem(sys.modules, f"pipecat_chroma.{kind}_server", None)          # and the module is not there
    _no_model_load(monkeypatch)
    assert main(["serve", kind, "--voice-audio", str(speech["reference"]), "--voice-text", TRANSCRIPT,
                 "--device", "cpu"]) == 2
    assert f"chroma-agent serve {kind} needs the Pipecat plugin: pip install -e plugins/pipecat" in capsys.readouterr().err


def test_serve_realtime_checks_its_voices_folder_before_the_model_loads(speech, tmp_path, monkeypatch, capsys):
    _no_model_load(monkeypatch)
    assert main(["serve", "realtime", "--voice-audio", str(speech["reference"]), "--voice-text", TRANSCRIPT,
                 "--device", "cpu", "--voices", str(tmp_path / "none")]) == 2
    assert f"--voices {tmp_path / 'none'}: not a folder" in capsys.readouterr().err
