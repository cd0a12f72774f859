"""Exact streaming (frame-by-frame) decoding for transformers' Mimi codec.

`MimiModel.decode` keeps no convolution state between calls, so decoding one frame at a
time with it clicks at every frame boundary. `StreamingMimiDecoder` keeps that state per
stream in plain tensors (conv contexts, transposed-conv overlap tails, a sliding-window KV
ring for the decoder transformer), in the style of kyutai's moshi, and calls the shared
codec's modules (never modified); its chunks concatenate to `MimiModel.decode` of the whole
sequence, to float32 rounding:

    decoder = StreamingMimiDecoder(model.codec_model, num_codebooks=8)  # one per stream
    audio = decoder.decode_frame(codes)   # codes [batch, 8] long -> [batch, 1920] float32

`decode_frames` decodes the next frame of several one-row streams in one pass (the engine).
Weight layouts derived for speed are cached per codec: call `forget_derived` after editing,
moving or casting its weights.
"""
from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.mimi.modeling_mimi import MimiConv1d, MimiConvTranspose1d, MimiResnetBlock

from .matmul import batch_invariant_active, linear_in_mode, rows_matmul
from .transformer import apply_rope, attend_few, rope_tables

__all__ = ["StreamingMimiDecoder", "decode_frames"]

_EMPTY_SLOT = -(2**62)  # position of a never-written KV slot: outside every window
_ROPE_BLOCK = 256  # frames of RoPE tables computed at once


