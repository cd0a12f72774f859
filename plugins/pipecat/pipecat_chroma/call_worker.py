"""The `PipelineWorker` of one call on the servers (phone and browser), traced.

Each call's pipeline takes 16 kHz audio in and gives the model's rate out, reports metrics,
and is cancelled when a processor cannot work (`ProcessorUnusablePolicy.CANCEL`: a service
without a conversation, e.g. out of GPU memory, refuses that one call at once instead of
leaving a connected and mute line; the other calls go on). When a tracer provider records
(`chroma_agent.serving.tracing.configure_tracing`, from the OTEL_ variables), Pipecat's
tracing is on: the call is one trace, Pipecat's `conversation` span > its `turn` spans >
the service's `chroma.turn` spans (`reply_trace.py`). The conversation's id is the server's
own id of the call (or a fresh one), never a carrier's call id; its attributes say the kind
of call (and the carrier).
"""
from __future__ import annotations

import uuid
from typing import Any

from pipecat.pipeline.base_pipeline import BasePipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker, ProcessorUnusablePolicy

from chroma_agent.serving.tracing import tracing_on

__all__ = ["call_tracing", "call_worker"]


def call_tracing(kind: str, call_id: str | None = None, **attributes: Any) -> dict[str, Any]:
    """PipelineWorker's tracing arguments for one call of `kind` ("phone", "web"): the
    conversation's id `call_id` (the server's own; None: a fresh uuid4), `chroma.call.kind`
    and `chroma.<name>` for each of `attributes` (None left out) on Pipecat's conversation
    span; tracing off when nothing records."""
    if not tracing_on():
        return {"enable_tracing": False}
    span_attributes = {"chroma.call.kind": kind, **{f"chroma.{k}": v for k, v in attributes.items() if v is not None}}
    return {"enable_tracing": True, "conversation_id": call_id or uuid.uuid4().hex,
            "additional_span_attributes": span_attributes}


def call_worker(pipeline: BasePipeline, *, kind: str, out_rate: int, usage_metrics: bool = False,
                call_id: str | None = None, span_attributes: dict[str, Any] | None = None,
                **options: Any) -> PipelineWorker:
    """One call's worker over `pipeline` (see the module): audio out at `out_rate`,
    `usage_metrics` (token usage) beside the other metrics, traced as the call `call_id` of
    `kind` with `span_attributes` (`call_tracing`); `options`: PipelineWorker's (e.g. `enable_rtvi`)."""
    return PipelineWorker(
        pipeline, processor_unusable_policy=ProcessorUnusablePolicy.CANCEL,
        params=PipelineParams(audio_in_sample_rate=16000, audio_out_sample_rate=out_rate, enable_metrics=True,
                              enable_usage_metrics=usage_metrics),
        **call_tracing(kind, call_id, **(span_attributes or {})), **options)
