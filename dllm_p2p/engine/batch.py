"""The running batch: sequences of different lengths decoding together over one KV cache.

Layout. Every row is *right-aligned*: its newest token sits in the last cache column and
shorter rows are padded on the left. The 2-D ``mask`` marks real columns (1) and padding
(0), and each row carries its own next position id, so the model sees exactly what it
would see for that sequence alone. With right alignment a decode step is one forward pass
of ``[rows, 1]`` tokens, rows join by left-padding caches to a common length and
concatenating, and rows leave by index selection, after which columns that are padding
in every remaining row are trimmed. The cache length is thus always the longest live
sequence.

Padded cache entries are zeroed after prefill: they are masked out of attention, but a
masked key still multiplies its value by a zero weight, and 0 * NaN would poison a row.

This relies on ``transformers``' ``DynamicCache`` exposing per-layer ``keys``/``values``
tensors of shape ``[batch, heads, length, head_dim]`` (transformers >= 4.56), i.e. models
whose layers all use full attention (GPT-2, Llama, Mistral without sliding window, ...).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .errors import EngineError


class UnsupportedModel(EngineError):
    """The model's cache cannot be batched by this engine (sliding windows, recurrent state...)."""


def make_runner(model: Any, dtype: str = "auto") -> ModelRunner | LeanRunner:
    """The fastest way this engine has to run ``model``.

    Llama-family models get the lean decoder (``lean.py``), with float16 weights unless
    ``dtype`` says float32 (or FBGEMM is missing); every other model runs through
    transformers' own forward in float32.
    """
    from .lean import LeanModel
    from .quant import WEIGHT_DTYPES, float16_available

    if dtype not in ("auto", *WEIGHT_DTYPES):
        raise ValueError(f"unknown dtype {dtype!r}; choose from auto, {', '.join(WEIGHT_DTYPES)}")
    reason = LeanModel.supports(model)
    if reason is None:
        if dtype == "auto":
            dtype = "float16" if float16_available() else "float32"
        return LeanRunner(LeanModel(model, dtype), _kv_bytes_per_token(model.config))
    if dtype == "float16":
        raise ValueError(f"--dtype float16 needs the lean decoder, and this model cannot use it: {reason}")
    return ModelRunner(model)


class LeanRunner:
    """The engine's view of ``lean.LeanModel``."""

    kind = "lean"

    def __init__(self, lean: Any, kv_bytes_per_token: int) -> None:
        self.lean = lean
        self.dtype = lean.dtype
        self.kv_bytes_per_token = kv_bytes_per_token

    def prefill(self, prompts: list[list[int]], pad_id: int) -> tuple[Any, torch.Tensor]:
        from .lean import LeanBatch

        return LeanBatch.prefill(self.lean, prompts, pad_id)


class ModelRunner:
    """Calls one causal LM the way the batch needs, across transformers' API spellings."""

    kind = "transformers"
    dtype = "float32"

    def __init__(self, model: Any) -> None:
        self.model = model
        self.kv_bytes_per_token = _kv_bytes_per_token(model.config)
        names = set(inspect.signature(model.forward).parameters)
        # transformers 5.x renamed ``past_key_values`` to ``cache`` (old name deprecated).
        self._cache_kw = "cache" if "cache" in names else "past_key_values"
        self._keep_logits = "logits_to_keep" in names

    def forward(
        self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        """Run the model, extending ``cache``; return float32 logits of the last column ``[rows, vocab]``."""
        kwargs: dict[str, Any] = {self._cache_kw: cache}
        if self._keep_logits:
            kwargs["logits_to_keep"] = 1
        out = self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs
        )
        return out.logits[:, -1, :].float()

    def prefill(self, prompts: list[list[int]], pad_id: int) -> tuple[KVBatch, torch.Tensor]:
        return KVBatch.prefill(self, prompts, pad_id)

    def new_cache(self) -> DynamicCache:
        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # older transformers: no config argument
            return DynamicCache()


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts right-aligned in one ``[rows, longest]`` tensor: token ids (``pad_id`` on the
    left), the mask (True = real token) and each column's position id."""
    length = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        tokens[row, length - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, length - len(prompt) :] = True
    positions = (mask.long().cumsum(-1) - 1).clamp_(min=0)
    return tokens, mask, positions


