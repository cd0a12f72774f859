"""What a Realtime `response.create` asks beyond the session: an out-of-band reply's own
`input` (`conversation: "none"`), measured against the token budgets, and the input audio
tokens a reply's usage reports.

An out-of-band reply runs on a short-lived engine conversation of its own (the session's
voice and instructions), closed when it ends: the session's conversation, its KV cache and
its items never see it, and the pending user input stays pending for the next in-band
reply. (Truncating it out of the session's conversation afterwards could not remove the
turn it was asked, and would cost that conversation a prefill.) It needs a free engine slot
while it runs: at capacity it fails with a `server_error`.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .realtime_limits import Limits, tokens_within
from .realtime_protocol import ProtocolError, parse_item

AUDIO_SECONDS_HEARD = 30     # the model's audio encoder hears at most this much of a turn


async def out_of_band_input(value: Any, pending: list[tuple[str, list[np.ndarray], str]], tokenizer,
                            limits: Limits, input_format: dict, event_id: str | None = None
                            ) -> tuple[list[np.ndarray], str, int] | None:
    """`response.input` of an out-of-band reply as (audio, text, text tokens); None when not
    given (the reply hears the pending input, which stays pending). Message items give their
    text; `item_reference`s name pending user input."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise ProtocolError("response.input must be a list of items", code="invalid_type", param="response.input",
                            event_id=event_id)
    waiting = {item_id: (chunks, text) for item_id, chunks, text in pending}
    audio, texts, tokens = [], [], 0
    for i, entry in enumerate(value):
        if isinstance(entry, dict) and entry.get("type") == "item_reference":
            chunks, text = waiting.get(entry.get("id"), ([], ""))
            audio += chunks
        else:
            try:
                _, given = parse_item(entry, input_format)
            except ProtocolError as e:
                raise ProtocolError(e.message, code=e.code, param=f"response.input[{i}]", event_id=event_id) from None
            text = given.text if given is not None else ""
        tokens += await tokens_within(tokenizer, text, limits.max_text_item_tokens, f"response.input[{i}]",
                                      f"response.input[{i}]", event_id)
        texts.append(text)
    return audio, "\n".join(t for t in texts if t), tokens


def input_audio_tokens(audio: list[np.ndarray], rate: int = 16000) -> int:
    """The audio tokens a turn of these 16 kHz pieces takes in the prompt (one clip: the
    encoder's length for its mel frames, 10 ms each)."""
    samples = min(sum(a.size for a in audio), AUDIO_SECONDS_HEARD * rate)
    if samples < rate // 10:
        return 0
    from ..model.processor import audio_token_count

    return audio_token_count(samples * 100 // rate)
