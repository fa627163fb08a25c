"""A lean forward pass for Llama-family decoders, with a preallocated KV cache.

Why: a decode step of a small model on a CPU is bound by reading its weights (SmolLM2-135M
in float32: 540 MB per step), and transformers' modules only compute in the dtype they
hold. This module holds the weights in the format that reads fastest (``quant.py``:
float16 through FBGEMM, half the bytes, float32 arithmetic) and runs the same arithmetic
as transformers' Llama in about 15 operations per layer instead of about 40. Measured on
SmolLM2 (docs/BENCHMARKS.md): with float32 weights it is no faster than transformers
(the weights dominate); with float16 weights, 2.5-3x faster. How:

* the q, k and v projections are one matrix (``[q; k; v]``), gate and up another;
* rotary embeddings are one complex multiplication: the rows of ``q`` and ``k`` of every
  head are permuted once at load from the "rotate half" order to interleaved pairs (a dot
  product does not change when both sides are permuted alike, so attention is the same);
* grouped-query attention needs no copy of k and v: the query heads that share a key head
  become the "query length" of one ``scaled_dot_product_attention`` call per layer;
* the cache is preallocated per batch and grows by a quarter at a time, so a step writes
  one column instead of concatenating the whole cache.

The batch layout is the one ``batch.KVBatch`` documents (rows right-aligned, left padding
masked, per-row positions), so the engine can use either.

Supported: ``llama``, ``mistral`` and ``qwen2`` configurations with full attention, SiLU
MLPs and the rotary embeddings transformers computes (any ``rope_type``: the table is
taken from the model's own rotary module). ``LeanModel.supports`` says why not otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .batch import Rows, _left_pad, left_padded
from .quant import Linear, make_linear

#: Model types whose decoder layers this module reproduces.
SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
#: Cache columns allocated at first, and the granularity of growth.
CACHE_CHUNK = 128


class LeanModel:
    """The weights of a Llama-family causal LM rearranged for ``LeanBatch``.

    With ``span=(start, end)`` it holds decoder layers ``start..end-1`` only, plus the token
    embeddings when ``start == 0`` and the final norm and LM head when ``end`` is the last
    layer: what a worker serving that span of the model needs (``forward_sessions``).
    """

    def __init__(self, model: Any, dtype: str = "float16", span: tuple[int, int] | None = None) -> None:
        reason = self.supports(model)
        if reason:
            raise ValueError(reason)
        config = model.config
        inner = model.model
        self.total_layers = len(inner.layers)
        self.start, self.end = span if span is not None else (0, self.total_layers)
        if not 0 <= self.start < self.end <= self.total_layers:
            raise ValueError(f"span {self.start}:{self.end} is not inside the model's {self.total_layers} layers")
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.hidden = config.hidden_size
        self.eps = float(config.rms_norm_eps)
        self.dtype = dtype
        self.max_positions = int(config.max_position_embeddings)
        self.embed = inner.embed_tokens.weight.detach() if self.first else None
        self.layers = [self._layer(layer, dtype) for layer in inner.layers[self.start : self.end]]
        self.norm = inner.norm.weight.detach() if self.last else None
        self.head = make_linear(model.lm_head.weight.detach(), None, dtype) if self.last else None
        self.scale = 1.0 / self.head_dim**0.5
        self._rotary = inner.rotary_emb
        self._freqs = torch.empty(0, self.head_dim // 2, dtype=torch.complex64)

    @property
    def first(self) -> bool:
        """Whether this holds layer 0 (and so the embeddings: its input is token ids)."""
        return self.start == 0

    @property
    def last(self) -> bool:
        """Whether this holds the last layer (and so the head: its output is logits)."""
        return self.end == self.total_layers

    @staticmethod
    def supports(model: Any) -> str | None:
        """``None`` when ``model`` can run here, else why not."""
        config = getattr(model, "config", None)
        kind = getattr(config, "model_type", None)
        if kind not in SUPPORTED_TYPES:
            return f"model type {kind!r} is not one of {', '.join(SUPPORTED_TYPES)}"
        if getattr(config, "hidden_act", "silu") != "silu":
            return f"activation {config.hidden_act!r} is not silu"
        if getattr(config, "mlp_bias", False):
            return "MLP biases are not supported"
        window = getattr(config, "sliding_window", None)
        if window and getattr(config, "use_sliding_window", kind == "mistral") and window < config.max_position_embeddings:
            return f"sliding-window attention ({window} tokens) is not supported"
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "rotary_emb") or not hasattr(inner, "layers"):
            return "the model does not have the usual model.layers / model.rotary_emb layout"
        return None

    def _layer(self, layer: Any, dtype: str) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        q = _interleave_rows(attn.q_proj.weight.detach(), self.heads, self.head_dim)
        k = _interleave_rows(attn.k_proj.weight.detach(), self.kv_heads, self.head_dim)
        biases = [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]
        bias = None
        if any(b is not None for b in biases):
            bq, bk, bv = (
                b.detach() if b is not None else torch.zeros(p.weight.shape[0])
                for b, p in zip(biases, (attn.q_proj, attn.k_proj, attn.v_proj), strict=True)
            )
            bias = torch.cat([
                _interleave_rows(bq[:, None], self.heads, self.head_dim)[:, 0],
                _interleave_rows(bk[:, None], self.kv_heads, self.head_dim)[:, 0],
                bv,
            ])
        return _Layer(
            attn_norm=layer.input_layernorm.weight.detach(),
            qkv=make_linear(torch.cat([q, k, attn.v_proj.weight.detach()]), bias, dtype),
            out=make_linear(attn.o_proj.weight.detach(), _bias(attn.o_proj), dtype),
            mlp_norm=layer.post_attention_layernorm.weight.detach(),
            gate_up=make_linear(torch.cat([mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()]), None, dtype),
            down=make_linear(mlp.down_proj.weight.detach(), None, dtype),
        )

    def freqs(self, positions: torch.Tensor) -> torch.Tensor:
        """Complex rotations ``cos + i sin`` for ``positions`` (any shape) -> ``[..., head_dim/2]``."""
        needed = int(positions.max()) + 1 if positions.numel() else 0
        if needed > self._freqs.shape[0]:
            size = min(max(needed, 2 * self._freqs.shape[0], 256), max(self.max_positions, needed))
            ids = torch.arange(size)[None, :]
            probe = torch.empty(1, dtype=torch.float32)
            cos, sin = self._rotary(probe, ids)
            half = self.head_dim // 2
            self._freqs = torch.complex(cos[0, :, :half].float(), sin[0, :, :half].float())
        return self._freqs[positions]

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of every column of ``tokens`` ``[rows, T]`` (no padding), with a cache of their own."""
        rows, steps = tokens.shape
        mask = torch.ones((rows, steps), dtype=torch.bool)
        positions = torch.arange(steps).expand(rows, steps)
        return self.forward(tokens, positions, Cache(self, rows, steps), 0, mask, every_column=True)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: Cache,
        start: int,
        mask: torch.Tensor,
        every_column: bool = False,
    ) -> torch.Tensor:
        """Run ``tokens`` ``[rows, T]`` at cache columns ``start..start+T``; return float32 logits of
        the last column ``[rows, vocab]`` (of every column, ``[rows, T, vocab]``, with ``every_column``).

        ``mask`` ``[rows, start+T]`` is True where a column holds a real token.
        """
        if not (self.first and self.last):
            raise ValueError(f"layers {self.start}:{self.end} are a span: use forward_sessions")
        rows, steps = tokens.shape
        end = start + steps
        x = self.embed[tokens]  # [rows, T, hidden]
        rot = self.freqs(positions)[:, :, None, :]  # [rows, T, 1, hd/2]
        heads, kv_heads, hd = self.heads, self.kv_heads, self.head_dim
        qk_width = (heads + kv_heads) * hd
        group = heads // kv_heads
        if steps == 1:
            # Decode: the query heads of a group take the place of the query length.
            allowed = mask[:, None, None, :end]
        else:
            causal = torch.ones(steps, steps, dtype=torch.bool).tril_()
            allowed = mask[:, None, start:end] & causal  # [rows, T, T] over the new columns
            allowed |= torch.eye(steps, dtype=torch.bool)  # padding rows attend to themselves: no NaN
            full = torch.cat([mask[:, None, :start].expand(rows, steps, start), allowed], dim=2)
            allowed = full[:, None, :, :].repeat(1, 1, group, 1)  # [rows, 1, group*T, end]
        # An additive mask: CPU attention takes it about twice as fast as a boolean one for one row.
        attn_mask = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))
        for index, layer in enumerate(self.layers):
            h = F.rms_norm(x, (self.hidden,), layer.attn_norm, self.eps)
            qkv = layer.qkv(h)  # [rows, T, (H + 2 KV) hd]
            qk = torch.view_as_real(
                torch.view_as_complex(qkv[..., :qk_width].unflatten(-1, (heads + kv_heads, hd // 2, 2))) * rot
            )  # [rows, T, H + KV, hd/2, 2]
            keys, values = cache.data[index]
            keys[:, :, start:end] = qk[:, :, heads:].flatten(-2).transpose(1, 2)
            values[:, :, start:end] = qkv[..., qk_width:].unflatten(-1, (kv_heads, hd)).transpose(1, 2)
            # q: [rows, T, H, hd] -> [rows, KV, group * T, hd] (head h uses key head h // group)
            q = qk[:, :, :heads].flatten(-2).unflatten(2, (kv_heads, group)).permute(0, 2, 3, 1, 4).flatten(2, 3)
            o = F.scaled_dot_product_attention(
                q, keys[:, :, :end], values[:, :, :end], attn_mask=attn_mask, scale=self.scale
            )  # [rows, KV, group * T, hd]
            o = o.unflatten(2, (group, steps)).permute(0, 3, 1, 2, 4).flatten(2)  # [rows, T, H hd]
            x = x + layer.out(o)
            h = F.rms_norm(x, (self.hidden,), layer.mlp_norm, self.eps)
            gate, up = layer.gate_up(h).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        last = F.rms_norm(x if every_column else x[:, -1], (self.hidden,), self.norm, self.eps)
        return self.head(last).float()


    def forward_sessions(self, items: list[SessionInput]) -> list[torch.Tensor]:
        """One pass of this span for several independent sequences ("sessions"), each with its
        own cache and new tokens; return per item the float32 hidden states ``[T, hidden]`` of
        its new positions, or, when this span holds the head, the logits ``[vocab]`` of its
        last position.

        Why ragged: sessions arrive one step at a time from different clients, at different
        lengths. The linear layers, which read the weights and cost almost all of a step, run
        once over all new positions of all items (``[1, sum T, hidden]``); only attention,
        which is cheap at these lengths, runs per item against its own cache. No padding,
        no copying caches together, and a long prompt joins the decode steps of others.
        """
        x = torch.cat([self.embed[item.tokens] if self.first else item.hidden.float() for item in items])[None]
        heads, kv_heads, hd = self.heads, self.kv_heads, self.head_dim
        qk_width = (heads + kv_heads) * hd
        group = heads // kv_heads
        plans = []
        offset = 0
        for item in items:
            steps = item.steps
            end = item.start + steps
            item.cache.reserve(end)
            rot = self.freqs(torch.arange(item.start, end))[:, None, :]  # [T, 1, hd/2]
            mask = None
            if steps > 1:
                allowed = torch.arange(end)[None, :] <= torch.arange(item.start, end)[:, None]  # [T, end]
                mask = torch.zeros(steps, end).masked_fill_(~allowed, float("-inf")).repeat(group, 1)[None, None]
            plans.append((item, offset, steps, end, rot, mask))
            offset += steps
        for index, layer in enumerate(self.layers):
            h = F.rms_norm(x, (self.hidden,), layer.attn_norm, self.eps)
            qkv = layer.qkv(h)[0]  # [N, (H + 2 KV) hd]
            outs = []
            for item, first, steps, end, rot, mask in plans:
                part = qkv[first : first + steps]
                qk = torch.view_as_real(
                    torch.view_as_complex(part[:, :qk_width].unflatten(-1, (heads + kv_heads, hd // 2, 2))) * rot
                )  # [T, H + KV, hd/2, 2]
                keys, values = item.cache.data[index]  # [1, KV, capacity, hd] each
                keys[0, :, item.start : end] = qk[:, heads:].flatten(-2).transpose(0, 1)
                values[0, :, item.start : end] = part[:, qk_width:].unflatten(-1, (kv_heads, hd)).transpose(0, 1)
                q = qk[:, :heads].flatten(-2).unflatten(1, (kv_heads, group)).permute(1, 2, 0, 3).flatten(1, 2)
                o = F.scaled_dot_product_attention(
                    q[None], keys[:, :, :end], values[:, :, :end], attn_mask=mask, scale=self.scale
                )  # [1, KV, group * T, hd]
                outs.append(o[0].unflatten(1, (group, steps)).permute(2, 0, 1, 3).flatten(1))  # [T, H hd]
            x = x + layer.out(torch.cat(outs)[None])
            h = F.rms_norm(x, (self.hidden,), layer.mlp_norm, self.eps)
            gate, up = layer.gate_up(h).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        x = x[0]
        if not self.last:
            return [x[first : first + steps] for _, first, steps, *_ in plans]
        ends = torch.tensor([first + steps - 1 for _, first, steps, *_ in plans])
        logits = self.head(F.rms_norm(x[ends], (self.hidden,), self.norm, self.eps)).float()
        return list(logits)


class SessionInput:
    """One item of ``LeanModel.forward_sessions``: new token ids (first span) or hidden states
    ``[T, hidden]`` (later spans), written at cache columns ``start..start+T`` of ``cache``.
    Positions equal cache columns: a session is one unpadded sequence."""

    __slots__ = ("cache", "start", "tokens", "hidden")

    def __init__(
        self, cache: Cache, start: int, tokens: torch.Tensor | None = None, hidden: torch.Tensor | None = None
    ) -> None:
        self.cache = cache
        self.start = start
        self.tokens = tokens
        self.hidden = hidden

    @property
    def steps(self) -> int:
        return int(self.tokens.shape[0] if self.tokens is not None else self.hidden.shape[0])


class _Layer:
    __slots__ = ("attn_norm", "qkv", "out", "mlp_norm", "gate_up", "down")

    def __init__(self, **parts: Any) -> None:
        for name, value in parts.items():
            setattr(self, name, value)

    def linears(self) -> list[Linear]:
        return [self.qkv, self.out, self.gate_up, self.down]


class Cache:
    """Keys and values of every layer: ``[rows, kv_heads, capacity, head_dim]`` float32 each."""

    def __init__(self, model: LeanModel, rows: int, columns: int) -> None:
        """Room for at least ``columns`` columns, rounded up to a multiple of ``CACHE_CHUNK``."""
        self.model = model
        capacity = -(-columns // CACHE_CHUNK) * CACHE_CHUNK
        shape = (len(model.layers), 2, rows, model.kv_heads, capacity, model.head_dim)
        self.data = torch.zeros(shape, dtype=torch.float32)

    @property
    def capacity(self) -> int:
        return int(self.data.shape[4])

    def reserve(self, columns: int) -> None:
        """Make room for ``columns`` columns, growing by a quarter (at least ``CACHE_CHUNK``) at a time."""
        if columns <= self.capacity:
            return
        grown = Cache(self.model, self.data.shape[2], max(columns, self.capacity + max(CACHE_CHUNK, self.capacity // 4)))
        grown.data[..., : self.capacity, :] = self.data
        self.data = grown.data


class LeanBatch(Rows):
    """``KVBatch``'s contract (prefill, step, extend, select) over ``LeanModel`` and ``Cache``."""

    def __init__(self, model: LeanModel, cache: Cache, mask: torch.Tensor, positions: torch.Tensor) -> None:
        self.model = model
        self.cache = cache
        self.mask = mask  # [rows, length] bool, True = real token
        self.positions = positions  # [rows] int64, position id of each row's next token

    @classmethod
    def prefill(cls, model: LeanModel, prompts: list[list[int]], pad_id: int) -> tuple[LeanBatch, torch.Tensor]:
        tokens, mask, positions = left_padded(prompts, pad_id)
        length = tokens.shape[1]
        cache = Cache(model, len(prompts), length + 1)
        logits = model.forward(tokens, positions, cache, 0, mask)
        next_positions = torch.tensor([len(p) for p in prompts], dtype=torch.long)
        return cls(model, cache, mask, next_positions), logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (``[rows]``); return the next-token logits ``[rows, vocab]``."""
        start = self.length
        self.cache.reserve(start + 1)
        mask = torch.cat([self.mask, self.mask.new_ones((self.size, 1))], dim=1)
        logits = self.model.forward(tokens[:, None], self.positions[:, None], self.cache, start, mask)
        self.mask = mask
        self.positions = self.positions + 1
        return logits

    def extend(self, other: LeanBatch) -> None:
        """Append ``other``'s rows after this batch's rows, right-aligned to the longer one."""
        length = max(self.length, other.length)
        capacity = max(self.cache.capacity, other.cache.capacity, length + 1)
        merged = Cache(self.model, self.size + other.size, capacity)
        for rows, batch in ((slice(0, self.size), self), (slice(self.size, None), other)):
            shift = length - batch.length
            merged.data[:, :, rows, :, shift:length] = batch.cache.data[:, :, :, :, : batch.length]
        self.mask = torch.cat([_left_pad(self.mask, length), _left_pad(other.mask, length)], dim=0)
        self.positions = torch.cat([self.positions, other.positions])
        self.cache = merged

    def select(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order), then drop columns that are padding everywhere."""
        index = torch.tensor(rows, dtype=torch.long)
        mask = self.mask.index_select(0, index)
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else self.length
        kept = Cache(self.model, len(rows), self.cache.capacity)
        kept.data[..., : self.length - start, :] = self.cache.data.index_select(2, index)[..., start : self.length, :]
        self.cache = kept
        self.mask = mask[:, start:]
        self.positions = self.positions.index_select(0, index)


def _interleave_rows(weight: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """Reorder each head's output rows from halves ``[x0..x(d/2-1), y0..]`` to pairs ``[x0, y0, x1, y1, ...]``."""
    shaped = weight.reshape(heads, 2, head_dim // 2, -1)
    return shaped.transpose(1, 2).reshape(heads * head_dim, -1).contiguous()


def _bias(linear: Any) -> torch.Tensor | None:
    return linear.bias.detach() if getattr(linear, "bias", None) is not None else None

