"""A LiveKit worker that answers room and phone calls with Chroma, in a cloned voice.

    export LIVEKIT_URL=wss://... LIVEKIT_API_KEY=... LIVEKIT_API_SECRET=...
    export CHROMA_VOICE=me.voice.safetensors          # chroma-agent voice --audio ... --output ...
    python examples/livekit_agent.py download-files    # fetch the checkpoint once (optional)
    python examples/livekit_agent.py start             # or `dev` while developing

Settings (environment): CHROMA_MODEL (hub id or checkpoint directory, default
FlashLabs/Chroma-4B), CHROMA_VOICE, CHROMA_DEVICE / CHROMA_DTYPE (default: CUDA, bfloat16),
CHROMA_INSTRUCTIONS, CHROMA_LANGUAGE (the callers' language for their transcripts in the
session history, default "en"), CHROMA_MAX_SESSIONS (calls one worker takes, default 4),
CHROMA_AGENT_NAME (default "chroma-agent": the name SIP dispatch rules send calls to),
CHROMA_ENGINE=1 (serve the worker's calls from one `ChromaEngine`: their frames are
computed together, many calls per GPU; its capacity is CHROMA_MAX_SESSIONS when set,
else measured at start).

One worker process holds one copy of the model: jobs run as threads of that process
(JobExecutorType.THREAD) and share what `prewarm` loaded (with CHROMA_ENGINE, one engine
per process). The worker reports its load as active calls over capacity (an engine's own
`load`), so LiveKit sends new calls to other GPU hosts once it is full.
"""
from __future__ import annotations

import os
import threading

from livekit.agents import Agent, AgentServer, AgentSession, JobContext, JobExecutorType, JobProcess, cli
from livekit.plugins import chroma

from chroma_agent import ChromaEngine

AGENT_NAME = os.environ.get("CHROMA_AGENT_NAME", "chroma-agent")
INSTRUCTIONS = os.environ.get("CHROMA_INSTRUCTIONS",
                              "You are a friendly phone agent. Answer briefly, in a natural spoken style.")
MAX_SESSIONS = int(os.environ.get("CHROMA_MAX_SESSIONS", "4"))

_shared: dict = {}  # the model (or engine) prewarm made, for load(): jobs are threads of this one process
_engine_lock = threading.Lock()


def prewarm(proc: JobProcess) -> None:
    """Load the model once per process, before the first call (a GPU load takes a while);
    with CHROMA_ENGINE=1, start the process's one engine on it."""
    model = chroma.load_model(os.environ.get("CHROMA_MODEL", chroma.DEFAULT_MODEL),
                              device=os.environ.get("CHROMA_DEVICE"), dtype=os.environ.get("CHROMA_DTYPE"))
    if os.environ.get("CHROMA_ENGINE", "0").lower() in ("1", "true", "yes"):
        # prewarm runs once per job executor (a thread here): the process's one engine is shared
        with _engine_lock:
            if not isinstance(_shared.get("model"), ChromaEngine):
                sessions = os.environ.get("CHROMA_MAX_SESSIONS")
                _shared["model"] = ChromaEngine(model, max_conversations=int(sessions) if sessions else None)
            model = _shared["model"]
    proc.userdata["model"] = _shared["model"] = model


def load(server: AgentServer | None = None) -> float:
    """How full this worker is, 0..1 (LiveKit stops sending calls past load_threshold)."""
    engine_load = getattr(_shared.get("model"), "load", None)  # a ChromaEngine knows its own capacity
    if engine_load is not None:
        return float(engine_load() if callable(engine_load) else engine_load)
    return min(1.0, chroma.active_sessions() / MAX_SESSIONS)


server = AgentServer(
    job_executor_type=JobExecutorType.THREAD,  # every job shares the one loaded model
    setup_fnc=prewarm,
    initialize_process_timeout=600.0,  # a first load may download and place ~9 GB of weights
    load_fnc=load,
    load_threshold=0.95,  # full at MAX_SESSIONS calls
    num_idle_processes=1,
)


@server.rtc_session(agent_name=AGENT_NAME)
async def entrypoint(ctx: JobContext) -> None:
    voice = os.environ.get("CHROMA_VOICE")
    if not voice:
        raise RuntimeError("set CHROMA_VOICE to a voice file (chroma-agent voice --audio clip.wav --text ... "
                           "--output me.voice.safetensors)")
    session = AgentSession(llm=chroma.RealtimeModel(model=ctx.proc.userdata["model"], voice=voice,
                                                    language=os.environ.get("CHROMA_LANGUAGE", "en")))
    await session.start(agent=Agent(instructions=INSTRUCTIONS), room=ctx.room)
    session.say("Hello, thanks for calling! How can I help you today?")


if __name__ == "__main__":
    cli.run_app(server)
