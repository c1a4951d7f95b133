"""Packed linears: on CPU in float32, decode steps' linear layers multiply by weights that MKL packed once
(`packed_linears`, a context around generation)."""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch

PACKED_MIN_BATCH = 4


@contextmanager
def packed_linears(model, batch_size: int):
    """Within this context, on CPU in float32, the linear layers multiply a decode step's `batch_size` rows by
    weights that MKL packed once for its GEMM kernel (`torch.ops.mkl._mkl_linear`, the op torch's inductor uses for
    the same purpose), instead of `F.linear`, whose MKL call re-packs the transposed weight at every call. Any
    other row count (prefill, a teacher-forced forward) takes the plain `F.linear`. A packed decode step is faster
    than a plain one from a few rows on and slower at batch 1 (measured by `bench/packed_linears.py`), hence only
    from batch `PACKED_MIN_BATCH` on. Results differ from `F.linear`'s by float32 rounding at most (as results at
    different batch sizes already do). Cost: each packed weight is kept on its module (`_mkl_packed`) for reuse by
    later batches, about the weights' size again (peak memory measured by `bench/capture.py`). Packed lazily, so
    layers that never run (Mllama's vision tower) are not packed."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and "forward" not in m.__dict__
               and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32]
    if batch_size < PACKED_MIN_BATCH or not linears or not _mkl_linear_available():
        yield
        return
    for module in linears:
        module.forward = functools.partial(_packed_linear, module, batch_size)
    try:
        yield
    finally:
        for module in linears:
            del module.forward


@functools.cache
def _mkl_linear_available() -> bool:
    try:
        return torch.backends.mkl.is_available() and callable(torch.ops.mkl._mkl_linear)
    except (AttributeError, RuntimeError):
        return False


def _packed_linear(module: torch.nn.Linear, batch_size: int, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    if rows != batch_size or torch.is_grad_enabled():
        return torch.nn.functional.linear(x, module.weight, module.bias)
    packed = module.__dict__.get("_mkl_packed")
    if packed is None or packed[0] != batch_size:  # the batch size is part of MKL's packing
        packed = (batch_size, torch.ops.mkl._mkl_reorder_linear_weight(module.weight, batch_size))
        module._mkl_packed = packed
    out = torch.ops.mkl._mkl_linear(x.reshape(rows, x.shape[-1]), packed[1], module.weight, module.bias, batch_size)
    return out.view(*x.shape[:-1], out.shape[-1])
