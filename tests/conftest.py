import pytest
import torch

import mergekernels as mk

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Awkward shapes: one element, odd sizes, a size that is not a multiple of the 4-element Philox quad
# or the 1024-element CPU block, and a matrix.
SHAPES = [(1,), (7,), (1027,), (3, 5, 7), (33, 65), (2, 2051)]

# bf16 / fp16 / fp32 relative spacing: outputs may differ from a float64 reference by one rounding.
ULP = {torch.float32: 2.0**-22, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}

cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and mk.has_cuda_kernels()),
    reason="needs a CUDA device and the CUDA kernels",
)


def make_inputs(k, shape, dtype=torch.float32, seed=0, device="cpu", delta=0.01):
    """Fresh random base and fine-tuned tensors (never zeros); deltas ~ N(0, delta)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    fts = [base + delta * torch.randn(shape, generator=g) for _ in range(k)]
    return base.to(device=device, dtype=dtype), [x.to(device=device, dtype=dtype) for x in fts]


def assert_close_to_ref(out, ref, dtype=None):
    """out (kernel) vs the float64 reference rounded to the output dtype: at most ~1 rounding."""
    dtype = dtype or out.dtype
    assert out.dtype == ref.dtype, (out.dtype, ref.dtype)
    assert out.shape == ref.shape
    o, r = out.detach().cpu().double(), ref.double()
    assert torch.isfinite(o).all()
    tol = 2 * ULP[dtype] * r.abs() + 1e-6
    bad = (o - r).abs() > tol
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} differ; max {(o - r).abs().max().item():.3g}"


def write_layer_models(root, layers: int, shape, experts: int = 2, seed: int = 0) -> list:
    """A base (``root/base``) and ``experts`` fine-tuned copies (``root/e1`` ...) of ``layers`` bf16
    ``layers.i.weight`` tensors of ``shape``, one model.safetensors each: checkpoints for merges run
    as commands. Returns their directories, the base first."""
    from pathlib import Path

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    base = {f"layers.{i}.weight": torch.randn(shape, generator=g).to(torch.bfloat16) for i in range(layers)}
    paths = []
    for who in ["base"] + [f"e{i}" for i in range(1, experts + 1)]:
        sd = {n: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype) for n, v in base.items()}
        directory = Path(root) / who
        directory.mkdir()
        save_file(base if who == "base" else sd, str(directory / "model.safetensors"))
        paths.append(directory)
    return paths
