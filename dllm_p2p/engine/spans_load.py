"""Loading a *span* of a model's decoder layers: only the weights that span needs.

A worker serving ``--layers START:END`` holds decoder layers ``START..END-1``; the span
that holds layer 0 also holds the token embeddings (and whatever else sits before the
layers, such as GPT-2's position embeddings), and the span that holds the last layer the
final norm and the LM head. The model object keeps its full shape, so code written for a
whole model finds every module where it expects it, but each parameter and buffer outside
the span is on the ``meta`` device and costs no memory.

Only what the span needs is read, one tensor at a time, into a skeleton built on ``meta``:

* GGUF files are memory-mapped and only the span's tensors dequantized, with transformers'
  own per-architecture tensor processor and name map, so the values are exactly those of
  ``from_pretrained(gguf_file=...)``;
* ``*.safetensors`` checkpoints (one file or sharded) are opened with ``safe_open`` and
  only the span's keys read;
* anything else (models built in code, ``.bin`` checkpoints, architectures whose GGUF
  tensors are not one-to-one) is loaded whole, then cut down to the span.

A span model can still be fingerprinted as the whole model it is part of: its
``TensorSource`` hands out the missing tensors one at a time (see ``fingerprint.compute``).

This module imports torch and transformers lazily and nothing from ``loading``.
"""

from __future__ import annotations

import ctypes
import gc
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

Span = tuple[int, int]

#: Attribute names of the final norm in the module that holds the decoder layers.
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f", "final_norm")

_INT = re.compile(r"[+-]?\d+")


class SpanError(ValueError):
    """A malformed or empty span of layers."""


class Unsupported(Exception):
    """This checkpoint or model cannot be read a span at a time; load it whole instead."""


# ---------------------------------------------------------------------------- spans


def parse_layers(text: str, total: int) -> Span:
    """``"START:END"`` over ``total`` decoder layers, with Python slice semantics, as
    ``(start, end)`` with ``0 <= start < end <= total``.

    Either end may be omitted or negative: ``"10:"``, ``":20"``, ``"-10:"``, ``"3:-3"``.
    ``SpanError`` (a ``ValueError``) for anything else (a step, a non-integer) and for an empty span.
    """
    if not isinstance(text, str):
        raise SpanError(f"layers must be a string like '0:10', not {text!r}")
    if total <= 0:
        raise SpanError(f"the model has no decoder layers to select from ({total})")
    parts = text.strip().split(":")
    if len(parts) != 2:
        raise SpanError(
            f"layers {text!r}: expected START:END over the model's {total} decoder layers "
            "(Python slice semantics without a step, e.g. 0:10, 10:, :20, -10:)"
        )
    bounds: list[int | None] = []
    for part in parts:
        part = part.strip()
        if not part:
            bounds.append(None)
        elif _INT.fullmatch(part):
            bounds.append(int(part))
        else:
            raise SpanError(f"layers {text!r}: {part!r} is not an integer layer index")
    return _checked(slice(*bounds), total, text)


def resolve_span(layers: str | tuple[int, int], total: int) -> Span:
    """``layers`` as given to ``load_model`` (``"START:END"`` or a ``(start, end)`` pair, both
    with slice semantics) as a non-empty ``(start, end)`` within ``total`` layers."""
    if isinstance(layers, str):
        return parse_layers(layers, total)
    try:
        start, end = layers
    except (TypeError, ValueError):
        raise SpanError(f"layers must be 'START:END' or a (start, end) pair, not {layers!r}") from None
    for value in (start, end):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise SpanError(f"layers {layers!r}: {value!r} is not an integer layer index")
    if total <= 0:
        raise SpanError(f"the model has no decoder layers to select from ({total})")
    return _checked(slice(start, end), total, f"{start}:{end}")


def _checked(bounds: slice, total: int, text: str) -> Span:
    start, end, _ = bounds.indices(total)
    if start >= end:
        raise SpanError(f"layers {text!r} select none of the model's {total} decoder layers (0:{total})")
    return start, end


