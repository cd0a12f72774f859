"""The greeting of an outbound call, held until the callee spoke or a short pause passed.

On a call the server placed, the callee speaks first ("Hello?"): `HeldGreeting`, right
before the service in the call's pipeline, swallows that first turn (the service does not
answer the pickup line) and has the greeting spoken when it ends; a callee who says
nothing for `pause_s` after the call connects hears the greeting then. Every later turn
passes untouched.
"""
from __future__ import annotations

import asyncio

from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    StartFrame,
    TTSSpeakFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

OUTBOUND_GREETING_PAUSE_S = 2.0   # a person who picks up says "Hello?" within about a second


class HeldGreeting(FrameProcessor):
    """Speaks `greeting` once: when the callee's first turn ends (that turn is not passed to
    the service), or `pause_s` after the pipeline starts if the callee has not begun to
    speak by then. `greeted` is set once it was queued."""

    def __init__(self, greeting: str, pause_s: float = OUTBOUND_GREETING_PAUSE_S, **kwargs):
        super().__init__(**kwargs)
        self.greeting, self.pause_s = greeting, pause_s
        self.greeted = asyncio.Event()
        self._callee_speaking = False
        self._timer: asyncio.Task | None = None

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame):
            await self.push_frame(frame, direction)
            self._timer = self.create_task(self._after_pause(), "held greeting")
            return
        if isinstance(frame, (EndFrame, CancelFrame)):
            await self._stop_timer()
        elif direction == FrameDirection.DOWNSTREAM and not self.greeted.is_set():
            if isinstance(frame, UserStartedSpeakingFrame):
                self._callee_speaking = True
                return   # the pickup line: answered with the greeting, not by the model
            if isinstance(frame, UserStoppedSpeakingFrame) and self._callee_speaking:
                await self._greet()
                return
        await self.push_frame(frame, direction)

    async def cleanup(self):
        await super().cleanup()
        await self._stop_timer()

    async def _after_pause(self) -> None:
        await asyncio.sleep(self.pause_s)
        if not self._callee_speaking and not self.greeted.is_set():
            await self._greet()

    async def _greet(self) -> None:
        self.greeted.set()
        await self.push_frame(TTSSpeakFrame(self.greeting))

    async def _stop_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and not timer.done() and timer is not asyncio.current_task():
            await self.cancel_task(timer)
