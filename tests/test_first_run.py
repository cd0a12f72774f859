"""A newcomer's first run: every mistake is reported before the model loads (for a hub id,
before the download), with a message naming the input, exit code 2, no traceback and no
output file; Ctrl-C leaves a valid partial WAV; `--help` starts without torch."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
HUB_ID = "FlashLabs/Chroma-4B"
TRANSCRIPT = "Hello, thanks for calling. How can I help you today?"
NO_CUDA = "CUDA is not available on this machine (this torch is a CPU build); use --device cpu"


def cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real command line in a fresh process, offline: a hub id can only fail to load."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "chroma_agent.cli", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=timeout)


@pytest.fixture(scope="module")
def files(tmp_path_factory, speech):
    d = tmp_path_factory.mktemp("inputs")
    (d / "notes.txt").write_text("not audio")
    sf.write(d / "silence.wav", np.zeros(16000, np.float32), 16000)
    sf.write(d / "blip.wav", np.full(160, 0.5, np.float32), 16000)    # 10 ms
    sf.write(d / "long.wav", np.full(31 * 8000, 0.1, np.float32), 8000)
    readonly = d / "readonly"
    readonly.mkdir()
    readonly.chmod(0o500)
    # root writes anywhere it has permissions for; sysfs refuses new files even to root
    unwritable = readonly if not os.access(readonly, os.W_OK) else Path("/sys")
    return {"dir": d, "text": d / "notes.txt", "silence": d / "silence.wav", "blip": d / "blip.wav",
            "long": d / "long.wav", "unwritable": unwritable, **speech}


def _respond_cases():
    voice = ["--voice-audio", "{reference}", "--voice-text", TRANSCRIPT]
    turn = ["--input", "{question}"]
    out = ["--output", "{dir}/answer.wav"]
    return {
        "missing input": (voice + ["--input", "{dir}/nope.wav"] + out, ["--input", "nope.wav", "does not exist"]),
        "input not audio": (voice + ["--input", "{text}"] + out, ["--input", "notes.txt", "cannot read audio"]),
        "silent input": (voice + ["--input", "{silence}"] + out, ["--input", "silent"]),
        "input too short": (voice + ["--input", "{blip}"] + out, ["--input", "too short"]),
        "input too long": (voice + ["--input", "{long}"] + out, ["--input", "too long", "30.0 s"]),
        "no user turn": (voice + out, ["--input", "--text"]),
        "empty text": (voice + ["--text", " "] + out, ["--text is empty"]),
        "no voice": (turn + out, ["a voice is needed", "--voice"]),
        "missing voice file": (["--voice", "{dir}/me.voice.safetensors"] + turn + out,
                               ["--voice", "me.voice.safetensors", "does not exist"]),
        "not a voice file": (["--voice", "{question}"] + turn + out, ["--voice", "question.wav", "not a voice file"]),
        "both kinds of voice": (["--voice", "{dir}/me.voice.safetensors"] + voice + turn + out, ["not both"]),
        "clip without transcript": (["--voice-audio", "{reference}"] + turn + out, ["--voice-audio needs --voice-text"]),
        "transcript without clip": (["--voice-text", TRANSCRIPT] + turn + out, ["--voice-text needs --voice-audio"]),
        "empty transcript": (["--voice-audio", "{reference}", "--voice-text", "  "] + turn + out,
                             ["--voice-text is empty"]),
        "missing reference clip": (["--voice-audio", "{dir}/ref.wav", "--voice-text", TRANSCRIPT] + turn + out,
                                   ["--voice-audio", "ref.wav", "does not exist"]),
        "max frames 0": (voice + turn + out + ["--max-frames", "0"], ["--max-frames", "at least 1"]),
        "temperature 0": (voice + turn + out + ["--temperature", "0"], ["--temperature", "above 0"]),
        "top-k 0": (voice + turn + out + ["--top-k", "0"], ["--top-k", "at least 1"]),
        "unknown dtype": (voice + turn + out + ["--dtype", "int8"], ["--dtype", "int8"]),
        "output folder missing": (voice + turn + ["--output", "{dir}/nowhere/answer.wav"],
                                  ["--output", "nowhere", "does not exist"]),
        "output is a folder": (voice + turn + ["--output", "{dir}"], ["--output", "is a folder"]),
        "output not writable": (voice + turn + ["--output", "{unwritable}/answer.wav"],
                                ["--output", "answer.wav", "cannot write"]),
        "device gpu": (voice + turn + out + ["--device", "gpu"], ["'gpu' is not a device chroma-agent runs on", "cuda:N"]),
        "device cuda": (voice + turn + out + ["--device", "cuda"], [NO_CUDA]),
    }


CASES = [("respond", name, args, expected) for name, (args, expected) in _respond_cases().items()] + [
    ("voice", "empty transcript", ["--audio", "{reference}", "--text", "", "--output", "{dir}/v.safetensors"],
     ["--text is empty"]),
    ("voice", "missing clip", ["--audio", "{dir}/nope.wav", "--text", "hi", "--output", "{dir}/v.safetensors"],
     ["--audio", "does not exist"]),
    ("voice", "silent clip", ["--audio", "{silence}", "--text", "hi", "--output", "{dir}/v.safetensors"],
     ["--audio", "silent"]),
    ("voice", "device cuda", ["--audio", "{reference}", "--text", "hi", "--output", "{dir}/v.safetensors",
                              "--device", "cuda"], [NO_CUDA]),
    ("serve twilio", "max calls 0", ["--voice", "{dir}/v.safetensors", "--max-calls", "0"], ["--max-calls"]),
    ("serve twilio", "port out of range", ["--voice", "{dir}/v.safetensors", "--port", "70000"], ["--port", "65535"]),
    ("serve twilio", "both kinds of voice", ["--voice", "{dir}/v.safetensors", "--voice-audio", "{reference}",
                                             "--voice-text", "hi"], ["not both"]),
    ("serve twilio", "device cuda", ["--voice-audio", "{reference}", "--voice-text", "hi", "--device", "cuda"],
     [NO_CUDA]),
]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX paths")
@pytest.mark.parametrize("command, name, args, expected", CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_bad_input_is_reported_before_loading(files, command, name, args, expected):
    if "device cuda" in name:
        import torch

        if torch.cuda.is_available() or torch.version.cuda is not None:
            pytest.skip("the message checked here is the one of a CPU build of torch")
    args = [a.format(**files) for a in args]
    run = cli(*command.split(), "--model", HUB_ID, *args)
    assert run.returncode == 2, run.stderr
    for words in expected:
        assert words in run.stderr
    assert "Traceback" not in run.stderr
    assert "could not download" not in run.stderr  # found before the model load, not by it
    assert not (files["dir"] / "answer.wav").exists() and not (files["dir"] / "v.safetensors").exists()


def test_good_input_reaches_the_load(files):
    """The control for the cases above: with nothing wrong, the offline hub id is where it stops."""
    run = cli("respond", "--model", HUB_ID, "--voice-audio", str(files["reference"]), "--voice-text", TRANSCRIPT,
              "--input", str(files["question"]), "--output", str(files["dir"] / "answer.wav"), "--device", "cpu")
    assert run.returncode == 2 and "could not download 'FlashLabs/Chroma-4B'" in run.stderr
    assert "Traceback" not in run.stderr and not (files["dir"] / "answer.wav").exists()


def test_serve_twilio_without_the_plugin_says_how_to_install_it(files, tmp_path):
    """A plugin that cannot be imported is reported before the model loads."""
    (tmp_path / "pipecat_chroma.py").write_text("raise ImportError('pipecat is not installed')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    run = cli("serve", "twilio", "--model", HUB_ID, "--voice-audio", str(files["reference"]), "--voice-text",
              TRANSCRIPT, "--device", "cpu", env=env)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "chroma-agent serve twilio needs the Pipecat plugin: pip install -e plugins/pipecat" in run.stderr


def _imports_after(code: str) -> set[str]:
    probe = ("import sys\nfrom chroma_agent.cli import main\ntry:\n    main(ARGS)\nexcept SystemExit:\n    pass\n"
             "print(' '.join(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", probe.replace("ARGS", code)], capture_output=True, text=True,
                         cwd=REPO, timeout=60)
    assert run.returncode == 0, run.stderr
    return set(run.stdout.split())


@pytest.mark.parametrize("argv", [["--help"], ["respond", "--help"], ["serve", "twilio", "--help"],
                                  ["respond", "--output", "a.wav", "--max-frames", "0"], ["serve"], []])
def test_help_and_argument_errors_do_not_import_torch(argv):
    assert not _imports_after(repr(argv)) & {"torch", "transformers"}


def test_import_chroma_agent_is_cheap_and_names_resolve_on_use():
    code = ("import sys, chroma_agent\nassert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
            "assert set(chroma_agent.__all__) <= set(dir(chroma_agent))\n"
            "from chroma_agent import DeviceError, TextDelta, Voice\n"
            "assert chroma_agent.Voice is Voice and issubclass(DeviceError, ValueError)\n"
            "try:\n    chroma_agent.Nope\nexcept AttributeError as e:\n    print(e)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "has no attribute 'Nope'" in run.stdout


def test_ctrl_c_mid_reply_leaves_a_valid_partial_wav(tiny_checkpoint, files, tmp_path):
    out = tmp_path / "answer.wav"
    env = {**os.environ, "CHROMA_AGENT_MATMUL": "linear"}  # no plan timing: the reply starts sooner
    with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w+") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "chroma_agent.cli", "respond", "--model", str(tiny_checkpoint),
                                 "--voice-audio", str(files["reference"]), "--voice-text", TRANSCRIPT,
                                 "--input", str(files["question"]), "--output", str(out), "--device", "cpu",
                                 "--max-frames", "2000", "--seed", "0"], stdout=stdout, stderr=stderr, env=env,
                                cwd=REPO)
        try:
            deadline = time.monotonic() + 240
            while not (out.exists() and out.stat().st_size > 44 + 3 * 1920 * 2):  # a few frames are out
                assert proc.poll() is None, "the reply ended before it could be interrupted"
                assert time.monotonic() < deadline, "no audio within 240 s"
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=60) == 130
        finally:
            proc.kill()
        stderr.seek(0)
        err = stderr.read()
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"interrupted: {out} keeps the ")
    audio, rate = sf.read(out)
    assert rate == 24000 and len(audio) >= 3 * 1920 and len(audio) % 1920 == 0


# -- in-process: the library's side of the same checks --
def test_from_pretrained_checks_the_device_before_the_download():
    import torch

    from chroma_agent import ChromaModel, DeviceError

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    expected = NO_CUDA if torch.version.cuda is None else "no CUDA device was found"
    with pytest.raises(DeviceError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        ChromaModel.from_pretrained(HUB_ID, device="cuda")   # offline: a download would fail otherwise
    with pytest.raises(DeviceError, match="'gpu' is not a device chroma-agent runs on"):
        ChromaModel.from_pretrained(HUB_ID, device="gpu")


def test_device_messages(monkeypatch):
    import torch

    from chroma_agent.model.device import DeviceError, check_device

    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match="'mps' is not a device chroma-agent runs on"):
        check_device(torch.device("mps"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    with pytest.raises(DeviceError, match=r"CUDA is not available on this machine \(no CUDA device was found\)"):
        check_device("cuda")
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(DeviceError, match=r"\(this torch is a CPU build\); use --device cpu$"):
        check_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(DeviceError, match="there is no cuda:2: this machine has 2 CUDA device"):
        check_device("cuda:2")


def test_a_truncated_checkpoint_is_a_checkpoint_error(tiny_checkpoint, tmp_path, speech, capsys):
    from chroma_agent import CheckpointError, ChromaModel
    from chroma_agent.cli import main

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in tiny_checkpoint.iterdir():
        if f.name != "model.safetensors":
            (damaged / f.name).write_bytes(f.read_bytes())
    with open(tiny_checkpoint / "model.safetensors", "rb") as src:   # a download cut off halfway
        (damaged / "model.safetensors").write_bytes(src.read((tiny_checkpoint / "model.safetensors").stat().st_size // 2))
    with pytest.raises(CheckpointError, match=r"model.safetensors is damaged or incomplete .*delete it and download"):
        ChromaModel.from_pretrained(damaged, device="cpu")
    rc = main(["voice", "--model", str(damaged), "--audio", str(speech["reference"]), "--text", TRANSCRIPT,
               "--output", str(tmp_path / "v.safetensors"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{damaged / 'model.safetensors'} is damaged" in err and "Traceback" not in err
    assert not (tmp_path / "v.safetensors").exists()


def test_a_damaged_file_in_the_hub_cache_names_the_folder_to_delete(tmp_path):
    from chroma_agent.model.checkpoint import CheckpointError, open_weights

    file = tmp_path / "models--FlashLabs--Chroma-4B" / "snapshots" / "abc" / "model.safetensors"
    file.parent.mkdir(parents=True)
    file.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(CheckpointError, match="delete its folder .*models--FlashLabs--Chroma-4B from the Hugging"):
        with open_weights(file, "cpu"):
            pass


def test_an_unexpected_failure_is_one_line_and_exit_1(tiny_checkpoint, speech, tmp_path, capsys, monkeypatch):
    from chroma_agent import api
    from chroma_agent.cli import main

    def broken(*args, **kwargs):
        raise RuntimeError("out of cheese")

    monkeypatch.setattr(api.ChromaModel, "from_pretrained", broken)
    argv = ["respond", "--model", str(tiny_checkpoint), "--voice-audio", str(speech["reference"]), "--voice-text",
            TRANSCRIPT, "--input", str(speech["question"]), "--output", str(tmp_path / "a.wav"), "--device", "cpu"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "error: RuntimeError: out of cheese" in err and "CHROMA_AGENT_DEBUG=1" in err and "Traceback" not in err
    monkeypatch.setenv("CHROMA_AGENT_DEBUG", "1")
    with pytest.raises(RuntimeError, match="out of cheese"):
        main(argv)