class SpanPlan:
    """Which tensors of a model a span keeps, by state-dict name."""

    def __init__(self, model: Any, span: Span) -> None:
        import torch.nn as nn

        total = int(model.config.num_hidden_layers)
        self.start, self.end = span
        self.total = total
        candidates = [
            name
            for name, module in model.named_modules()
            if isinstance(module, nn.ModuleList) and len(module) == total and name
        ]
        if not candidates:
            raise Unsupported(f"could not find the model's {total} decoder layers (a ModuleList of that length)")
        layers_name = min(candidates, key=lambda name: (name.count("."), len(name)))
        self.layers_prefix = layers_name + "."
        owner = model.get_submodule(layers_name.rpartition(".")[0]) if "." in layers_name else model
        owner_prefix = layers_name.rpartition(".")[0] + "." if "." in layers_name else ""
        last = []
        for name in FINAL_NORM_NAMES:
            if isinstance(getattr(owner, name, None), nn.Module):
                last.append(f"{owner_prefix}{name}.")
                break
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is not None:
            last += [f"{name}." for name, module in model.named_modules(remove_duplicate=False) if module is head]
        self.last_prefixes = tuple(last)

    @property
    def span(self) -> Span:
        return self.start, self.end

    def layer_of(self, name: str) -> int | None:
        """The decoder layer a tensor belongs to, or None if it is outside the layers."""
        if not name.startswith(self.layers_prefix):
            return None
        return int(name[len(self.layers_prefix) :].split(".", 1)[0])

    def keeps(self, name: str) -> bool:
        """Whether the span holds the parameter or persistent buffer ``name``."""
        layer = self.layer_of(name)
        if layer is not None:
            return self.start <= layer < self.end
        if name.startswith(self.last_prefixes):
            return self.end == self.total
        return self.start == 0

    def keeps_module_buffers(self, module_name: str) -> bool:
        """Non-persistent buffers (computed, like rotary frequencies) stay real everywhere
        except inside layers outside the span."""
        layer = self.layer_of(module_name + ".")
        return layer is None or self.start <= layer < self.end


def _tensor_slots(model: Any):
    """``(full name, module, attribute, is_parameter, persistent)`` for every parameter
    and buffer slot of every module (a tied parameter appears once per module holding it)."""
    for module_name, module in model.named_modules():
        prefix = module_name + "." if module_name else ""
        for attr, value in module._parameters.items():
            if value is not None:
                yield prefix + attr, module_name, module, attr, True, True
        for attr, value in module._buffers.items():
            if value is not None:
                persistent = attr not in module._non_persistent_buffers_set
                yield prefix + attr, module_name, module, attr, False, persistent


def _needed(plan: SpanPlan, name: str, module_name: str, persistent: bool) -> bool:
    return plan.keeps(name) if persistent else plan.keeps_module_buffers(module_name)


# ---------------------------------------------------------------- cutting a whole model


def cut_to_span(model: Any, span: Span) -> Any:
    """Move every parameter and buffer of ``model`` that ``span`` does not need to ``meta``
    (in place; returns ``model``), then hand the freed memory back to the system."""
    import torch
    import torch.nn as nn

    plan = SpanPlan(model, span)
    for name, module_name, module, attr, is_param, persistent in list(_tensor_slots(model)):
        if _needed(plan, name, module_name, persistent):
            continue
        value = getattr(module, attr)
        if value.is_meta:
            continue
        empty = torch.empty_like(value, device="meta")
        if is_param:
            module._parameters[attr] = nn.Parameter(empty, requires_grad=value.requires_grad)
        else:
            module._buffers[attr] = empty
    release_memory()
    return model


