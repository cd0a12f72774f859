"""Call control of the phone server (`PhoneServer` mixes `CallControl` in): what a subclass,
a hook or `outbound.py` does to a running call.

    class MyPhone(PhoneServer):
        async def on_dtmf(self, call, digit):          # each key the caller presses
            if digit == "9":
                await self.say(call, "Goodbye!")         # in the cloned voice; returns once heard
                await self.hangup(call)                  # the call ends, its slot is freed
            else:
                await super().on_dtmf(call, digit)       # --transfer-digit: transfer(call, --transfer-to)

`on_call_started(call)` runs once a call's stream is taken, before its pipeline is built
(`call_started_hooks`: outbound.py marks its calls `call.outbound` there). The carrier's
REST API does the transfer and the hang-up (`Carrier.transfer`, `Carrier.hangup`).
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Awaitable, Callable

from fastapi import WebSocket
from loguru import logger
from pipecat.frames.frames import Frame, InputDTMFFrame, TTSSpeakFrame
from pipecat.processors.frame_processor import FrameDirection
from starlette.websockets import WebSocketState

from chroma_agent.serving.log_safety import printable

from .carrier import NotSupported
from .records import LiveCall

DTMF_DIGITS = "0123456789*#"
MAX_DTMF_PENDING = 4         # per call: keys whose on_dtmf still runs; more are dropped (a flood)
SAY_SETTLED_S = 0.5          # say(): the agent's audio stopped this long is the line's end
SAY_POLL_S = 0.05
END_WAIT_S = 10.0            # transfer()/hangup(): how long they wait for the call to be over


async def close_stream(websocket: WebSocket, code: int) -> None:
    """Close an accepted stream, unless the caller already has."""
    if websocket.client_state == WebSocketState.DISCONNECTED:
        return
    with contextlib.suppress(RuntimeError):  # the caller's close crossed ours
        await websocket.close(code=code)


class CallControl:
    """`on_call_started`, `on_dtmf`, `transfer`, `hangup`, `say` over the server's `carrier`,
    `transfer_to` / `transfer_digit` and `call_started_hooks` (PhoneServer sets them)."""

    carrier: object
    transfer_to: str | None
    transfer_digit: str | None
    record_dir: str | None
    call_started_hooks: list[Callable[[LiveCall], Awaitable[None]]]

    async def on_call_started(self, call: LiveCall) -> None:
        """A call's stream was taken (`call.start`, `call.record` set), before its pipeline
        is built: runs each of `call_started_hooks` (outbound.py marks its calls
        `call.outbound` there). Override to add your own; call super()."""
        for hook in list(self.call_started_hooks):
            await hook(call)

    async def on_dtmf(self, call: LiveCall, digit: str) -> None:
        """A key the caller pressed ("0"-"9", "*", "#"; the pipeline gets its InputDTMFFrame
        too). By default: `transfer_digit` transfers the call to `transfer_to`."""
        if self.transfer_to and digit == self.transfer_digit:
            try:
                await self.transfer(call, self.transfer_to)
            except Exception as e:   # NotSupported, the carrier's API refused: the call goes on
                logger.warning(f"call {self._sid(call)}: transfer failed: {printable(e, 300)}")

    async def transfer(self, call: LiveCall, number: str) -> None:
        """Hand the call to `number` through the carrier's API (NotSupported, or its API's
        error, raised as is); then the agent's audio stops, the pipeline ends and the slot is
        freed, while the carrier keeps the caller on the line with the person."""
        if call.start is None:
            raise RuntimeError("the call has not started")
        await self.carrier.transfer(call.start, number)
        if call.record is not None:
            call.record.transferred_to = True
        if call.serializer is not None:   # ending the pipeline must not hang up the handed-on call
            call.serializer.hang_up_on_end = False
        logger.info(f"call {self._sid(call)} transferred")
        await self._end(call)

    async def hangup(self, call: LiveCall) -> None:
        """End the call: through the carrier's API where it has one (else, or when that
        fails, by closing the stream, which ends the call at most carriers), the pipeline
        ended and the slot freed; returns once the call is over (at most a few seconds)."""
        if call.start is not None:
            try:
                await self.carrier.hangup(call.start)
                if call.serializer is not None:   # hung up already: not again at the pipeline's end
                    call.serializer.hang_up_on_end = False
            except NotSupported:
                pass
            except Exception as e:
                logger.warning(f"call {self._sid(call)}: hanging up through the API failed "
                               f"({printable(e, 300)}); closing the stream")
        await self._end(call)

    async def say(self, call: LiveCall, text: str, *, interruptible: bool = True,
                    timeout: float | None = None) -> bool:
        """Speak `text` in the cloned voice on `call` (a scripted line, after what is playing);
        returns True once it has been played to the caller (the agent's audio started after it
        was queued, then stopped for SAY_SETTLED_S: with a reply playing when it was queued and
        the two back to back, the end of both), False if the call ended first or `timeout`
        passed (an interruptible line is dropped when the caller is speaking as it comes up).
        `interruptible=False`: the caller cannot talk over it."""
        if call.worker is None or call.ended.is_set():
            return False
        frame = TTSSpeakFrame(text)
        frame.interruptible = interruptible
        queued, playing = time.monotonic(), call.bot_speaking
        await call.worker.queue_frame(frame)
        try:
            async with asyncio.timeout(timeout):
                while not call.ended.is_set():
                    stops = [t for k, t in call.speech if k == "stopped" and t >= queued]
                    started = playing or any(k == "started" and t >= queued for k, t in call.speech)
                    if started and stops and not call.bot_speaking and time.monotonic() - stops[-1] >= SAY_SETTLED_S:
                        return True
                    await asyncio.sleep(SAY_POLL_S)
        except TimeoutError:
            pass
        return False

    async def _end(self, call: LiveCall) -> None:
        """End the call's pipeline (or its stream, before one runs) and wait until it is over."""
        if call.end is not None:
            call.end()
        else:
            await close_stream(call.websocket, 1000)
        if call.task is not asyncio.current_task():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(END_WAIT_S):
                    await call.ended.wait()

    def _dtmf_watcher(self, call: LiveCall) -> Callable[[Frame, FrameDirection], None]:
        """A frame watcher that runs `on_dtmf` for each key the caller pressed (in a task: a
        watcher must not block; at most MAX_DTMF_PENDING at once per call)."""
        pending: set[asyncio.Task] = set()

        def watch(frame: Frame, direction: FrameDirection) -> None:
            if not isinstance(frame, InputDTMFFrame) or direction != FrameDirection.DOWNSTREAM:
                return
            if len(pending) >= MAX_DTMF_PENDING:
                logger.warning(f"call {self._sid(call)}: DTMF keys faster than they are handled: one dropped")
                return
            task = asyncio.get_running_loop().create_task(self._run_dtmf(call, str(frame.button.value)))
            pending.add(task)
            task.add_done_callback(pending.discard)
        return watch

    async def _run_dtmf(self, call: LiveCall, digit: str) -> None:
        try:
            await self.on_dtmf(call, digit)
        except Exception:   # a hook's fault stays in that key press
            logger.exception(f"call {self._sid(call)}: on_dtmf failed")

    def make_recording(self, call: LiveCall):
        """The call's `recording.CallRecording` in `record_dir` (fed by the serializer's audio taps)."""
        from .recording import CallRecording   # only where recordings are on

        return CallRecording(self.record_dir, call.record.call_sid)   # started: now, on its monotonic clock

    async def _close_recording(self, call: LiveCall) -> None:
        try:
            await call.recording.close(call.record.as_dict() if call.record is not None else {})
        except Exception:   # a recording's failure never hides the call's end
            logger.exception(f"call {self._sid(call)}: the recording could not be finished")

    @staticmethod
    def _sid(call: LiveCall) -> str:
        return call.record.label if call.record is not None else "?"
