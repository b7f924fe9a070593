"""--deterministic: CUDA kernels that give the same bits on every run, so that a resumed CUDA run ends bit-identical
to an uninterrupted one, as it always does on the CPU.

Without it a CUDA run is reproducible in everything but floating-point rounding: cuDNN autotuning may pick other
convolution algorithms in another process, and kernels that accumulate with atomics (the cross-entropy's sum among
them) add in a varying order. With it, PyTorch's deterministic algorithms are required (an operation without one
raises instead of running), cuDNN autotuning is off, and cuBLAS gets a fixed workspace; engine.py computes the
cross-entropy without the atomic kernel. It costs speed, so it is off by default.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch

from errors import UserError


@contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """Within the block, deterministic algorithms only (when ``enabled``); the previous settings come back after."""
    if not enabled:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS reads it when it starts, before any matmul
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if "deterministic implementation" in line]
        if not lines:
            raise
        operation = lines[0].removeprefix("RuntimeError: ").split(". ")[0]
        raise UserError(f"--deterministic: {operation} (PyTorch {torch.__version__}); run (or --resume) with "
                        "--no-deterministic, which keeps everything exact except the last bits on CUDA") from None
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def cudnn_autotuning(device: torch.device) -> bool:
    """cuDNN benchmarks convolution algorithms on CUDA (faster steps), unless deterministic algorithms are on."""
    return device.type == "cuda" and not torch.are_deterministic_algorithms_enabled()
