"""A Twilio phone number that answers in a cloned voice: `chroma-agent serve twilio` as code
to customise.

    python examples/twilio_phone_agent.py --model FlashLabs/Chroma-4B --voice me.voice.safetensors \\
        --public-url https://abc123.ngrok.app
    ngrok http 8765                      # then point the number's voice webhook at https://.../twiml

What to change is marked below: the system prompt and greeting, the reply's sampling, the
VAD, an extra route. `PhoneServer` does the rest: Twilio's webhook (`POST /twiml`), one
Pipecat pipeline per call on `/ws` (Twilio serializer -> Silero VAD + Smart Turn ->
ChromaSpeechToSpeechService -> back to the caller), signatures when TWILIO_AUTH_TOKEN is
set, `--max-calls`, `GET /health`, `GET /metrics` (Prometheus) and `GET /calls` (each
call's record, with CHROMA_AGENT_ADMIN_KEY); `run_app` adds the message size limit and the
drain on SIGTERM (README "Running in production").
"""
from __future__ import annotations

import argparse

from chroma_agent import ChromaEngine, ChromaModel, Voice
from pipecat_chroma import ChromaSpeechToSpeechService
from pipecat_chroma.twilio_server import PHONE_VAD, PhoneServer, run_app

SYSTEM_PROMPT = ("You are the receptionist of Rosa's Bakery. Answer in one or two short, friendly sentences. "
                 "We open 7 am to 6 pm, Tuesday to Sunday.")
GREETING = "Hello, Rosa's Bakery, how can I help?"


class BakeryPhone(PhoneServer):
    """The stock phone server with this agent's own service settings."""

    def make_service(self) -> ChromaSpeechToSpeechService:
        # one service per call; the engine (its model) and the voice are loaded once and shared
        return ChromaSpeechToSpeechService(model=self.model, voice=self.voice, settings=ChromaSpeechToSpeechService.Settings(
            system_instruction=SYSTEM_PROMPT,
            max_frames=250,          # replies of at most 20 s (80 ms frames)
            temperature=0.8,         # audio-code sampling; greedy=True for repeatable replies
            min_turn_secs=0.3,       # coughs and clicks shorter than this get no answer
        ))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="FlashLabs/Chroma-4B", help="checkpoint directory or hub id")
    ap.add_argument("--voice", required=True, help="voice file made by `chroma-agent voice`")
    ap.add_argument("--public-url", help="the https URL Twilio reaches this server at (ngrok, your host)")
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--max-calls", type=int, default=None, help="calls at once (default: the engine's capacity)")
    ap.add_argument("--drain-seconds", type=float, default=30, help="on SIGTERM, how long running calls may go on")
    args = ap.parse_args()

    model = ChromaModel.from_pretrained(args.model)   # before the port opens: calls never wait on a load
    # every call's conversation is a slot of one engine, their frames computed together;
    # None measures at start how many calls it keeps in real time
    engine = ChromaEngine(model, max_conversations=args.max_calls)
    server = BakeryPhone(engine, Voice.load(args.voice), public_url=args.public_url, max_calls=args.max_calls,
                         greeting=GREETING,
                         # 0.3 s of silence before Smart Turn is asked: slow talkers are cut off
                         # less, every reply comes 0.1 s later (PHONE_VAD waits 0.2 s)
                         vad_params=PHONE_VAD.model_copy(update={"stop_secs": 0.3}))
    app = server.app()

    @app.get("/")
    async def index() -> dict:
        return {"agent": "Rosa's Bakery", **server.health()}

    try:
        run_app(app, host=args.host, port=args.port, drain_seconds=args.drain_seconds)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
