"""The interleaved scheduler: one backbone step per 80 ms frame, the reasoner advanced
on every other step, and the per-frame decoder pass that fills in codebooks 1..7.

`ReplyFrames` yields each frame's codes (and the reasoner tokens fed at that step) the
moment they exist, so the streaming runtime can sit on it; `ChromaModel.generate` is the
one-shot convenience built on the same iterator.

Layering: this module sits on the weights (model.py) and is imported by the streaming
runtime (conversation.py); it imports nothing above it, not even for type hints.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from ..model.weights import ChromaWeights, VoicePrefix
from ..model.processor import ReasonerInput
from ..model.sampling import CodeSampler, SamplingOptions
from ..model.transformer import KVCache, LayerStep, attention_block, mlp_block, rms_norm, rope_tables, run_layers
from ..model.voice import Voice
from .frame_step import FrameStep

__all__ = ["CodeSampler", "Frame", "FramePlan", "FrameStep", "Reasoner", "ReasonerPlan", "ReplyFrames", "RowPlan",
           "SamplingOptions", "VoicePrefix", "apply_reasoners"]


class Reasoner:
    """Greedy decoding of the Qwen2.5-Omni thinker over a KV cache owned by this object.

    transformers' thinker modules do the input side (token embeddings, the Whisper-style
    audio tower, placeholder merge, TM-RoPE positions and tables); its decoder layers run
    through the same lean step as the backbone (`run_layers`) over a growable static
    cache, so a decode step builds no masks or cache objects and rewinding is free.

    `prefill` and `step` return (h, t): the next token `t` and the final-norm hidden
    state `h` [1, hidden] at the position that predicted it. While `forced` holds ids,
    they are returned instead of the argmax (teacher forcing, for scripted lines).
    The cache carries across turns: a conversation keeps one Reasoner.
    """

    def __init__(self, model: ChromaWeights, capacity: int = 1024):
        self.thinker = model.thinker
        self.lm = model.thinker.model.language_model
        self.head = model.reasoner_head
        self.cache = KVCache(self.lm.config, capacity, device=model.device, dtype=model.dtype)
        self.next_position = 0  # RoPE position of the next token (the same on all three mRoPE axes)
        self.forced: list[int] = []

    @property
    def length(self) -> int:
        """Tokens in the cache."""
        return self.cache.length

    def _run(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Append `embeds` [1, n, hidden] at 3-D `positions` [3, 1, n]; final-norm hidden states."""
        self.cache.reserve(self.cache.length + embeds.shape[1])
        hidden = run_layers(self.lm.layers, embeds, self.cache, rope_tables(*self.lm.rotary_emb(embeds, positions)))
        self.next_position = int(positions.max()) + 1
        return rms_norm(self.lm.norm, hidden)

    def _predict(self, hidden: torch.Tensor) -> tuple[torch.Tensor, int]:
        h = hidden[:, -1]
        if self.forced:
            return h, self.forced.pop(0)
        return h, int(self.head(h).argmax(dim=-1))

    def prefill(self, inputs: ReasonerInput) -> tuple[torch.Tensor, int]:
        return _finish(self.prefill_in_chunks(inputs))

    def prefill_in_chunks(self, inputs: ReasonerInput, chunk: int | None = None) -> Iterator[None]:
        """`prefill` as a generator that pauses after every `chunk` tokens (None: one pass)
        and returns (h, t): a scheduler can run a long prompt a piece per frame. The audio
        tower runs whole, before the first piece."""
        embeds, positions = self.prompt_embeddings(inputs)
        n = embeds.shape[1]
        chunk = chunk or n
        for start in range(0, n, chunk):
            if start:
                yield
            hidden = self._run(embeds[:, start: start + chunk], positions[..., start: start + chunk])
        self.next_position = int(positions.max()) + 1
        return self._predict(hidden)

    def prompt_embeddings(self, inputs: ReasonerInput) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings [1, n, hidden] of a prompt (audio merged in) and its 3-D positions [3, 1, n]."""
        model = self.thinker.model
        device = self.thinker.lm_head.weight.device
        ids = inputs.input_ids.to(device)
        embeds = self.lm.embed_tokens(ids)
        audio_lengths = None
        if inputs.input_features is not None:
            mask = inputs.feature_attention_mask.to(device)
            audio_lengths = mask.sum(-1)
            if inputs.audio_embeds is None:  # kept on the input: a transcript of this audio reuses it
                inputs.audio_embeds = model.get_audio_features(inputs.input_features.to(device, embeds.dtype), mask,
                                                               return_dict=True).last_hidden_state
            features = inputs.audio_embeds
            placeholders = ids == model.config.audio_token_id
            if int(placeholders.sum()) != features.shape[0]:
                raise ValueError(f"the prompt has {int(placeholders.sum())} audio placeholders but the audio "
                                 f"encodes to {features.shape[0]}: expand them with the processor")
            embeds = embeds.masked_scatter(placeholders[..., None], features.to(embeds.dtype))
        positions, _ = model.get_rope_index(ids, None, None, torch.ones_like(ids), False, audio_lengths)
        return embeds, positions + self.next_position

    def step(self, token: int) -> tuple[torch.Tensor, int]:
        """Feed `token`, predict the next: (h, t)."""
        return _finish(self.step_in_halves(token))

    def step_in_halves(self, token: int) -> Iterator[None]:
        """`step(token)` as a generator that pauses once, half-way through its weights, and
        returns (h, t): a caller can spread one reasoner step over two audio frames."""
        x, positions = self._embed([token])
        self.cache.reserve(self.cache.length + 1)
        rope = rope_tables(*self.lm.rotary_emb(x, positions))
        for k, layer in enumerate(self.lm.layers):
            if (k, "attention") == self.halfway:
                yield
            step = LayerStep.of(layer)
            x = attention_block(step, k, x, self.cache, rope, None, False)
            if (k, "mlp") == self.halfway:
                yield
            x = mlp_block(step, x)
        if self.halfway is None:
            yield
        self.cache.length += 1
        self.next_position += 1
        return self._predict(rms_norm(self.lm.norm, x))

    @functools.cached_property
    def halfway(self) -> tuple[int, str] | None:
        """The block before which a step has read about half of its weights (None: before the head)."""
        sizes = lambda *mods: sum(p.numel() for m in mods for p in m.parameters())  # noqa: E731
        blocks = []
        for k, layer in enumerate(self.lm.layers):
            blocks += [((k, "attention"), sizes(layer.self_attn)), ((k, "mlp"), sizes(layer.mlp))]
        total = sum(n for _, n in blocks) + sizes(self.thinker.lm_head)
        done = 0
        for name, n in blocks:
            if done + n / 2 >= total / 2:
                return name
            done += n
        return None

    def halves(self) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
        """A step's blocks ((layer, "attention" | "mlp"), in order) before and after `halfway`."""
        blocks = [(k, kind) for k in range(len(self.lm.layers)) for kind in ("attention", "mlp")]
        split = blocks.index(self.halfway) if self.halfway is not None else len(blocks)
        return blocks[:split], blocks[split:]

    def open_rows(self, n: int) -> KVCache:
        """Room for `n` more positions, for rows run from outside (a batched prefill): the
        cache their keys go to (at `length`); `close_rows` moves past them."""
        self.cache.reserve(self.cache.length + n)
        return self.cache

    def close_rows(self, n: int, next_position: int) -> None:
        self.cache.length += n
        self.next_position = next_position

    def open_step(self) -> tuple[KVCache, int]:
        """Room for one more token, for a step run from outside (batched): the cache its
        keys go to (at `length`) and its position."""
        self.cache.reserve(self.cache.length + 1)
        return self.cache, self.next_position

    def close_step(self, argmax: int) -> int:
        """An outside step's token is in the cache: move past it. The next token: the
        teacher-forced one if any, else the step's `argmax`."""
        self.cache.length += 1
        self.next_position += 1
        return self.forced.pop(0) if self.forced else argmax

    def mark(self) -> tuple[int, int]:
        """Where the cache stands (length, next position), for `restore`."""
        return self.cache.length, self.next_position

    def restore(self, mark: tuple[int, int]) -> None:
        """Forget everything fed since `mark`."""
        self.rewind(mark[0])
        self.next_position = mark[1]

    def feed(self, ids: list[int]) -> None:
        """Append tokens without predicting (closing a turn)."""
        if ids:
            self._feed(ids)

    def _feed(self, ids: list[int]) -> torch.Tensor:
        return self._run(*self._embed(ids))

    def _embed(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings [1, n, hidden] of `ids` and their 3-D positions [3, 1, n] after the cache."""
        device = self.thinker.lm_head.weight.device
        positions = torch.arange(self.next_position, self.next_position + len(ids), device=device)
        return self.lm.embed_tokens(torch.tensor([ids], device=device)), positions.view(1, 1, -1).expand(3, 1, -1)

    def rewind(self, length: int) -> None:
        """Forget everything after the first `length` cached tokens."""
        drop = self.length - length
        if drop < 0:
            raise ValueError(f"cannot rewind to {length}: only {self.length} tokens are cached")
        self.cache.length = length
        self.next_position -= drop


@dataclass
class Frame:
    """One 80 ms frame of a reply: its codes and the reasoner tokens fed at its step."""

    index: int
    codes: torch.Tensor                   # [num_codebooks] long, on the model's device
    text_ids: list[int] = field(default_factory=list)
    pcm: "np.ndarray | None" = None        # its audio, when the producer decoded it already (the engine)


@dataclass
class RowPlan:
    """What a reply needs of a `FrameStep` row before its first frame (`FrameStep.acquire`)."""

    prefix: VoicePrefix | None  # the backbone KV it starts from (None: its step 0 computes the voice prefix)
    positions: int              # backbone positions it needs in all


@dataclass
class FramePlan:
    """What a reply's next frame needs: the inputs its row of a `FrameStep` appends, and the
    sampler that picks its codes (this frame's noise drawn). The runner hands the codes
    back to `ReplyFrames.apply`."""

    inputs: torch.Tensor    # [1, n, hidden]
    sampler: CodeSampler


@dataclass
class ReasonerPlan:
    """A reasoner half-step that is due after a frame: "first" feeds `token` and runs the
    blocks before the half-way point; "second" the rest and the head, whose (h, t) the
    runner hands back to `ReplyFrames.apply_reasoner`."""

    half: str
    reasoner: Reasoner
    token: int | None = None


class ReplyFrames:
    """Iterator over the frames of one reply, in the original's exact schedule:

        step 0:  voice prefix + [h_1, T(t_1)]
        step 1:  [A(frame 0)]
        step 2:  [A(frame 1), h_2, T(t_2)]      (a reasoner pair on every even step,
        ...                                       until the pair that carries im_end)

    Stops on an end-of-speech frame (codes 0..6 all `codebook_eos_token_id`, not yielded)
    or after `max_frames`; `stop_reason` then says which. The voice prefix's backbone KV
    comes from `prefix` when given (computed once per voice) instead of being recomputed;
    `reasoner` carries a conversation's history; `head` (token lists or prompts) goes into
    it before `prompt`; `forced_ids` teacher-force its tokens; `frame_step` (a
    `FrameStep`, built once by the caller) runs the backbone step and decoder pass (None:
    a ragged one of this reply's own).

    Iterating runs the whole schedule; a scheduler of many replies (the engine) instead
    runs `prefill`, then per frame `plan` -> its `FrameStep` -> `apply`, and after each
    frame `reasoner_plan` -> its batched reasoner halves -> `apply_reasoner`.
    """

    def __init__(self, model: ChromaWeights, voice: Voice, prompt: ReasonerInput,
                 max_frames: int, sampling: SamplingOptions, reasoner: Reasoner | None = None,
                 prefix: VoicePrefix | None = None, forced_ids: list[int] | None = None,
                 frame_step: FrameStep | None = None, head: list | None = None):
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        self.model = model
        self.voice = voice
        self.prompt = prompt
        self.head = list(head or [])
        self.max_frames = max_frames
        self.sampler = CodeSampler(sampling, model.config.codec_vocab, model.device, model.config.num_codebooks)
        self.reasoner = reasoner or Reasoner(model)
        self.start = self.reasoner.mark()  # a reply cut short in its prefill rewinds the reasoner to it
        self.prefix = prefix
        self.forced_ids = list(forced_ids) if forced_ids is not None else None
        self.frame_step = frame_step
        if frame_step is not None and frame_step.fixed and prefix is None:  # its steps are 1-3 positions
            self.prefix = model.prefix_state(voice)
        self.stop_reason: str | None = None
        self.text_ids: list[int] = []
        self.prompt_end: int | None = None  # set once the prompt is in the reasoner cache
        self.reasoner_done = False
        # the schedule's explicit state (moshi style), advanced by `__iter__` or by the engine
        self.index = 0                         # frames emitted
        self.pending: list[torch.Tensor] = []  # the next backbone step's inputs, [1, n_i, hidden] each
        self.fed: list[int] = []               # reasoner tokens among them
        self.token: int | None = None          # the reasoner's latest token: the next step feeds it
        self.reasoning = False                 # a reasoner step is in flight (spread over two frames)

    def __iter__(self) -> Iterator[Frame]:
        _finish(self.prefill())
        frames = self.frame_step or FrameStep(self.model, fixed=False)
        needs = self.row_plan()
        row = frames.acquire(needs.prefix, needs.positions)
        # The reasoner is independent of the audio: the pair for even step s is computed
        # over frames s-2 and s-1, half of the reasoner's weights after each, so that no
        # frame carries a whole reasoner step.
        reasoner_step = None
        try:
            while self.stop_reason is None:
                plan = self.plan()
                frame = self.apply(frames.step([row], [plan.inputs], [plan.sampler]))
                if frame is None:
                    return
                yield frame
                due = self.reasoner_plan()
                if due is not None and due.half == "first":
                    reasoner_step = self.reasoner.step_in_halves(due.token)
                    next(reasoner_step)  # first half, after an even frame
                elif due is not None:
                    self.apply_reasoner(*_finish(reasoner_step))  # second half, after the odd frame
                    reasoner_step = None
        finally:
            if reasoner_step is not None:
                reasoner_step.close()  # an unfinished step leaves the cache as it was
            frames.release(row)
            self.end("cancelled")

    # -- one step at a time: `__iter__` above runs these for one reply, the engine for many --
    def prefill(self, chunk: int | Callable[[], int] | None = None) -> Iterator[None]:
        """Put the head pieces and the prompt in the reasoner (pausing every `chunk`
        tokens: a number, or asked before each piece) and queue step 0's inputs: [h_1,
        T(t_1)], after the voice prefix when its KV is not given."""
        size = chunk if callable(chunk) else (lambda: chunk)
        for piece in self.head:
            if isinstance(piece, ReasonerInput):
                yield from self.reasoner.prefill_in_chunks(piece, size())  # its prediction is not needed
                yield
                continue
            while piece:
                n = size()
                self.reasoner.feed(piece[:n])
                piece = piece[n:]
                yield
        if self.forced_ids is not None:
            self.reasoner.forced = self.forced_ids + [self.model.config.im_end_token_id]
        if chunk is None:
            h, t = self.reasoner.prefill(self.prompt)
        else:
            h, t = yield from self.reasoner.prefill_in_chunks(self.prompt, size())
        self.prompt_end = self.reasoner.length  # where this reply's tokens start in the reasoner cache
        self.apply_reasoner(h, t)
        if self.prefix is None:  # the voice prefix is computed in step 0
            self.pending.insert(0, self.model.voice_prefix(self.voice))

    @property
    def context_tokens(self) -> int:
        """Tokens in the reasoner cache (its prefill's progress)."""
        return self.reasoner.length

    def row_plan(self) -> RowPlan:
        """What its `FrameStep` row needs, once the prefill is done."""
        prefix_length = self.prefix.length if self.prefix is not None else self.pending[0].shape[1]
        return RowPlan(self.prefix, prefix_length + 2 + self.max_frames + (self.max_frames + 1) // 2 * 2)

    def plan(self) -> FramePlan:
        """The next frame's step: its inputs (their reasoner tokens now count as fed) and its
        sampler, this frame's noise drawn."""
        inputs = self.next_input()
        self.sampler.new_frame()
        return FramePlan(inputs, self.sampler)

    def next_input(self) -> torch.Tensor:
        """The next backbone step's inputs [1, n, hidden]; its reasoner tokens count as fed."""
        if self.fed:
            self.text_ids += self.fed
        pending = self.pending
        return pending[0] if len(pending) == 1 else torch.cat(pending, dim=1)

    def apply(self, codes: torch.Tensor, embedding: torch.Tensor | None = None) -> Frame | None:
        """Take the step's codes [1, codebooks]: the frame to emit, or None at end of speech
        (not a frame). Queues the frame's embedding (`embedding` [1, dim] when the caller
        computed it already) as the next step's input."""
        cfg = self.model.config
        eos = bool((codes[0, : cfg.num_codebooks - 1] == cfg.eos_token_id).all())
        if embedding is None and not eos:
            embedding = self.model.embed_frame(codes)
        return self.apply_row(codes[0], None if eos else embedding[:, None], eos)

    def apply_row(self, codes: torch.Tensor, embedding: torch.Tensor | None, eos: bool) -> Frame | None:
        """`apply` with its parts computed by the caller for many replies at once: the frame's
        codes [codebooks], their embedding [1, 1, dim] (the next step's input; neither is
        used when `eos`) and whether they end the speech (codes 0..6 all `codebook_eos_token_id`)."""
        if eos:
            self.end("eos")
            return None
        frame = Frame(self.index, codes, self.fed)
        self.pending, self.fed = [embedding], []
        self.index += 1
        if self.index == self.max_frames:
            self.end("max_frames")
        return frame

    def reasoner_plan(self) -> ReasonerPlan | None:
        """After a frame: the reasoner half-step due, if any: the "first" half of a step
        after an even frame (while its pair can still be fed), the "second" after the odd one."""
        emitted = self.index - 1
        if emitted % 2 == 0 and not self.reasoner_done and emitted + 2 < self.max_frames:
            self.reasoning = True
            return ReasonerPlan("first", self.reasoner, self.token)
        return self._second_half if self.reasoning else None

    @functools.cached_property
    def _second_half(self) -> ReasonerPlan:
        return ReasonerPlan("second", self.reasoner)  # the same every time: made once

    def apply_reasoner(self, h: torch.Tensor, t: int, inputs: torch.Tensor | None = None) -> None:
        """A finished reasoner step's (h [1, hidden], t): queued for the next backbone step
        as [h, T(t)] (`inputs` [1, 2, hidden] when the caller computed it already, for many
        replies at once)."""
        if inputs is None:
            inputs = torch.cat([h[:, None], self.model.embed_text([t])], dim=1)
        self._took(t, self.pending + [inputs])

    def _took(self, t: int, pending: list[torch.Tensor]) -> None:
        """A reasoner step's token `t` taken, `pending` the next step's inputs."""
        self.pending = pending
        self.fed, self.token, self.reasoning = [t], t, False
        self.reasoner_done = t == self.model.config.im_end_token_id

    def end(self, reason: str) -> None:
        """Stop (first reason wins) and stop teacher-forcing the reasoner; a reply ended
        in its prefill takes its tokens back out of the reasoner."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self.reasoner.forced = []
        if self.prompt_end is None:
            self.reasoner.restore(self.start)


def apply_reasoners(replies: list[ReplyFrames], h: torch.Tensor, tokens: list[int], embedded: torch.Tensor,
                    staged: list[torch.Tensor] | None = None) -> None:
    """`apply_reasoner` of many replies at once, their batched reasoner step having given reply
    i `h[i]` [hidden], its token `tokens[i]` and that token's embedding `embedded[i]`.
    `staged[i]`: reply i's whole next backbone input [1, 3, hidden], its pending frame
    embedding, h and T(t) put side by side by the caller (`FrameStep.stage`), taken as it is
    when its pending input is that embedding where it lies (so no reply joins its pieces)."""
    for i, (reply, t) in enumerate(zip(replies, tokens)):
        pending = reply.pending
        if staged is not None and len(pending) == 1 and pending[0].data_ptr() == staged[i].data_ptr() \
                and pending[0].shape[1] == 1:
            pending[0] = staged[i]  # the reply's own list (nothing else holds it): no new one
            reply._took(t, pending)
        else:
            reply.apply_reasoner(h[i: i + 1], t, torch.stack([h[i], embedded[i]])[None])


def _finish(step: Iterator[None]):
    """Run a paused generator to its end and return its return value."""
    try:
        while True:
            next(step)
    except StopIteration as done:
        return done.value