class Rows:
    """What both batches share: ``mask`` ``[rows, length]`` and the next position of each row."""

    mask: torch.Tensor
    positions: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    def close(self) -> None:
        """The engine dropped the whole batch: nothing to hand back (its tensors are freed with it)."""


class KVBatch(Rows):
    """Cache, padding mask and next position ids of rows that decode in lock-step."""

    def __init__(self, runner: ModelRunner, cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor):
        self.runner = runner
        self.cache = cache
        self.mask = mask  # [rows, length] int64, 1 = real token
        self.positions = positions  # [rows] int64, position id of each row's next token

    @classmethod
    def prefill(
        cls, runner: ModelRunner, prompts: list[list[int]], pad_id: int
    ) -> tuple[KVBatch, torch.Tensor]:
        """Run the prompts (left-padded) through the model; return the batch and next-token logits."""
        input_ids, valid, positions = left_padded(prompts, pad_id)
        mask = valid.long()
        cache = runner.new_cache()
        logits = runner.forward(input_ids, mask, positions, cache)
        layers = _layers(cache)
        pad = (mask == 0)[:, None, :, None]
        if bool(pad.any()):
            for layer in layers:
                layer.keys = layer.keys.masked_fill(pad, 0)
                layer.values = layer.values.masked_fill(pad, 0)
        return cls(runner, cache, mask, torch.tensor([len(p) for p in prompts], dtype=torch.long)), logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (``[rows]``); return the next-token logits ``[rows, vocab]``."""
        mask = torch.cat([self.mask, self.mask.new_ones((self.size, 1))], dim=1)
        logits = self.runner.forward(tokens[:, None], mask, self.positions[:, None], self.cache)
        self.mask = mask
        self.positions = self.positions + 1
        return logits

    def extend(self, other: KVBatch) -> None:
        """Append ``other``'s rows after this batch's rows (both are consumed into ``self``)."""
        length = max(self.length, other.length)
        mine, theirs = _layers(self.cache), _layers(other.cache)
        for layer, other_layer in zip(mine, theirs, strict=True):
            layer.keys = torch.cat(
                [_left_pad(layer.keys, length), _left_pad(other_layer.keys, length)], dim=0
            )
            layer.values = torch.cat(
                [_left_pad(layer.values, length), _left_pad(other_layer.values, length)], dim=0
            )
        self.mask = torch.cat([_left_pad(self.mask, length), _left_pad(other.mask, length)], dim=0)
        self.positions = torch.cat([self.positions, other.positions])

    def select(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order), then trim columns that are padding everywhere."""
        index = torch.tensor(rows, dtype=torch.long)
        self.mask = self.mask.index_select(0, index)
        self.positions = self.positions.index_select(0, index)
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else self.length
        self.mask = self.mask[:, start:]
        for layer in _layers(self.cache):
            layer.keys = layer.keys.index_select(0, index)[:, :, start:, :]
            layer.values = layer.values.index_select(0, index)[:, :, start:, :]


def _kv_bytes_per_token(config: Any) -> int:
    """Float32 cache bytes per token per row: keys and values of every layer."""
    get = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(get, "num_hidden_layers", None) or getattr(get, "n_layer", 1)
    heads = getattr(get, "num_attention_heads", None) or getattr(get, "n_head", 1)
    kv_heads = getattr(get, "num_key_value_heads", None) or heads
    hidden = getattr(get, "hidden_size", None) or getattr(get, "n_embd", 1)
    head_dim = getattr(get, "head_dim", None) or hidden // heads
    return int(layers * 2 * kv_heads * head_dim * 4)


def _left_pad(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad a mask ``[rows, L]`` or cache tensor ``[rows, heads, L, dim]`` to ``length`` on the left."""
    axis = 1 if tensor.ndim == 2 else 2
    missing = length - tensor.shape[axis]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[axis] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=axis)


def _layers(cache: Any) -> list[Any]:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise UnsupportedModel("the batching engine needs transformers >= 4.56 (Cache.layers)")
    for layer in layers:
        if type(layer) is not DynamicLayer or not getattr(layer, "is_initialized", True):
            raise UnsupportedModel(
                f"the batching engine supports full-attention KV caches only, not {type(layer).__name__}"
            )
    return list(layers)
