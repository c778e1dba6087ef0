"""APL's costs: the importance pass next to a plain forward + backward, and the merge next to DARE.

Usage::

    python benchmarks/bench_apl.py [--quick] [--tasks T] [--repeats N] [--threads N] [--device cpu|cuda]

Model: a token classifier built from ``nn.TransformerEncoder`` (pre-norm, GELU, no dropout): an
embedding, ``layers`` encoder layers of width ``d`` with ``d_ff = 4 d`` and a linear head over the
vocabulary, fp32. Default ~69M parameters (d 768, 8 layers, 12 heads, vocabulary 8000) on a batch of
4 x 128 tokens; ``--quick`` ~4M parameters (d 256, 4 layers, vocabulary 2000) on 4 x 32 tokens.
Fine-tuned models: base + N(0, 1e-3) noise per task (the costs do not depend on the values).

Timed (median over ``--repeats`` rounds after one warm-up, the same process and inputs; the rows of
each group run interleaved, so load on the machine slows them alike):

1. ``fwd+bwd``: one plain forward and backward of the model on the batch (``zero_grad`` to None
   first, gradients left in ``.grad`` as training would);
2. ``importance``: ``mk.apl.importance`` for one task on that one batch (all three levels): the same
   forward and backward plus the hooks that reduce g (.) Delta into unit, layer and model sums
   and free each gradient; the ratio to (1) is APL's overhead per task and per batch;
3. the same with ``levels=("model", "layer")`` (no per-unit sums);
4. ``plan``: multipliers and weights from the scores (once per merge);
5. ``apl.merge`` (random keep, per-row keep rates) and ``within="magnitude"`` over T fine-tuned
   state dicts, next to ``mk.merge(..., "dare_linear")`` on the same state dicts (the same fused kernel
   with one keep rate per task).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import mergekernels as mk


class TokenClassifier(torch.nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        layer = torch.nn.TransformerEncoderLayer(
            d, heads, 4 * d, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.encoder(self.embed(tokens))))


def loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    tokens, labels = batch
    logits = model(tokens)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fns: dict, repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each fn over `repeats` rounds after one warm-up each. The functions run
    interleaved (one round runs each once), so a busy machine slows them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a ~4M-parameter model on 4 x 32 tokens")
    parser.add_argument("--tasks", type=int, default=3, help="fine-tuned models in the merge (default 3)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per row (default 3; quick 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    vocab, d, layers, heads, batch, seq = (
        (2000, 256, 4, 4, 4, 32) if args.quick else (8000, 768, 8, 12, 4, 128)
    )
    repeats = args.repeats or (5 if args.quick else 3)

    torch.manual_seed(0)
    model = TokenClassifier(vocab, d, layers, heads).to(device)
    params = sum(p.numel() for p in model.parameters())
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator(device="cpu").manual_seed(1)
    fts = [
        {k: v + 1e-3 * torch.randn(v.shape, generator=g).to(device) for k, v in base.items()}
        for _ in range(args.tasks)
    ]
    tokens = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    labels = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    data = (tokens, labels)

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model, data).backward()

    def importance(levels=mk.apl.LEVELS):
        return mk.apl.importance(model, loss_fn, {"task": [data]}, [fts[0]], levels=levels)

    scores = mk.apl.importance(model, loss_fn, {f"t{i}": [data] for i in range(args.tasks)}, fts)
    backward = timed(
        {
            "fwd+bwd (plain)": plain,
            "apl.importance, 1 task, 1 batch": importance,
            "apl.importance, model+layer only": lambda: importance(("model", "layer")),
        },
        repeats,
        device,
    )
    model.zero_grad(set_to_none=True)
    merges = timed(
        {
            f"dare_linear merge ({args.tasks} models)": lambda: mk.merge(base, fts, "dare_linear", drop=0.9),
            "apl.plan": lambda: mk.apl.plan(scores),
            "apl.merge (random)": lambda: mk.apl.merge(base, fts, scores),
            "apl.merge (magnitude)": lambda: mk.apl.merge(base, fts, scores, within="magnitude"),
        },
        repeats,
        device,
    )
    notes = [
        f"{batch} x {seq} tokens",
        "levels model, layer, hidden",
        "no per-unit sums",
        "fused kernel, one keep rate per task",
        "multipliers, weights",
        "incl. plan; per-row keep rates",
        "incl. plan; per-row ranks",
    ]
    rows = []
    for group in (backward, merges):
        ref = next(iter(group.values()))
        for what, seconds in group.items():
            rows.append({"what": what, "seconds": seconds, "ratio": seconds / ref, "note": notes[len(rows)]})

    print(
        f"\nAPL benchmark on {device} ({torch.get_num_threads()} threads), torch {torch.__version__}: "
        f"TransformerEncoder d={d}, {layers} layers, vocabulary {vocab}: {params / 1e6:.1f}M parameters "
        f"(fp32); median of {repeats} runs\n"
    )
    print("| step | time (ms) | x reference | note |")
    print("|---|---:|---:|---|")
    for r in rows:
        print(f"| {r['what']} | {1e3 * r['seconds']:.1f} | {r['ratio']:.2f} | {r['note']} |")
    print("\nReference: fwd+bwd for the importance rows, dare_linear for the merge rows.")
    return rows


if __name__ == "__main__":
    main()
