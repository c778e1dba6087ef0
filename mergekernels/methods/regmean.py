"""RegMean (Jin et al. 2023): merge linear layers by regression on each expert's inputs.

For a linear layer y = x W^T (W out x in, as nn.Linear stores it) and input Grams
G_t = X_t^T X_t / #tokens (in x in) of each expert on its own task, RegMean minimises
sum_t ||X_t W^T - X_t W_t^T||^2 with the Grams' off-diagonals shrunk by r:
G~_t = r G_t + (1 - r) diag(G_t). The minimiser is

    W* = (sum_t W_t G~_t)(sum_t G~_t)^{-1}
       = W_mean + (sum_t (W_t - W_mean) G~_t)(sum_t G~_t)^+,

the second form being the one computed: it is the same matrix when sum_t G~_t is invertible,
and otherwise the minimiser closest to the plain mean W_mean (an input feature no expert ever
saw keeps the mean of its columns). It also makes the identity "equal Grams give the plain mean"
exact up to rounding. The Grams and right-hand side are float64; the solve is
:func:`mergekernels.methods.wudi.pinv_solve` (float64 Cholesky via ``spd_solve``, exact
eigendecomposition route for singular or ill-conditioned sums).

RegMean works on full weights, so ``base`` only fixes the output's dtype, device and shape. Tensors
without Grams (biases, norms, embeddings) and tensors that are not 2-D merge as the mean of the
fine-tuned weights.

:func:`collect_input_grams` computes the Grams with forward hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from .. import _ops
from ..precision import full_float32
from .wudi import check_batched, mean_merge, pinv_solve


def _check_reduction(reduction: float) -> float:
    reduction = float(reduction)
    if not 0.0 <= reduction <= 1.0:
        raise ValueError(f"regmean: reduction must lie in [0, 1], got {reduction}")
    return reduction


@full_float32
def regmean_batched(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    grams: Sequence[torch.Tensor],
    *,
    reduction: float = 0.95,
    transposed: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """RegMean on a batch of same-shape linear weights.

    Args:
        base: [L, out, in]; only its dtype, device and shape are used.
        finetuned: the experts' full weights W_1..W_T, each [L, out, in].
        grams: one input Gram per expert, each [L, in, in] (X_t^T X_t / #tokens of layer l on
            expert t's data, e.g. from :func:`collect_input_grams`); any float dtype, any device.
        reduction: r, the factor on the Grams' off-diagonal entries (default 0.95, the paper's
            value for CLIP; FusionBench uses 0.6 for GPT-2). r = 1 keeps the Grams as they are.
        transposed: weights are stored in x out (used as x @ W, like GPT-2's Conv1D) instead of
            out x in; the Grams are then over the first dimension. Default False.
        out_dtype: dtype of the result (default: base's dtype).

    Returns:
        The merged [L, out, in] weights on base's device.
    """
    reduction = _check_reduction(reduction)
    p = check_batched(base, finetuned, "regmean_batched")
    if isinstance(grams, torch.Tensor) or grams is None:
        raise TypeError("regmean_batched: grams must be a sequence with one Gram tensor per fine-tuned model")
    grams = list(grams)
    num_tasks = len(p.finetuned)
    if len(grams) != num_tasks:
        raise ValueError(f"regmean_batched: grams has {len(grams)} entries for {num_tasks} fine-tuned models")
    weights = torch.stack([x.double() for x in p.finetuned])  # [T, L, rows, cols]
    if transposed:
        weights = weights.mT
    batch, _, in_dim = weights.shape[1:]
    for t, g in enumerate(grams):
        if not isinstance(g, torch.Tensor) or not g.is_floating_point():
            raise TypeError(f"regmean_batched: grams[{t}] must be a floating-point tensor")
        if g.shape != (batch, in_dim, in_dim):
            raise ValueError(
                f"regmean_batched: grams[{t}] has shape {tuple(g.shape)}; weights of shape "
                f"{tuple(p.base.shape)}{' (transposed)' if transposed else ''} need {(batch, in_dim, in_dim)}"
            )
    mean = weights.mean(0)
    total = torch.zeros((batch, in_dim, in_dim), dtype=torch.float64, device=p.base.device)
    rhs = torch.zeros_like(mean)
    for t, g in enumerate(grams):
        g = g.to(device=p.base.device, dtype=torch.float64)
        shrunk = reduction * g + (1.0 - reduction) * torch.diag_embed(g.diagonal(dim1=-2, dim2=-1))
        total += shrunk
        rhs += (weights[t] - mean) @ shrunk
    total = 0.5 * (total + total.mT)  # exact symmetry, whatever the Grams' rounding
    merged = mean + pinv_solve(rhs, total, what="regmean")
    if transposed:
        merged = merged.mT
    _, want = _ops._check_out_dtype(out_dtype, p.out_dtype)
    return merged.to(want).contiguous()


def regmean(
    base: torch.Tensor,
    finetuned: Sequence[torch.Tensor],
    grams: Sequence[torch.Tensor] | None = None,
    *,
    reduction: float = 0.95,
    transposed: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Merge one tensor by RegMean (see :func:`regmean_batched`).

    Args:
        base: the base weight (only its dtype, device and shape are used).
        finetuned: the experts' weights W_1..W_T.
        grams: one [in, in] input Gram per expert for a 2-D weight; ``None`` (default, e.g. for
            biases and norms) merges by the mean of the fine-tuned weights, as does any tensor
            that is not 2-D.
        reduction: off-diagonal factor r (default 0.95: CLIP; 0.6 for GPT-2).
        transposed: weight stored in x out (GPT-2 Conv1D); default False (nn.Linear, out x in).
        out_dtype: dtype of the result (default: base's dtype).
    """
    reduction = _check_reduction(reduction)
    p = _ops.prepare(base, finetuned, "regmean")
    if grams is None or p.base.ndim != 2:
        return mean_merge(p, 1.0, out_dtype)
    if isinstance(grams, torch.Tensor):
        raise TypeError("regmean: grams must be a sequence with one Gram tensor per fine-tuned model")
    return regmean_batched(
        base[None],
        [x[None] for x in finetuned],
        [g[None] if isinstance(g, torch.Tensor) else g for g in grams],
        reduction=reduction,
        transposed=transposed,
        out_dtype=out_dtype,
    )[0]


# ----------------------------------------------------------------------------------------------
# Grams from data.
def _input_dim(module: torch.nn.Module) -> int | None:
    """Input width of a supported module, None for others: nn.Linear (and subclasses; weight
    out x in) and Hugging Face's GPT-2 style Conv1D (recognised by its class name and a 2-D
    weight, used as x @ W, in x out)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        return None
    if isinstance(module, torch.nn.Linear):
        return weight.shape[1]
    if type(module).__name__ == "Conv1D":
        return weight.shape[0]
    return None


def collect_input_grams(
    model: torch.nn.Module,
    batches: Iterable,
    *,
    forward: Callable[[torch.nn.Module, object], object] | None = None,
    modules: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Input Grams X^T X / #tokens of the linear layers of ``model`` over ``batches``.

    Forward hooks on every supported module (``torch.nn.Linear`` and its subclasses, and Hugging
    Face's ``Conv1D``, recognised by class name, whose 2-D weight is used as x @ W) record the
    module's first input; all its leading dimensions count as tokens (padding included: mask it
    in ``forward`` if it should not count). Sums are float64 on the input's device, over every call
    of the module in every batch. Runs under ``torch.no_grad``; the model's train/eval mode is left
    as it is (call ``model.eval()`` first to switch dropout off). The hooks are removed afterwards,
    also when a forward raises.

    Modules whose ``forward`` is never called (e.g. ``nn.MultiheadAttention.out_proj``, whose
    weight attention uses directly) get no entry.

    Args:
        model: the expert, run on its own task's data.
        batches: an iterable of inputs.
        forward: ``forward(model, batch)`` runs one batch (default: ``model(batch)``; use
            ``lambda m, b: m(**b)`` for dict batches).
        modules: names (as in ``model.named_modules()``) of the modules to hook; default: every
            supported module.

    Returns:
        {weight's state-dict name ("<module>.weight"): float64 [in, in] Gram}.
    """
    supported = {name: module for name, module in model.named_modules() if _input_dim(module) is not None}
    if modules is not None:
        wanted = list(modules)
        named = dict(model.named_modules())
        for name in wanted:
            if name not in named:
                raise ValueError(f"collect_input_grams: model has no module named {name!r}")
            if name not in supported:
                raise ValueError(
                    f"collect_input_grams: module {name!r} ({type(named[name]).__name__}) is neither "
                    "an nn.Linear nor a Conv1D with a 2-D weight"
                )
        supported = {name: supported[name] for name in wanted}
    run = forward if forward is not None else (lambda m, b: m(b))
    sums: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}

    def make_hook(name: str, width: int):
        def hook(module, args, kwargs, output):
            x = args[0] if args else next(iter(kwargs.values()))
            if x.shape[-1] != width:
                raise RuntimeError(
                    f"collect_input_grams: module {name!r} got input of shape {tuple(x.shape)}, "
                    f"expected last dimension {width}"
                )
            rows = x.detach().reshape(-1, width).to(torch.float64)
            gram = _ops.sym_gram(rows)
            sums[name] = gram if name not in sums else sums[name] + gram
            tokens[name] = tokens.get(name, 0) + rows.shape[0]

        return hook

    handles = [
        module.register_forward_hook(make_hook(name, _input_dim(module)), with_kwargs=True)
        for name, module in supported.items()
    ]
    try:
        with torch.no_grad():
            for batch in batches:
                run(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return {
        (f"{name}.weight" if name else "weight"): sums[name] / tokens[name]
        for name in supported
        if tokens.get(name, 0) > 0
    }
