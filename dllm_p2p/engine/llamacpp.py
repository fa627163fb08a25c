"""A second engine backend for GGUF files: llama.cpp's batched low-level API.

Why: on a CPU, a decode step of a small model is bound by reading its weights, and
PyTorch has no fast kernel for weights kept in 4 or 8 bits (docs/BENCHMARKS.md, "What did
not help"). llama.cpp has: it computes straight from the GGUF's quantized blocks. Measured
here on SmolLM2's Q4_1 file, one row: 30 tok/s on the lean decoder (float16 weights), 90 on
llama.cpp; eight rows: 128 against 170-220.

How it fits: ``Engine`` keeps doing the scheduling (queue, priorities, KV budget,
sampling, stop strings, streaming, cancellation); this module is one more ``runner``
beside ``batch.ModelRunner`` and ``batch.LeanRunner``, with the same batch contract
(``prefill``, ``step``, ``extend``, ``select``, ``close``). Every row is one llama.cpp
*sequence* in one context whose KV cache is a pool of cells shared by all sequences
(``kv_unified``): a row joins by decoding its prompt under a free sequence id and leaves by
removing that sequence's cells, so nothing is copied or padded, unlike the torch batches.
llama.cpp returns logits only for the positions asked for (each row's last), as float32,
which the engine samples from exactly as it does for the torch backends.

Weights: as in the file (``quantize="keep"``), or requantized once by llama.cpp into
``<cache>/<name>.<type>.gguf`` (``--quantize f16``, ``q8_0``, ...); see ``QUANT_TYPES``.
The KV cache is float16 and allocated when the context is made: the budget is resident
memory from the start, not a ceiling as for the torch backends.

The ``llama_cpp`` module comes from the ``llama-cpp-python`` package, which compiles
llama.cpp when installed (``make install`` does it; ``available()`` says why not).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models import QUANT_TYPES
from .errors import EngineError

log = logging.getLogger("dllm_p2p.engine.llamacpp")

#: ``auto`` requantizes to float16 only while the float16 weights stay this small.
AUTO_F16_BYTES = 1 << 30
#: Weight types llama.cpp computes without quantizing the activations.
FLOAT_TYPES = ("F32", "F16", "BF16")
#: Bytes per KV cell per layer and key/value head dimension: the cache is float16.
KV_BYTES = 2
#: Positions whose logits one scoring pass asks for at a time (bounds llama.cpp's output buffer).
SCORE_CHUNK = 64


class LlamaCppError(EngineError):
    """llama.cpp refused a model, a context or a batch."""


def available() -> str | None:
    """``None`` when llama.cpp can be used here, else why not (for messages and skips)."""
    try:
        _lib()
    except ImportError as exc:
        return (
            f"the llama.cpp backend needs the llama-cpp-python package ({exc}); `make install` builds it, "
            "or see README, 'The llama.cpp backend'"
        )
    except OSError as exc:  # the shared library failed to load (built for another CPU, ...)
        return f"llama.cpp's library does not load here: {exc}"
    return _built_for_another_cpu()


def _built_for_another_cpu() -> str | None:
    """Why the installed library would die with "Illegal instruction" on this CPU, or None
    (``llamacpp_build`` records the flags it compiled with beside the library)."""
    import json

    from .llamacpp_build import BUILD_INFO, built_for_missing_features

    info = Path(_lib().__file__).parent / "lib" / BUILD_INFO
    try:
        cmake = str(json.loads(info.read_text()).get("cmake_args", ""))
    except (OSError, ValueError, AttributeError):
        return None  # not built by us: trust it
    problem = built_for_missing_features(cmake)
    return f"llama.cpp's library cannot run here: {problem}; run `make llamacpp` to build it for this CPU" if problem else None


_LIB: Any = None
_LIB_LOCK = threading.Lock()
_LOG_CALLBACK: Any = None  # the ctypes callback must outlive every call into llama.cpp


def _lib() -> Any:
    """The ``llama_cpp`` module, its backend initialised and its log routed to ``logging`` once."""
    global _LIB, _LOG_CALLBACK
    with _LIB_LOCK:
        if _LIB is None:
            import llama_cpp

            @llama_cpp.llama_log_callback
            def route(level: int, text: bytes, user_data: Any) -> None:
                # llama.cpp narrates every load at length; keep warnings and errors, except the
                # one every context makes: its KV pool, shared by all rows, is longer than the
                # training context, which no single row ever exceeds (Engine caps it).
                message = text.decode(errors="replace").rstrip() if text else ""
                if level in (3, 4) and message and "n_ctx_seq" not in message:  # GGML_LOG_LEVEL_WARN, _ERROR
                    log.warning("llama.cpp: %s", message)

            llama_cpp.llama_log_set(route, ctypes.c_void_p(0))
            _LOG_CALLBACK = route
            llama_cpp.llama_backend_init()
            _LIB = llama_cpp
        return _LIB


class GgufModel:
    """A GGUF file loaded by llama.cpp (memory-mapped): what a context needs, and its facts."""

    def __init__(self, path: Path, *, quantized_from: Path | None = None, quantize: str = "keep") -> None:
        lib = _lib()
        self.path = path
        #: The file the user named (``path`` is its requantized copy when ``quantize`` is not "keep").
        self.source = quantized_from or path
        self.quantize = quantize
        params = lib.llama_model_default_params()
        params.n_gpu_layers = 0
        handle = lib.llama_model_load_from_file(str(path).encode(), params)
        if not handle:
            raise LlamaCppError(f"llama.cpp could not load {str(path)!r} (see the warnings above)")
        self._handle = handle
        self.n_params = int(lib.llama_model_n_params(handle))
        self.n_layer = int(lib.llama_model_n_layer(handle))
        self.n_ctx_train = int(lib.llama_model_n_ctx_train(handle))
        self.n_vocab = int(lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(handle)))
        embd, heads, kv_heads = (
            int(lib.llama_model_n_embd(handle)),
            int(lib.llama_model_n_head(handle)),
            int(lib.llama_model_n_head_kv(handle)),
        )
        #: KV-cache bytes one token takes in every layer (float16 keys and values).
        self.kv_bytes_per_token = self.n_layer * 2 * kv_heads * (embd // heads) * KV_BYTES
        self.size_bytes = int(lib.llama_model_size(handle))
        buffer = ctypes.create_string_buffer(256)
        lib.llama_model_desc(handle, buffer, len(buffer))
        #: llama.cpp's own description: architecture, size, file type ("llama ?B Q4_1").
        self.description = buffer.value.decode(errors="replace")
        #: The weights' type as llama.cpp names it ("Q4_1", "F16", "Q4_K - Medium", ...).
        parts = self.description.split(" ", 2)
        self.weights = parts[2] if len(parts) == 3 else self.description

    @property
    def handle(self) -> Any:
        if self._handle is None:
            raise LlamaCppError("the model was freed")
        return self._handle

    def close(self) -> None:
        if self._handle is not None:
            _lib().llama_model_free(self._handle)
            self._handle = None

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown order varies
        try:
            self.close()
        except Exception:
            pass


def auto_quantization(model: GgufModel) -> str:
    """What ``--quantize auto`` means for ``model``: "f16" when its weights are stored in fewer
    bits and 2 bytes per parameter stay within ``AUTO_F16_BYTES``, else "keep".

    Why, measured on SmolLM2-135M's Q4_1 file (docs/BENCHMARKS.md): llama.cpp multiplies
    quantized weights by activations it quantizes to 8 bits, and that moved the greedy answer
    to "What is the capital of France?" from "The capital of France is Paris." to
    "L'Étoile, la Marseillaise, ..." (top-1 agreement with float32 96.7% over a fixed text);
    float16 weights keep float32's answers (100%) and, at this size, decode about as fast
    for one row and faster for eight (262 against 194-212 tok/s). A large model is bound
    by memory bandwidth, where its quantized file is the faster one: kept as it is.
    """
    if model.weights.upper() in FLOAT_TYPES or model.n_params * 2 > AUTO_F16_BYTES:
        return "keep"
    return "f16"


def requantize(source: Path, kind: str, cache_dir: Path, say: Any = None) -> Path:
    """``source`` with every weight matrix in ``kind`` (see ``QUANT_TYPES``), written once to
    ``cache_dir`` (atomically: a temporary name, then renamed) and reused after that."""
    if kind not in QUANT_TYPES or kind in ("keep", "auto"):
        raise ValueError(f"unknown quantization {kind!r}; choose from {', '.join(QUANT_TYPES)}")
    lib = _lib()
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir / f"{source.stem}.{key}.{kind}.gguf"
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    if say:
        say(f"requantizing {source.name} to {kind} once (llama.cpp), into {cache_dir}")
    params = lib.llama_model_quantize_default_params()
    params.ftype = getattr(lib, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}")
    params.allow_requantize = True
    params.nthread = max(1, os.cpu_count() or 1)
    try:
        code = lib.llama_model_quantize(str(source).encode(), str(partial).encode(), params)
        if code != 0:
            raise LlamaCppError(f"llama.cpp could not requantize {str(source)!r} to {kind} (code {code})")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


#: What one ``llama_decode`` item is: (token, position, sequence id, whether its logits are wanted).
Item = tuple[int, int, int, bool]


def _new_context(model: GgufModel, *, cells: int, batch: int, rows: int, threads: int) -> Any:
    """A llama.cpp context over ``model``, set up alike for generation and for scoring, so that
    a scoring pass computes the way generation did: ``cells`` KV cells in one pool shared by
    ``rows`` sequences, at most ``batch`` tokens per ``llama_decode``, flash attention off."""
    lib = _lib()
    params = lib.llama_context_default_params()
    params.n_ctx = max(cells, 16)
    params.n_batch = batch
    params.n_ubatch = min(512, batch)
    params.n_seq_max = rows
    params.n_threads = params.n_threads_batch = threads
    params.kv_unified = True  # one pool of cells for every sequence, used as needed
    params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
    params.no_perf = True
    context = lib.llama_init_from_model(model.handle, params)
    if not context:
        raise LlamaCppError(
            f"llama.cpp could not make a context of {cells} KV cells for {rows} rows "
            f"({cells * model.kv_bytes_per_token / 2**20:.0f} MB): lower --kv-cache-mb or --max-concurrency"
        )
    return context


def _decode(context: Any, batch: Any, items: list[Item], vocab: int) -> torch.Tensor:
    """One ``llama_decode`` of ``items`` through ``batch`` (``llama_batch_init``'d large enough);
    returns the logits of the items that want them, in order, as float32 ``[n, vocab]``."""
    lib = _lib()
    batch.n_tokens = len(items)
    wanted = 0
    for i, (token, position, seq, want) in enumerate(items):
        batch.token[i] = token
        batch.pos[i] = position
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = want
        wanted += want
    code = lib.llama_decode(context, batch)
    if code != 0:
        # 1: no room in the KV cache; anything else: an error. Either way the batch failed.
        raise LlamaCppError(
            "llama.cpp found no room in its KV cache for this batch" if code == 1 else f"llama_decode failed (code {code})"
        )
    pointer = lib.llama_get_logits(context)
    return torch.from_numpy(np.ctypeslib.as_array(pointer, shape=(wanted, vocab)).copy())


class LlamaCppRunner:
    """The engine's view of one llama.cpp context: rows are sequences in a shared KV pool."""

    kind = "llamacpp"

    def __init__(self, model: GgufModel, *, max_rows: int, kv_cells: int, threads: int | None = None) -> None:
        lib = _lib()
        self.model = model
        self.dtype = model.weights
        self.kv_bytes_per_token = model.kv_bytes_per_token
        self.threads = threads or torch.get_num_threads()
        # n_batch = the whole pool: a prefill of any admitted prompts goes in one llama_decode.
        cells = max(kv_cells, 16)
        self._context = _new_context(model, cells=cells, batch=cells, rows=max_rows, threads=self.threads)
        self._memory = lib.llama_get_memory(self._context)
        self.kv_cells = int(lib.llama_n_ctx(self._context))
        self._batch = lib.llama_batch_init(self.kv_cells, 0, 1)
        self._free_ids = list(range(max_rows - 1, -1, -1))  # sequence ids not used by a live row
        self._lock = threading.Lock()

    # --- the batch contract ------------------------------------------------------------

    def prefill(self, prompts: list[list[int]], pad_id: int) -> tuple[LlamaCppBatch, torch.Tensor]:
        if len(prompts) > len(self._free_ids):
            raise LlamaCppError(f"{len(prompts)} new rows, {len(self._free_ids)} free sequence ids")
        ids = [self._free_ids.pop() for _ in prompts]
        try:
            logits = self._decode(
                [(token, position, seq, position == len(prompt) - 1)
                 for seq, prompt in zip(ids, prompts, strict=True)
                 for position, token in enumerate(prompt)]
            )
        except BaseException:
            self._release(ids)
            raise
        return LlamaCppBatch(self, ids, [len(p) for p in prompts]), logits

    def _decode(self, items: list[Item]) -> torch.Tensor:
        if len(items) > self.kv_cells:
            raise LlamaCppError(f"{len(items)} tokens in one pass, at most {self.kv_cells}")
        with self._lock:
            return _decode(self._context, self._batch, items, self.model.n_vocab)

    def _release(self, ids: list[int]) -> None:
        lib = _lib()
        with self._lock:
            for seq in ids:
                lib.llama_memory_seq_rm(self._memory, seq, -1, -1)
                self._free_ids.append(seq)

    # --- scoring -------------------------------------------------------------------------

    def logits(self, ids: list[int]) -> torch.Tensor:
        """Float32 logits ``[len(ids), vocab]`` of one sequence, in a context of its own (so it
        may run beside the scheduler), asking for ``SCORE_CHUNK`` positions at a time."""
        lib = _lib()
        context = _new_context(self.model, cells=len(ids), batch=SCORE_CHUNK, rows=1, threads=self.threads)
        batch = lib.llama_batch_init(SCORE_CHUNK, 0, 1)
        try:
            return torch.cat([
                _decode(context, batch, [(token, start + i, 0, True) for i, token in enumerate(ids[start : start + SCORE_CHUNK])], self.model.n_vocab)
                for start in range(0, len(ids), SCORE_CHUNK)
            ])
        finally:
            lib.llama_batch_free(batch)
            lib.llama_free(context)

    def close(self) -> None:
        lib = _lib()
        with self._lock:
            if self._context is not None:
                lib.llama_batch_free(self._batch)
                lib.llama_free(self._context)
                self._context = None


class LlamaCppBatch:
    """Running rows as llama.cpp sequences: ``seqs[i]`` is row i's sequence id, ``lengths[i]``
    its tokens so far (the position of its next token)."""

    def __init__(self, runner: LlamaCppRunner, seqs: list[int], lengths: list[int]) -> None:
        self.runner = runner
        self.seqs = seqs
        self.lengths = lengths

    @property
    def size(self) -> int:
        return len(self.seqs)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (``[rows]``); return the next-token logits ``[rows, vocab]``."""
        items = [(int(token), length, seq, True) for token, length, seq in zip(tokens.tolist(), self.lengths, self.seqs, strict=True)]
        logits = self.runner._decode(items)
        self.lengths = [length + 1 for length in self.lengths]
        return logits

    def extend(self, other: LlamaCppBatch) -> None:
        """Take ``other``'s rows after this batch's: their sequences are already in the pool."""
        self.seqs = self.seqs + other.seqs
        self.lengths = self.lengths + other.lengths
        other.seqs, other.lengths = [], []

    def select(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order); the others' cells go back to the pool."""
        kept = set(rows)
        self.runner._release([seq for row, seq in enumerate(self.seqs) if row not in kept])
        self.seqs = [self.seqs[row] for row in rows]
        self.lengths = [self.lengths[row] for row in rows]

    def close(self) -> None:
        """Give every row's sequence back (the engine dropped the whole batch)."""
        self.select([])