class _Conv:
    """Causal stride-1 `MimiConv1d`. State: the last `context` input samples."""

    def __init__(self, module: MimiConv1d, new_slot):
        conv = module.conv
        if not module.causal or conv.stride[0] != 1 or conv.padding[0] != 0:
            raise NotImplementedError("streaming supports causal, stride-1, unpadded MimiConv1d only")
        self.conv = conv  # nn.Conv1d with padding 0: we supply the left padding ourselves
        self.context = (conv.kernel_size[0] - 1) * conv.dilation[0]
        # The full decode pads with zeros ("constant"); other modes pad with data we do not have yet.
        if self.context and module.pad_mode != "constant":
            raise NotImplementedError(f"streaming needs pad_mode='constant', got {module.pad_mode!r}")
        self.slot = new_slot(self.init_state) if self.context else None  # kernel 1: stateless

    def init_state(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        # Zeros: exactly the full decode's left padding before the first sample.
        return like.new_zeros(batch, self.conv.in_channels, self.context)

    def __call__(self, x: torch.Tensor, states: list) -> torch.Tensor:
        conv = self.conv
        if self.slot is not None:
            x = torch.cat([states[self.slot], x], dim=-1)
            states[self.slot] = x[..., -self.context:]  # left context for the next chunk
        if batch_invariant_active():
            return _conv_rows(x, conv)
        return F.conv1d(x, conv.weight, conv.bias, 1, 0, conv.dilation)


def _conv_rows(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """`F.conv1d` (no padding) as im2col + one `baddbmm` per row: each row's samples then do
    not depend on the other rows of the batch (oneDNN's conv blocks the batch, which
    changes a row's last bits with the row count). The batch-invariant mode's conv."""
    batch, channels, _ = x.shape
    k, d = conv.kernel_size[0], conv.dilation[0]
    if conv.groups != 1:  # not in Mimi's decoder: row by row, invariant by construction
        return torch.cat([F.conv1d(row, conv.weight, conv.bias, 1, 0, conv.dilation) for row in x.split(1)])
    cols = x.unfold(2, (k - 1) * d + 1, 1)[..., ::d]                      # [B, in, T, k]
    cols = cols.transpose(1, 2).reshape(batch, cols.shape[2], channels * k)  # [B, T, in * k]
    weight = _derived(conv, "columns", lambda: conv.weight.detach().reshape(conv.out_channels, -1).T)
    y = rows_matmul(cols, weight, conv.bias)
    return y.transpose(1, 2)                                               # [B, out, T]


class _ConvTranspose:
    """Causal `MimiConvTranspose1d` with all `kernel - stride` padding trimmed on the right.
    State: the overlap tail (without bias) that the next chunk's first samples add onto.

    Computed as blocks: with the kernel zero-padded to 2 * stride taps (Mimi's kernels are
    at most twice the stride), input sample t emits two blocks of `stride` output samples:
    block 0 lands on output block t, block 1 on output block t + 1. So a chunk is one
    matmul (the bias rides on block 0, which every output sample gets exactly once), then
    block 0 plus block 1 shifted by one, the previous chunk's last block 1 first (faster
    than `conv_transpose1d` on a frame's few samples)."""

    def __init__(self, module: MimiConvTranspose1d, new_slot):
        conv = module.conv
        k, s = conv.kernel_size[0], conv.stride[0]
        if (module.padding_left != 0 or module.padding_right != k - s or conv.padding[0] != 0
                or conv.output_padding[0] != 0 or conv.dilation[0] != 1):
            raise NotImplementedError("streaming supports causal MimiConvTranspose1d with trim_right_ratio=1 only")
        if k > 2 * s:
            raise NotImplementedError(f"streaming supports kernels up to twice the stride, got {k} and {s}")
        groups, in_channels, out_channels = conv.groups, conv.in_channels, conv.out_channels
        if groups not in (1, in_channels) or (groups > 1 and out_channels != in_channels):
            raise NotImplementedError("streaming supports dense or depthwise MimiConvTranspose1d only")
        self.conv, self.stride = conv, s
        self.depthwise = groups > 1
        self.slot = new_slot(self.init_state)

    def init_state(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        # Zeros: no earlier input frame contributes to the first samples.
        return like.new_zeros(batch, self.conv.out_channels, 1, self.stride)

    def _taps(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(taps, bias): the weight as [in, out * 2 * stride] (depthwise: [channels,
        2 * stride]) with zero taps padded on, and the bias spread over block 0's taps."""
        conv, stride = self.conv, self.stride
        weight = F.pad(conv.weight.detach(), (0, 2 * stride - conv.weight.shape[-1]))  # [in, out / groups, 2 s]
        taps = weight[:, 0] if self.depthwise else weight.reshape(weight.shape[0], -1)
        bias = None
        if conv.bias is not None:
            bias = weight.new_zeros(conv.out_channels, 2, stride)
            bias[:, 0] = conv.bias.detach()[:, None]
            bias = bias.reshape(conv.out_channels, 2 * stride) if self.depthwise else bias.reshape(-1)
        return taps, bias

    def __call__(self, x: torch.Tensor, states: list) -> torch.Tensor:
        batch, _, frames = x.shape
        taps, bias = _derived(self.conv, "taps", self._taps)
        x = x.transpose(1, 2)                                   # [B, T, in]
        if self.depthwise:
            x = x[..., None]
            z = x * taps if bias is None else torch.addcmul(bias, x, taps)  # [B, T, C, 2 s]
        else:
            z = rows_matmul(x, taps, bias)  # per row: batch-invariant
        z = z.view(batch, frames, self.conv.out_channels, 2, self.stride).permute(0, 2, 3, 1, 4)  # [B, C, 2, T, s]
        # (the contiguous operand first: the sum then takes its layout, and the view below holds)
        y = torch.cat([states[self.slot], z[:, :, 1, :-1]], dim=2) + z[:, :, 0]
        states[self.slot] = z[:, :, 1, -1:]  # awaits the next chunk's block 0
        return y.reshape(batch, self.conv.out_channels, frames * self.stride)


class _Residual:
    """`MimiResnetBlock`: residual + block (ELU, conv, ELU, conv); convs keep their own state."""

    def __init__(self, module: MimiResnetBlock, new_slot):
        self.block = [_stream_layer(layer, new_slot) for layer in module.block]
        self.shortcut = _stream_layer(module.shortcut, new_slot)

    def __call__(self, x: torch.Tensor, states: list) -> torch.Tensor:
        residual = self.shortcut(x, states)
        for layer in self.block:
            x = layer(x, states)
        return residual + x


class _Pointwise:
    """A stateless per-sample module (ELU, Identity)."""

    def __init__(self, module: nn.Module):
        if isinstance(module, nn.ELU):  # its functional form: no module call per frame
            self.fn = lambda x, alpha=module.alpha: F.elu(x, alpha)
        elif isinstance(module, nn.Identity):
            self.fn = lambda x: x
        else:
            self.fn = module

    def __call__(self, x: torch.Tensor, states: list) -> torch.Tensor:
        return self.fn(x)


def _stream_layer(module: nn.Module, new_slot):
    """The streaming form of one decoder layer; `new_slot(init_fn)` reserves a state slot."""
    if isinstance(module, MimiConv1d):
        return _Conv(module, new_slot)
    if isinstance(module, MimiConvTranspose1d):
        return _ConvTranspose(module, new_slot)
    if isinstance(module, MimiResnetBlock):
        return _Residual(module, new_slot)
    if isinstance(module, (nn.ELU, nn.Identity)):
        return _Pointwise(module)
    raise NotImplementedError(f"no streaming form for {type(module).__name__}")


def _norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)
    return module(x)


def _scaled(layer_scale: nn.Module, x: torch.Tensor) -> torch.Tensor:
    scale = getattr(layer_scale, "scale", None)
    return x if scale is None else scale * x


# What streaming reads from a codec's weights in another layout (the quantizer table,
# transposed-conv taps, fused q/k/v), computed once per module and shared by its streams.
_DERIVED: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _derived(module: nn.Module, name: str, compute):
    """`compute()`, cached per (module, name) until `forget_derived`."""
    cache = _DERIVED.setdefault(module, {})
    if name not in cache:
        with torch.no_grad():
            cache[name] = compute()
    return cache[name]


def forget_derived(codec: nn.Module) -> None:
    """Drop what streaming derived from `codec`'s weights: call after editing them in place,
    or after moving or casting the codec (new streams then read the current weights).
    transformers' Mimi codebooks cache their table too (`_embed`, which the quantizer
    table is made from): that goes as well."""
    for module in codec.modules():
        _DERIVED.pop(module, None)
        if getattr(module, "_embed", None) is not None:
            module._embed = None


def _quantizer_table(codec) -> torch.Tensor:
    """Every code of every codebook decoded and sent through its RVQ's output projection:
    [num_quantizers * codebook_size, hidden]. The quantizer's decode of a frame is then the
    sum of one row per codebook (the projection is linear)."""
    quantizer = codec.quantizer
    rows = []
    for rvq, count in ((quantizer.semantic_residual_vector_quantizer, quantizer.num_semantic_quantizers),
                       (quantizer.acoustic_residual_vector_quantizer, quantizer.num_acoustic_quantizers)):
        for layer in rvq.layers[:count]:
            embed = layer.codebook.embed.T[None]  # [1, dim, codebook_size]
            rows.append((rvq.output_proj(embed) if rvq.output_proj is not None else embed)[0].T)
    return torch.cat(rows)


def _fused_qkv(attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An attention's q, k and v projections as one weight (and bias)."""
    linears = (attn.q_proj, attn.k_proj, attn.v_proj)
    weight = torch.cat([lin.weight for lin in linears])
    bias = torch.cat([lin.bias for lin in linears]) if attn.q_proj.bias is not None else None
    return weight, bias


class StreamingMimiDecoder:
    """Exact frame-by-frame Mimi decoding. State is per stream; weights are shared.

    One object per stream (conversation). It holds the stream's state (conv contexts,
    transposed-conv tails, the decoder transformer's KV ring) in plain tensors and calls the
    shared `codec`'s modules; the codec is never modified. `decode_frame` takes the 8 (or
    `num_codebooks`) codes of one frame and returns that frame's `frame_size` (1920) samples.
    Codes must be valid ids (< codebook_size); they are not checked, to avoid a host sync.

    `max_frames` optionally bounds the stream length: the KV ring then holds at most
    `steps * max_frames` positions (instead of the `window + steps - 1` that a frame's queries
    can see, rounded up to whole frames: 252 for Mimi), and decoding more frames raises. It is
    required only when the decoder transformer has no sliding window.
    """

    def __init__(self, codec, num_codebooks: int, max_frames: int | None = None):
        if codec.decoder is None:
            raise ValueError("the codec was built without a decoder")
        if not 1 <= num_codebooks <= codec.config.num_quantizers:
            raise ValueError(f"num_codebooks={num_codebooks} not in [1, {codec.config.num_quantizers}]")
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        self.codec = codec
        self.num_codebooks = num_codebooks
        self.max_frames = max_frames
        decoder = codec.decoder
        self.frame_size = int(codec.config.frame_size)
        self.sample_rate = int(codec.config.sampling_rate)

        # Latent frame -> `steps` transformer positions (2 for Mimi: 12.5 Hz -> 25 Hz).
        self._state_inits: list = []  # per state slot: init_fn(batch, like) -> initial tensor
        self._upsample = _ConvTranspose(decoder.upsample, self._new_slot) if decoder.upsample is not None else None
        self.steps = self._upsample.stride if self._upsample is not None else 1

        # Decoder transformer: shape facts and the KV ring size.
        transformer = decoder.decoder_transformer
        self._layers = list(transformer.layers)
        self._rotary = transformer.rotary_emb
        attn = self._layers[0].self_attn
        self._heads, self._kv_heads, self._head_dim = attn.num_heads, attn.num_key_value_heads, attn.head_dim
        self._gqa = attn.num_key_value_groups > 1
        self.window = attn.sliding_window
        if self.window is None and max_frames is None:
            raise ValueError("the decoder transformer has no sliding window: pass max_frames to size the KV cache")
        # A frame's `steps` queries together need the last `window + steps - 1` positions; round
        # the ring up to whole frames so a frame's keys land in contiguous slots.
        capacity = math.inf
        if self.window is not None:
            capacity = self.steps * math.ceil((self.window + self.steps - 1) / self.steps)
        if max_frames is not None:
            capacity = min(capacity, self.steps * max_frames)
        self._capacity = int(capacity)

        # SEANet decoder: flat list of streaming layers; each stateful one owns a state slot.
        self._seanet = [_stream_layer(layer, self._new_slot) for layer in decoder.decoder_seanet.layers]
        samples = self.steps * math.prod(codec.config.upsampling_ratios)
        if samples != self.frame_size:
            raise ValueError(f"decoder makes {samples} samples per frame, config.frame_size is {self.frame_size}")

        param = next(decoder.parameters())
        self.device, self.dtype = param.device, param.dtype
        self._step_offsets = torch.arange(self.steps, device=self.device)
        self._table = _derived(codec, "quantizer_table", lambda: _quantizer_table(codec))
        self._code_offsets = torch.arange(num_codebooks, device=self.device) * codec.config.codebook_size
        self.reset()

    def _new_slot(self, init_fn) -> int:
        self._state_inits.append(init_fn)
        return len(self._state_inits) - 1

    def reset(self) -> None:
        """Start a new stream: forget conv contexts, tails and the transformer cache."""
        self._batch: int | None = None  # state is built at the first frame, for its batch size
        self._states: list = []
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._slot_pos: torch.Tensor | None = None
        self._rope_block: tuple = (0, None)  # (first position, tables)
        self._frame = 0

    @property
    def frames_decoded(self) -> int:
        return self._frame

    def _init_state(self, batch: int) -> None:
        like = torch.empty((), device=self.device, dtype=self.dtype)
        self._states = [init(batch, like) for init in self._state_inits]
        # KV ring per layer (keys after RoPE); `_slot_pos` is the absolute position in each
        # slot of each row, so the sliding-window causal mask is computed on device from
        # positions alone (rows of a `decode_frames` batch sit at different positions).
        shape = (batch, self._kv_heads, self._capacity, self._head_dim)
        self._keys = [like.new_zeros(shape) for _ in self._layers]
        self._values = [like.new_zeros(shape) for _ in self._layers]
        self._slot_pos = torch.full((batch, self._capacity), _EMPTY_SLOT, device=self.device, dtype=torch.long)
        self._batch = batch

    def _begin(self, batch: int) -> None:
        """Check a frame of `batch` rows can be decoded now (building the state at the first)."""
        if self._batch is None:
            self._init_state(batch)
        elif batch != self._batch:
            raise ValueError(f"batch size changed mid-stream ({self._batch} -> {batch}); call reset() first")
        if self.max_frames is not None and self._frame >= self.max_frames:
            raise RuntimeError(f"stream exceeds max_frames={self.max_frames}; call reset() or raise max_frames")

    def _rope(self, start: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables (`rope_tables`) for positions start .. start + steps - 1, sliced from
        tables computed by transformers' rotary embedding for the next _ROPE_BLOCK frames."""
        block_start, tables = self._rope_block
        if tables is None or start + self.steps > block_start + tables[0].shape[2]:
            positions = torch.arange(start, start + _ROPE_BLOCK * self.steps, device=self.device)
            block_start, tables = start, rope_tables(*self._rotary(like, positions[None]))
            self._rope_block = (block_start, tables)
        offset = start - block_start
        return tuple(t[:, :, offset: offset + self.steps] for t in tables)

    def _transformer(self, h: torch.Tensor, state: "_Batch") -> torch.Tensor:
        """The decoder transformer on this frame's `steps` positions, h [B, steps, hidden],
        each row at its own stream's positions. transformers' `MimiTransformerLayer`
        arithmetic, called op by op (no module calls)."""
        batch, steps, _ = h.shape
        pos, slots = state.positions, state.slots  # [B, steps]: absolute positions, ring slots
        state.slot_pos.scatter_(1, slots, pos)
        query_pos = pos[:, :, None]
        slot_pos = state.slot_pos[:, None, :]
        mask = slot_pos <= query_pos  # causal, [B, steps, capacity]
        if self.window is not None:
            mask &= slot_pos > query_pos - self.window  # full decode: kv > q - window
        rope = state.rope
        rows = torch.arange(batch, device=h.device)[:, None].expand(batch, steps)
        heads, kv_heads, dim = self._heads, self._kv_heads, self._head_dim
        for layer, keys, values in zip(self._layers, state.keys, state.values):
            attn = layer.self_attn
            weight, bias = _derived(attn, "qkv", lambda attn=attn: _fused_qkv(attn))
            qkv = linear_in_mode(_norm(layer.input_layernorm, h), weight, bias).view(batch, steps, -1, dim)
            qk = apply_rope(qkv[:, :, : heads + kv_heads].transpose(1, 2), *rope)  # q and k heads at once
            # each row's keys/values into its own ring slots ([B, slots, heads, dim] views)
            keys.transpose(1, 2).index_put_((rows, slots), qk[:, heads:].transpose(1, 2))
            values.transpose(1, 2).index_put_((rows, slots), qkv[:, :, heads + kv_heads:])
            q = qk[:, :heads]
            if h.device.type == "cpu":
                o = attend_few(q, keys, values, mask, attn.scaling)
            else:
                o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None], scale=attn.scaling,
                                                   enable_gqa=self._gqa)
            o = linear_in_mode(o.transpose(1, 2).reshape(batch, steps, -1), attn.o_proj.weight, attn.o_proj.bias)
            h = h + _scaled(layer.self_attn_layer_scale, o)
            mlp = layer.mlp
            x = linear_in_mode(_norm(layer.post_attention_layernorm, h), mlp.fc1.weight, mlp.fc1.bias)
            x = linear_in_mode(mlp.activation_fn(x), mlp.fc2.weight, mlp.fc2.bias)
            h = h + _scaled(layer.mlp_layer_scale, x)
        return h

    def _run(self, codes: torch.Tensor, state: "_Batch") -> torch.Tensor:
        """One frame of every row in `state`: codes [B, num_codebooks] -> audio [B, frame_size]."""
        codes = codes.to(self.device, torch.long) + self._code_offsets
        x = self._table[codes].sum(dim=1)[:, :, None]  # quantizer decode: stateless, [B, hidden, 1]
        if self._upsample is not None:
            x = self._upsample(x, state.states)  # [B, hidden, steps]
        x = self._transformer(x.transpose(1, 2), state).transpose(1, 2)
        for layer in self._seanet:
            x = layer(x, state.states)
        audio = x[:, 0] if x.shape[1] == 1 else x  # mono: [B, frame_size]
        return audio.float()

    @torch.no_grad()
    def decode_frame(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [batch, num_codebooks] long -> audio [batch, frame_size] float32 (the samples of this frame)."""
        if codes.dim() != 2 or codes.shape[1] != self.num_codebooks:
            raise ValueError(f"codes must be [batch, {self.num_codebooks}], got {tuple(codes.shape)}")
        self._begin(codes.shape[0])
        state = _Batch([self], codes.shape[0])
        audio = self._run(codes, state)
        state.scatter()
        return audio

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Convenience: codes [batch, frames, num_codebooks] -> audio [batch, frames * frame_size],
        decoded frame by frame on this stream (continuing its state)."""
        if codes.dim() != 3:
            raise ValueError(f"codes must be [batch, frames, {self.num_codebooks}], got {tuple(codes.shape)}")
        return torch.cat([self.decode_frame(codes[:, t]) for t in range(codes.shape[1])], dim=-1)


class _Batch:
    """The state of several one-row streams stacked into one batch for a frame (or one
    stream's own state, unstacked), and each row's positions; `scatter` hands the new
    state back to the streams. Stacking copies the states once per frame: small next to
    the frame's work, and a stream can join or leave the batch at any frame."""

    def __init__(self, decoders: list[StreamingMimiDecoder], rows: int):
        first = decoders[0]
        self.decoders = decoders
        if len(decoders) == 1:
            self.states, self.keys, self.values = list(first._states), first._keys, first._values
            self.slot_pos = first._slot_pos
        else:
            self.states = [torch.cat(parts) for parts in zip(*(d._states for d in decoders))]
            self.keys = [torch.cat(parts) for parts in zip(*(d._keys for d in decoders))]
            self.values = [torch.cat(parts) for parts in zip(*(d._values for d in decoders))]
            self.slot_pos = torch.cat([d._slot_pos for d in decoders])
        steps, device = first.steps, first.device
        starts = [d._frame * steps for d in decoders]  # host ints: each stream's first position
        offsets = first._step_offsets
        if len(decoders) == 1:
            self.positions = (offsets + starts[0]).expand(rows, steps)
            self.slots = (offsets + starts[0] % first._capacity).expand(rows, steps)
            self.rope = first._rope(starts[0], first._table)
        else:
            base = torch.tensor(starts, device=device)[:, None]
            self.positions = base + offsets
            self.slots = base % first._capacity + offsets
            ropes = [d._rope(start, first._table) for d, start in zip(decoders, starts)]
            self.rope = tuple(torch.cat(parts) for parts in zip(*ropes))  # [B, 1, steps, dim]

    def scatter(self) -> None:
        decoders = self.decoders
        if len(decoders) == 1:
            decoders[0]._states = self.states
        else:
            for i, d in enumerate(decoders):
                d._states = [s[i: i + 1] for s in self.states]
                d._keys = [k[i: i + 1] for k in self.keys]
                d._values = [v[i: i + 1] for v in self.values]
                d._slot_pos = self.slot_pos[i: i + 1]
        for d in decoders:
            d._frame += 1


@torch.no_grad()
def decode_frames(decoders: list[StreamingMimiDecoder], codes: torch.Tensor) -> torch.Tensor:
    """The next frame of several one-row streams in one pass: `decoders[i]` decodes row i of
    codes [len(decoders), num_codebooks]; returns audio [len(decoders), frame_size]. Each
    stream keeps its own state and positions (they may be at different frames), so this
    equals every stream's `decode_frame` of its row alone, exactly so inside
    `batch_invariant()` (its convs and matmuls then run one product per row). The
    decoders must share one codec and codebook count."""
    if not decoders:
        raise ValueError("decode_frames needs at least one stream")
    first = decoders[0]
    if codes.dim() != 2 or codes.shape != (len(decoders), first.num_codebooks):
        raise ValueError(f"codes must be [{len(decoders)}, {first.num_codebooks}], got {tuple(codes.shape)}")
    for d in decoders:
        if d.codec is not first.codec or d.num_codebooks != first.num_codebooks or d.max_frames != first.max_frames:
            raise ValueError("decode_frames needs streams of one codec, codebook count and max_frames")
        d._begin(1)
    state = _Batch(decoders, len(decoders))
    audio = first._run(codes, state)
    state.scatter()
    return audio
