"""What is benchmarked: the cases, their torch references, and the bytes and FLOPs each must move/do."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .. import _ops
from . import references as ref

TIES_DENSITY = 0.2
DARE_DROP = 0.9
KEY = "model.layers.0.mlp.up_proj.weight"
ACE_PARAMS = dict(eps=1e-2, tau=0.3, k_frac=0.3, scale=1.0)

# Every case, in report order. "awd" runs only when mk.METHODS has it (see registered_ops).
OPS = (
    "stats",
    "threshold",
    "masked_drop",
    "ta",
    "ties",
    "dare",
    "dare_ties",
    "breadcrumbs",
    "della",
    "slerp",
    "multislerp",
    "model_stock",
    "nearswap",
    "ram",
    "sce",
    "arcee_fusion",
    "ace",
    "awd",
    "stream",
)
ALIASES = {
    "task_vector_stats": "stats",
    "magnitude_threshold": "threshold",
    "task_arithmetic": "ta",
    "dare_linear": "dare",
    "streaming": "stream",
}
# Methods benchmarked only once they are registered in mergekernels.METHODS.
REGISTERED_OPS = ("awd",)


@dataclass(frozen=True)
class Preset:
    """A model's sizes: the element-wise cases' tensor and the ACE block (shape groups)."""

    shape: tuple[int, int]
    ace_groups: tuple[tuple[int, int, int], ...]  # (layers L, m, n)
    ace_experts: int  # the experts benchmarks/bench_ace.py uses by default


PRESETS: dict[str, Preset] = {
    "gpt2": Preset((3072, 768), ((1, 768, 768), (1, 3072, 768), (1, 768, 3072)), 7),
    "llama-7b-block": Preset((11008, 4096), ((4, 4096, 4096), (2, 11008, 4096), (1, 4096, 11008)), 4),
}


# ---- bytes ---------------------------------------------------------------------------------------
_READ_ONLY = ("stats", "threshold")
_ONE_PASS = ("ta", "dare", "dare_linear", "dare_ties", "della", "nearswap", "ram")
_TWO_PASS = ("ties", "breadcrumbs", "awd", "slerp", "multislerp", "model_stock", "sce", "arcee_fusion")
METHODS = (*_READ_ONLY, *_ONE_PASS, *_TWO_PASS, "masked_drop")
# Methods of exactly one fine-tuned model: their cases take the first of the K.
ONE_EXPERT = ("slerp", "nearswap", "arcee_fusion")
SCE_TOPK = 0.5
RAM_EPSILON = 1e-3
NEARSWAP_T = 1e-3


def bytes_moved(method: str, k: int, numel: int, itemsize: int) -> int:
    """Lower bound on the bytes a merge of K fine-tuned tensors must move through memory.

    One "input set" is base plus the K fine-tuned tensors, (K + 1) * numel * itemsize bytes; the
    output is numel * itemsize bytes. Counting:

    - ``stats``, ``threshold``: read the inputs once, nothing written (the threshold is counted
      as one pass although the radix selection reads the inputs twice).
    - ``ta``, ``dare``/``dare_linear``, ``dare_ties``, ``della``: one fused merge pass, reading the
      inputs once and writing the output once (DELLA's ranks are per row, which can stay in cache).
    - ``ties``, ``breadcrumbs``: two passes, since their cuts are order statistics of the whole
      tensor: a threshold pass reading the inputs, then the merge pass reading them again and
      writing the output. ``awd``: likewise, a statistics pass, then the merge pass.
    - ``masked_drop``: one expert: base and that expert read, a float32 tensor written (k unused).
    - mergekit's other methods: ``nearswap``, ``ram`` one pass; ``slerp``, ``multislerp``,
      ``model_stock`` (a Gram, then the combine), ``sce`` and ``arcee_fusion`` (an order statistic of
      the whole tensor, then the merge) two. ``slerp``, ``nearswap`` and ``arcee_fusion`` take one
      fine-tuned model (k = 1).

    The torch references are charged the bound of the method they implement, so their GB/s and
    ours compare directly. Intermediates (float32 task vectors, masks, indices) are not counted.
    """
    if method in ONE_EXPERT:
        k = 1
    inputs = (k + 1) * numel * itemsize
    output = numel * itemsize
    if method in _READ_ONLY:
        return inputs
    if method in _ONE_PASS:
        return inputs + output
    if method in _TWO_PASS:
        return 2 * inputs + output
    if method == "masked_drop":
        return 2 * numel * itemsize + 4 * numel
    raise ValueError(f"unknown method {method!r}; known: {METHODS}")


# ---- ACE FLOPs -----------------------------------------------------------------------------------
def ace_flops(
    m: int, n: int, experts: int, het: bool, k_frac: float = ACE_PARAMS["k_frac"]
) -> tuple[float, float]:
    """(float32 FLOPs, float64 FLOPs) mergekernels spends on ACE for one m x n layer and T experts.

    Multiply-adds count 2; a symmetric product (Gram) counts half of the general one, the useful
    work of one triangle (the package's blocked half-Gram runs b <= 8 panel GEMMs that do
    (1 + 1/b) / 2 of the full product, so its true count is slightly higher). Elementwise work
    (differences, centring, traces, the ridge, the rank-one prior's Sherman-Morrison update) is
    O(T m n + n^2) and not counted.

    float32, per expert:
    - m >= n: the half-Gram G_t = W~_t^T W~_t, m n^2 (half of 2 m n^2), and the product
      W~_t S_t, 2 m n^2.
    - m < n: the n x n half-Gram, m n^2; then W~_t S_t is formed as (W~_t W~_t^T) W~_t instead of
      through the n x n matrix: the m x m half-Gram W~_t W~_t^T, m^2 n, and its product with
      W~_t, 2 m^2 n.
    float64, once per layer: the Cholesky factor of the n x n SPD matrix R = sum_t R_t, n^3 / 3;
    two triangular solves with m right-hand sides, m n^2 each (2 m n^2).
    het only:
    - float32: one more m x n by n x n product for the residual, 2 m n^2;
    - float64: the Gram of F on its smaller side s = min(m, n), l = max(m, n): s^2 l (half of
      2 s^2 l); its symmetric eigendecomposition with eigenvectors, counted as ~9 s^3 (the usual
      estimate for tridiagonal reduction + implicit QR with vectors, Golub & Van Loan; a
      divide-and-conquer solver often does fewer); the other side's top-k singular vectors and
      the product U_k V_k^T, 2 m n k + 2 m n k = 4 m n k, with k = floor(k_frac * s).
    """
    fp32 = 0.0
    if m >= n:
        fp32 += experts * (m * n * n + 2 * m * n * n)
    else:
        fp32 += experts * (m * n * n + m * m * n + 2 * m * m * n)
    fp64 = n**3 / 3 + 2 * m * n * n
    if het:
        small, large = min(m, n), max(m, n)
        k = math.floor(k_frac * small)
        fp32 += 2 * m * n * n
        fp64 += small * small * large + 9 * small**3 + 4 * m * n * k
    return fp32, fp64


def make_ace_group(
    layers: int,
    m: int,
    n: int,
    experts: int,
    device: torch.device | str,
    seed: int,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Fresh base [L, m, n] ~ N(0, 0.02) and T fine-tuned tensors whose task vectors have energies
    ||tau_t||_F^2 ~ 10**t: tau_t ~ N(0, 10**t / (m n)). The log energies are then about t ln 10 and
    the gate statistic gamma = var / mean^2 >= 1/3 > tau = 0.3 for T >= 2, so ``gate="auto"``
    takes the heterogeneous branch (with the spectral refinement) naturally."""
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    base = torch.randn(layers, m, n, generator=gen, device=device) * 0.02
    finetuned = []
    for t in range(experts):
        std = 10.0 ** (t / 2) / math.sqrt(m * n)
        finetuned.append((base + std * torch.randn(layers, m, n, generator=gen, device=device)).to(dtype))
    return base.to(dtype), finetuned


# ---- element-wise cases -----------------------------------------------------------------------------------
@dataclass
class Impl:
    """One timed implementation: ``fn(base, finetuned)`` on an input set."""

    name: str
    impl: str  # "mergekernels", "torch" or "safetensors"
    fn: Callable[..., object]
    slow: bool = False  # no warm-up call (a full sort per task vector)
    agreement: str | None = None  # how its result compares with ours: "exact" or "random"


@dataclass
class Case:
    name: str
    kind: str  # "bandwidth" (GB/s vs the copy bandwidth), "flops", or "io" (vs the host copy)
    method: str  # the byte model (bytes_moved), for "bandwidth" cases
    ours: Impl
    references: list[Impl] = field(default_factory=list)
    note: str = ""


def _first_expert(fn: Callable) -> Callable:
    return lambda base, finetuned: fn(base, finetuned[0])


def _mergekit_cases() -> dict[str, Case]:
    """mergekit's other methods, against torch code written the way mergekit computes them."""
    import mergekernels as mk

    def one(fn: Callable) -> Callable:
        return lambda b, f: fn(b, f[:1])

    def case(name: str, ours: Callable, reference: Callable | None, note: str) -> Case:
        refs = [Impl(f"{name}_torch", "torch", reference, agreement="exact")] if reference else []
        return Case(name, "bandwidth", name, Impl(name, "mergekernels", ours), refs, note=note)

    return {
        "slerp": case(
            "slerp",
            one(lambda b, f: mk.slerp(b, f, t=0.3)),
            one(lambda b, f: ref.slerp_torch(b, f, 0.3)),
            "t 0.3, the first fine-tuned model",
        ),
        "multislerp": case(
            "multislerp", lambda b, f: mk.multislerp(b, f), None, "task vectors, equal weights"
        ),
        "model_stock": case(
            "model_stock", lambda b, f: mk.model_stock(b, f), ref.model_stock_torch, "whole tensor"
        ),
        "nearswap": case(
            "nearswap",
            one(lambda b, f: mk.nearswap(b, f, t=NEARSWAP_T)),
            one(lambda b, f: ref.nearswap_torch(b, f, NEARSWAP_T)),
            f"t {NEARSWAP_T}",
        ),
        "ram": case(
            "ram",
            lambda b, f: mk.ram(b, f, epsilon=RAM_EPSILON),
            lambda b, f: ref.ram_torch(b, f, RAM_EPSILON),
            f"epsilon {RAM_EPSILON}",
        ),
        "sce": case(
            "sce",
            lambda b, f: mk.sce(b, f, select_topk=SCE_TOPK),
            lambda b, f: ref.sce_torch(b, f, SCE_TOPK),
            f"select_topk {SCE_TOPK}",
        ),
        "arcee_fusion": case(
            "arcee_fusion",
            one(lambda b, f: mk.arcee_fusion(b, f)),
            one(ref.arcee_fusion_torch),
            "the first fine-tuned model",
        ),
    }


def elementwise_cases(names: list[str], methods: dict, slow_references: bool = True) -> list[Case]:
    """The element-wise cases among `names` (ours from the package, references from
    :mod:`.references`); `methods` is mk.METHODS (for the registered ones)."""
    import mergekernels as mk

    cases = {
        "stats": Case(
            "stats",
            "bandwidth",
            "stats",
            Impl("task_vector_stats", "mergekernels", lambda b, f: mk.task_vector_stats(b, f)),
            note="Gram, abs max, non-zeros, signs of the task vectors",
        ),
        "threshold": Case(
            "threshold",
            "bandwidth",
            "threshold",
            Impl(
                "magnitude_threshold", "mergekernels", lambda b, f: mk.magnitude_threshold(b, f, TIES_DENSITY)
            ),
            [
                Impl(
                    "threshold_kthvalue",
                    "torch",
                    lambda b, f: ref.threshold_kthvalue(b, f, TIES_DENSITY),
                    agreement="exact",
                )
            ],
            note=f"exact k-th largest |tau| per task, density {TIES_DENSITY}",
        ),
        "masked_drop": Case(
            "masked_drop",
            "bandwidth",
            "masked_drop",
            Impl(
                "masked_drop",
                "mergekernels",
                _first_expert(lambda b, x: _ops.masked_drop(b, x, expert=0, keep=1 - DARE_DROP, key=KEY)),
            ),
            [
                Impl(
                    "masked_drop_bernoulli",
                    "torch",
                    _first_expert(lambda b, x: ref.masked_drop_bernoulli(b, x, 1 - DARE_DROP)),
                    agreement="random-tv",
                )
            ],
            note=f"one expert's dropped task vector (float32), keep {1 - DARE_DROP:.1f}",
        ),
        "ta": Case(
            "ta",
            "bandwidth",
            "ta",
            Impl("task_arithmetic", "mergekernels", lambda b, f: mk.task_arithmetic(b, f)),
            [Impl("ta_torch", "torch", lambda b, f: ref.ta_torch(b, f), agreement="exact")],
        ),
        "ties": Case(
            "ties",
            "bandwidth",
            "ties",
            Impl("ties", "mergekernels", lambda b, f: mk.ties(b, f, density=TIES_DENSITY)),
            [
                Impl(
                    "ties_kthvalue",
                    "torch",
                    lambda b, f: ref.ties_kthvalue(b, f, TIES_DENSITY),
                    agreement="exact",
                ),
                Impl(
                    "ties_argsort",
                    "torch",
                    lambda b, f: ref.ties_argsort(b, f, TIES_DENSITY),
                    slow=True,
                    agreement="exact",
                ),
            ],
            note=f"density {TIES_DENSITY}, mean",
        ),
        "dare": Case(
            "dare",
            "bandwidth",
            "dare",
            Impl("dare_linear", "mergekernels", lambda b, f: mk.dare(b, f, drop=DARE_DROP, seed=0, key=KEY)),
            [
                Impl(
                    "dare_bernoulli",
                    "torch",
                    lambda b, f: ref.dare_bernoulli(b, f, DARE_DROP),
                    agreement="random",
                )
            ],
            note=f"drop {DARE_DROP}, sum",
        ),
        "dare_ties": Case(
            "dare_ties",
            "bandwidth",
            "dare_ties",
            Impl(
                "dare_ties",
                "mergekernels",
                lambda b, f: mk.dare(b, f, drop=DARE_DROP, seed=0, key=KEY, consensus="ties"),
            ),
        ),
        "breadcrumbs": Case(
            "breadcrumbs",
            "bandwidth",
            "breadcrumbs",
            Impl("breadcrumbs", "mergekernels", lambda b, f: mk.breadcrumbs(b, f, density=0.9, gamma=0.01)),
            note="density 0.9, gamma 0.01",
        ),
        "della": Case(
            "della",
            "bandwidth",
            "della",
            Impl(
                "della",
                "mergekernels",
                lambda b, f: mk.della(b, f, density=0.5, epsilon=0.15, seed=0, key=KEY),
            ),
            note="density 0.5, epsilon 0.15",
        ),
    }
    cases.update(_mergekit_cases())
    if "awd" in methods:
        spec = methods["awd"]
        cases["awd"] = Case(
            "awd",
            "bandwidth",
            "awd",
            Impl("awd", "mergekernels", lambda b, f: spec.function(b, f, **spec.implied)),
            note="registered method, default parameters; bytes: one statistics pass + one merge pass",
        )
    out = []
    for name in names:
        if name not in cases:
            continue
        case = cases[name]
        if not slow_references:
            case.references = [r for r in case.references if not r.slow]
        out.append(case)
    return out


def agreement(ours: object, reference: object, base: torch.Tensor, mode: str | None) -> str | None:
    """How ours and a reference agree on the same inputs. 'exact': max |ours - ref| and how many
    entries differ; 'random' (random masks, equal only in distribution): ||ours - base|| over
    ||ref - base||; 'random-tv': ||ours|| / ||ref|| (both are task vectors)."""
    if mode is None or not isinstance(ours, torch.Tensor) or not isinstance(reference, torch.Tensor):
        return None
    ours, reference = ours.float(), reference.float()
    if mode == "exact":
        diff = (ours - reference).abs()
        return f"max abs diff {diff.max().item():.2e} ({int((diff > 0).sum().item())} differ)"
    if mode == "random":
        a, r = (ours - base.float()).norm().item(), (reference - base.float()).norm().item()
    elif mode == "random-tv":
        a, r = ours.norm().item(), reference.norm().item()
    else:
        raise ValueError(f"unknown agreement mode {mode!r}")
    return f"delta norm ratio {a / r:.4f}" if r > 0 else "delta norm ratio n/a"
