"""Float32 matrix-product precision for the closed-form methods, set for their products alone.

``torch.set_float32_matmul_precision("high")`` (TF32 on CUDA) is a process-wide setting that a
user's training code often leaves on. The closed-form merges promise full float32 unless asked
for TF32, so they set the precision around their own products and restore the caller's after.
"""

from __future__ import annotations

import contextlib
import functools

import torch


@contextlib.contextmanager
def float32_matmul(tf32: bool = False):
    """Inside the block, float32 matrix products run in full float32 (``tf32=False``) or may use
    TF32 tensor cores on CUDA (``tf32=True``), whatever the global setting; it is restored after."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def full_float32(function):
    """Decorator: the function's float32 matrix products run in full float32."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with float32_matmul(False):
            return function(*args, **kwargs)

    return wrapper