def release_memory() -> None:
    """Collect garbage and ask glibc to return freed heap pages to the system."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


# ------------------------------------------------------------------- tensor sources


class TensorSource:
    """Tensors of the whole model by state-dict name, as a full load would hold them
    (float32 where floating point, on the CPU), read one at a time.

    ``close()`` releases whatever the source keeps open (a file mapping, a whole model);
    the source reopens it if called again.
    """

    def names(self) -> set[str]:
        raise NotImplementedError

    def __call__(self, name: str) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        pass


class AliasedSource(TensorSource):
    """A source that also answers to the other names of tied tensors (``lm_head.weight``
    for ``model.embed_tokens.weight`` when the checkpoint stores only the embeddings)."""

    def __init__(self, inner: TensorSource, groups: list[list[str]]) -> None:
        self.inner = inner
        available = inner.names()
        self.alias: dict[str, str] = {}
        for group in groups:
            stored = next((name for name in group if name in available), None)
            if stored is not None:
                for name in group:
                    self.alias[name] = name if name in available else stored

    def names(self) -> set[str]:
        return set(self.alias)

    def __call__(self, name: str) -> Any:
        if name not in self.alias:
            raise KeyError(f"the checkpoint has no tensor for {name!r}")
        return self.inner(self.alias[name])

    def close(self) -> None:
        self.inner.close()


class ReloadSource(TensorSource):
    """The whole model, loaded again on first use (for models that cannot be read a
    tensor at a time); ``close()`` drops it."""

    def __init__(self, load: Callable[[], Any]) -> None:
        self._load = load
        self._state: dict[str, Any] | None = None

    def _state_dict(self) -> dict[str, Any]:
        if self._state is None:
            self._state = self._load().state_dict()
        return self._state

    def names(self) -> set[str]:
        return set(self._state_dict())

    def __call__(self, name: str) -> Any:
        return self._state_dict()[name]

    def close(self) -> None:
        if self._state is not None:
            self._state = None
            release_memory()


class SafetensorsSource(TensorSource):
    """Keys of one or more ``*.safetensors`` files (a sharded checkpoint's shards)."""

    def __init__(self, files: list[Path]) -> None:
        from safetensors import safe_open

        self._where: dict[str, Path] = {}
        for path in files:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    self._where[key] = path

    def names(self) -> set[str]:
        return set(self._where)

    def __call__(self, name: str) -> Any:
        import torch
        from safetensors import safe_open

        with safe_open(str(self._where[name]), framework="pt", device="cpu") as handle:
            tensor = handle.get_tensor(name)
        if tensor.is_floating_point() and tensor.dtype != torch.float32:
            return tensor.to(torch.float32)
        return tensor.clone()  # its own memory, not the file's


def safetensors_files(source: str, *, local_files_only: bool) -> list[Path] | None:
    """The ``*.safetensors`` files of a directory or hub model (its shards when there is an
    index), or None if it has none."""
    from transformers.utils import cached_file

    def find(filename: str) -> str | None:
        try:
            return cached_file(
                source, filename, local_files_only=local_files_only, _raise_exceptions_for_missing_entries=False
            )
        except OSError:
            return None

    index = find("model.safetensors.index.json")
    if index is not None:
        shards = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
        paths = [find(shard) for shard in shards]
        if any(path is None for path in paths):
            return None
        return [Path(path) for path in paths if path is not None]
    single = find("model.safetensors")
    return [Path(single)] if single is not None else None


#: Transformers' GGUF tensor processors whose output is one tensor per input tensor, under
#: the same name (the mixture-of-experts ones merge tensors and are loaded whole instead).
_ONE_TO_ONE_PROCESSORS = ("TensorProcessor", "LlamaTensorProcessor")

#: ``get_gguf_hf_weights_map``'s own translation of transformers model types to gguf's.
_GGUF_MODEL_TYPES = {
    "cohere": "command-r",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
    "gemma3_text": "gemma3",
    "gemma4_text": "gemma4",
    "umt5": "t5",
    "minimax_m2": "minimax-m2",
    "gpt_oss": "gpt-oss",
}


class GgufSource(TensorSource):
    """A GGUF file's tensors under transformers' names, dequantized one at a time exactly as
    ``from_pretrained(gguf_file=...)`` does (transformers' legacy GGUF path: ``gguf``'s
    ``dequantize``, then the architecture's tensor processor, then float32).

    The file is memory-mapped: only the pages of the tensors asked for are read.
    """

    def __init__(self, path: Path, skeleton: Any) -> None:
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        self.path = Path(path)
        self._table: dict[str, tuple[Any, int]] | None = None
        architecture = self._architecture()
        try:
            from transformers.integrations.gguf.utils import is_gguf_arch_supported

            if is_gguf_arch_supported(architecture):
                raise Unsupported(f"transformers loads {architecture!r} GGUF files through its packed-weights path")
        except ImportError:
            pass
        processor_class = TENSOR_PROCESSORS.get(architecture, TensorProcessor)
        if processor_class.__name__ not in _ONE_TO_ONE_PROCESSORS:
            raise Unsupported(f"{architecture!r} GGUF tensors are not one-to-one with the model's")
        self.processor = processor_class(config=skeleton.config.to_dict())
        self.gguf_to_hf = gguf_hf_weights_map(skeleton, self.processor)
        self.hf_to_gguf: dict[str, str] = {}
        table = self._tensors()
        for gguf_name in table:
            hf_name = self.gguf_to_hf.get(gguf_name)
            if hf_name is not None:
                self.hf_to_gguf[hf_name] = gguf_name

    def _architecture(self) -> str:
        try:
            from transformers.integrations.gguf.reader import read_gguf_metadata
        except ImportError:
            from gguf import GGUFReader
            from transformers.modeling_gguf_pytorch_utils import read_field

            return str(read_field(GGUFReader(str(self.path)), "general.architecture")[0])
        metadata, _ = read_gguf_metadata(str(self.path))
        return str(metadata["general.architecture"])

    def _tensors(self) -> dict[str, tuple[Any, int]]:
        if self._table is None:
            self._table = gguf_tensor_table(self.path)
        return self._table

    def names(self) -> set[str]:
        return set(self.hf_to_gguf)

    def __call__(self, name: str) -> Any:
        import numpy as np
        import torch
        from gguf import dequantize

        gguf_name = self.hf_to_gguf[name]
        data, ggml_type = self._tensors()[gguf_name]
        weights = dequantize(data, ggml_type)
        result = self.processor.process(
            weights=weights, name=gguf_name, tensor_key_mapping=self.gguf_to_hf, parsed_parameters={"tensors": {}}
        )
        if result.weights is None or result.name != gguf_name:
            raise Unsupported(f"the GGUF tensor processor did not map {gguf_name!r} to one tensor")
        weights = result.weights
        if not weights.flags.writeable or not weights.flags.c_contiguous:
            weights = np.copy(weights)  # off the file's (read-only) mapping
        return torch.from_numpy(weights).to(torch.float32)

    def close(self) -> None:
        self._table = None  # unmaps the file once its views are gone


def gguf_tensor_table(path: Path, *, fast: bool = True) -> dict[str, tuple[Any, int]]:
    """``{gguf name: (raw data, ggml type)}`` for a GGUF file, memory-mapped, nothing read.

    The data is what ``gguf.dequantize`` takes: rows of bytes (uint8, one row per
    innermost-dimension vector). ``fast`` reads only the tensor table with transformers'
    ``GgufHeader`` (20 ms for SmolLM2); otherwise, or if that is unavailable, ``gguf``'s
    ``GGUFReader``, which also parses all metadata (3 s for SmolLM2's 49k-token vocabulary).
    """
    import numpy as np

    header_class = None
    if fast:
        try:
            from transformers.integrations.gguf.reader import GgufHeader as header_class
        except ImportError:
            header_class = None
    if header_class is None:
        from gguf import GGUFReader

        reader = GGUFReader(str(path), "r")
        return {tensor.name: (tensor.data, int(tensor.tensor_type)) for tensor in reader.tensors}
    header = header_class.from_file(str(path))
    blob = np.memmap(str(path), mode="r", dtype=np.uint8)
    table = {}
    for info in header.tensors:
        start = header.data_start + info.offset
        raw = blob[start : start + info.nbytes]
        rows = 1
        for size in info.shape[:-1]:
            rows *= size
        table[info.name] = (raw.reshape(*info.shape[:-1], info.nbytes // rows), int(info.ggml_type))
    return table


def gguf_hf_weights_map(model: Any, processor: Any) -> dict[str, str]:
    """``{gguf tensor name: state-dict name}``: transformers' ``get_gguf_hf_weights_map``,
    computed the same way but building gguf's tensor name map once instead of once per
    module (which takes 6 s for SmolLM2's 397 modules)."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    model_type = model.config.model_type
    model_type = _GGUF_MODEL_TYPES.get(model_type, model_type)
    arch = next((key for key, value in MODEL_ARCH_NAMES.items() if value == model_type), None)
    if arch is None:
        raise Unsupported(f"gguf does not know the model type {model_type!r}")
    name_map = get_tensor_name_map(arch, model.config.num_hidden_layers)

    def walk(module: Any, qual_name: str) -> dict[str, str]:
        mapping: dict[str, str] = {}
        for hf_name in module.state_dict():
            hf_name = processor.preprocess_name(hf_name)
            name, suffix = hf_name, ""
            if hf_name.endswith(".weight") or hf_name.endswith(".bias"):
                name, suffix = hf_name.rsplit(".", 1)
                suffix = "." + suffix
            gguf_name = name_map.get_name(name)
            if gguf_name is None:
                processor.perform_fallback_tensor_mapping(mapping, suffix, qual_name, hf_name)
                continue
            mapping[gguf_name + suffix] = qual_name + hf_name
        for child_name, child in module.named_children():
            sub_map = walk(child, f"{qual_name}{child_name}.")
            mapping.update({k: v for k, v in sub_map.items() if k not in mapping})
        return mapping

    return walk(model, "")


# ------------------------------------------------------------------ filling a skeleton


def meta_skeleton(config: Any) -> Any:
    """The causal LM for ``config`` in float32, every tensor on ``meta``."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def tie_groups(model: Any) -> list[list[str]]:
    """State-dict names grouped by the tensor they share (tied weights share one)."""
    groups: dict[int, list[str]] = {}
    for name, value in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(value), []).append(name)
    return list(groups.values())


def fill_span(model: Any, span: Span, source: TensorSource) -> Any:
    """Give the ``meta`` skeleton ``model`` real tensors for everything ``span`` needs,
    read from ``source`` one at a time; recompute its non-persistent buffers outside the
    layers (rotary frequencies). ``Unsupported`` if something needed cannot be had."""
    import torch
    import torch.nn as nn

    plan = SpanPlan(model, span)
    available = source.names()
    made: dict[int, Any] = {}  # skeleton tensor -> its real one, so tied names stay tied
    rebuild: set[str] = set()
    for name, module_name, module, attr, is_param, persistent in list(_tensor_slots(model)):
        if not _needed(plan, name, module_name, persistent):
            continue
        skeleton = getattr(module, attr)
        if not persistent:
            rebuild.add(module_name)
            continue
        if id(skeleton) not in made:
            if name not in available:
                raise Unsupported(f"the checkpoint has no tensor for {name!r}")
            tensor = source(name)
            if tuple(tensor.shape) != tuple(skeleton.shape):
                raise Unsupported(f"{name!r} is {tuple(tensor.shape)} in the checkpoint, {tuple(skeleton.shape)} in the model")
            if tensor.is_floating_point() != skeleton.is_floating_point():
                raise Unsupported(f"{name!r} is {tensor.dtype} in the checkpoint, {skeleton.dtype} in the model")
            made[id(skeleton)] = nn.Parameter(tensor, requires_grad=skeleton.requires_grad) if is_param else tensor
        if is_param:
            module._parameters[attr] = made[id(skeleton)]
        else:
            module._buffers[attr] = made[id(skeleton)]
    for module_name in sorted(rebuild):
        module = model.get_submodule(module_name)
        if any(True for _ in module.parameters()) or any(
            attr not in module._non_persistent_buffers_set for attr in module._buffers
        ):
            raise Unsupported(f"{module_name!r} mixes loaded tensors with computed buffers")
        try:
            with torch.device("cpu"):
                fresh = type(module)(config=model.config)
        except Exception as exc:
            raise Unsupported(f"cannot recompute the buffers of {module_name!r} ({type(module).__name__}): {exc}") from exc
        model.set_submodule(module_name, fresh.eval())
    for name, module_name, module, attr, _, persistent in _tensor_slots(model):
        if _needed(plan, name, module_name, persistent) and getattr(module, attr).is_meta:
            raise Unsupported(f"{name!r} is still missing")
    return model
