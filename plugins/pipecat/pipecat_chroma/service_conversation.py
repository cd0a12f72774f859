"""The conversation side of `ChromaSpeechToSpeechService` (a mixin of it): each reply's
sampling options and system prompt from the service's settings and the pipeline's context,
and the conversation they run on, made in a worker thread on the service's `VoiceSession`
(anew when the prompt changes), its failures reported as Pipecat errors.

The service holds `_settings`, `_context_system`, `_voice_session` and `_ended`; this
module only reads them."""
from __future__ import annotations

from pipecat.utils.errors import ErrorCategory


class ServiceConversation:
    """The service's conversation and what each reply is asked with (see the module)."""

    def _sampling(self) -> dict:
        s = self._settings
        kwargs = {"max_frames": s.max_frames, "greedy": s.greedy, "seed": s.seed}
        if s.temperature is not None:
            kwargs["temperature"] = s.temperature
        if s.top_k is not None:
            kwargs["top_k"] = s.top_k
        return kwargs

    def _system_prompt(self) -> str | None:
        parts = [self._settings.system_instruction, *self._context_system]
        return "\n\n".join(dict.fromkeys(p.strip() for p in parts if p and p.strip())) or None

    async def _prepare_conversation(self):
        try:
            await self._current_conversation()
        except Exception as e:
            if not self._ended:  # (a pipeline that ended at once needs none)
                await self._conversation_failed(e)

    async def _conversation_failed(self, e: Exception):
        """No conversation (e.g. out of GPU memory, or a full engine): this service cannot
        speak in this pipeline, so the error is a permanent one. The worker's
        `ProcessorUnusablePolicy` decides what follows; the servers use CANCEL, which ends
        (refuses) that one call and frees its slot, while the other calls go on."""
        await self.push_error(f"could not start a conversation: {e}", exception=e, force_treat_as_permanent=True)

    async def _current_conversation(self):
        """The conversation for the next reply, made in a worker thread. The conversation API
        takes the system prompt at creation only, so a changed prompt starts a fresh
        conversation (its history is dropped); with no prompt set the model's default applies."""
        session = self._voice_session
        session.system_prompt = self._system_prompt()
        conversation = await session.conversation()
        if (refused := session.take_refusal()) is not None:
            await self.push_error(f"the system prompt was refused, the previous one stays (the conversation "
                                  f"starts anew): {refused}", exception=refused, category=ErrorCategory.APPLICATION)
        return conversation

