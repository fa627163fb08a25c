"""Weight storage for the lean decoder's linear layers: float32, or float16 through FBGEMM.

A decode step of a small model on a CPU reads every weight once per step, so its speed
follows the bytes of weights read. Float16 weights halve those bytes; FBGEMM's fp16 GEMM
(``quantized::linear_dynamic_fp16``, in PyTorch's x86 builds) converts them to float32
in registers and computes in float32, so the answers match float32 weights to within
rounding (docs/BENCHMARKS.md: top-1 agreement and perplexity on a fixed text).

Measured here and rejected: int8 weights with FBGEMM's dynamic int8 GEMM, which quantizes
activations per tensor to 7 bits on CPUs without VNNI (top-1 agreement with float32 fell
to 46%), and ``_weight_int8pack_mm`` / ``_weight_int4pack_mm_for_cpu``, whose bfloat16
arithmetic is emulated on CPUs without AVX512-BF16 and was slower than float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: ``--dtype`` choices for the lean decoder's weights.
WEIGHT_DTYPES = ("float32", "float16")


class Linear:
    """``y = x W^T + b`` for ``x`` of any leading shape (float32 in, float32 out)."""

    nbytes: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: str) -> Linear:
    if dtype == "float32":
        return Dense(weight, bias)
    if dtype == "float16":
        return Half(weight, bias)
    raise ValueError(f"unknown weight dtype {dtype!r}; choose from {', '.join(WEIGHT_DTYPES)}")


def float16_available() -> bool:
    """Whether this PyTorch build has FBGEMM's fp16 GEMM (x86 builds do)."""
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
        torch.ops.quantized, "linear_prepack_fp16"
    )


class Dense(Linear):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight = weight.float().contiguous()
        self.bias = bias.float().contiguous() if bias is not None else None
        self.nbytes = 4 * (self.weight.numel() + (self.bias.numel() if self.bias is not None else 0))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Half(Linear):
    """Float16 weights packed for FBGEMM; float32 activations and arithmetic."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self._packed = torch.ops.quantized.linear_prepack_fp16(
            weight.float().contiguous(), bias.float().contiguous() if bias is not None else None
        )
        self.nbytes = 2 * weight.numel() + (4 * bias.numel() if bias is not None else 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(x, self._packed)
