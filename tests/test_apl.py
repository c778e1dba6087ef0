"""APL (mk.apl): gradient importance against a naive full-gradient computation and the exact causal
intervention, keep-rate multipliers, the per-row masked-drop merge against float64 references, the
reduction to DARE + task arithmetic at infinite temperatures, scores on disk, and the errors."""

import dataclasses
import math
import warnings

import pytest
import torch

import mergekernels as mk
from mergekernels.methods.apl import APLScores, block_of

from . import reference as ref
from .conftest import assert_close_to_ref, make_inputs

INF = math.inf


# ----------------------------------------------------------------------------------------------
# A small residual MLP and "fine-tuned" models from a few SGD steps on per-task teacher labels.
class Block(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc1 = torch.nn.Linear(width, width)
        self.fc2 = torch.nn.Linear(width, width)

    def forward(self, x):
        return x + self.fc2(torch.tanh(self.fc1(x)))


class Net(torch.nn.Module):
    """Names: embed.*, layers.<i>.fc1/fc2.*, norm.* (a LayerNorm: 1-D tensors without units), head.*"""

    def __init__(self, width=16, depth=4, inputs=12, classes=5):
        super().__init__()
        self.embed = torch.nn.Linear(inputs, width)
        self.layers = torch.nn.ModuleList([Block(width) for _ in range(depth)])
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, classes)

    def forward(self, x):
        x = self.embed(x)
        for block in self.layers:
            x = block(x)
        return self.head(self.norm(x))


def loss_fn(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def _setup(tasks=3, depth=4, width=16, lr=0.02, steps=3, seed=0, batches=2, batch_size=32):
    """(model holding the base, base state dict, fine-tuned state dicts, calibration)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Net(width, depth)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    names = list(base)
    calibration, finetuned = {}, []
    for t in range(tasks):
        teacher = torch.randn(12, 5, generator=g)
        data = []
        for _ in range(batches + 2):
            x = torch.randn(batch_size, 12, generator=g)
            data.append((x, (x @ teacher).argmax(1)))
        calibration[f"task{t}"] = data[:batches]
        student = Net(width, depth)
        student.load_state_dict(base)
        # per-task and per-tensor learning rates spread the importance over tasks and layers
        factors = torch.exp(2.0 * torch.randn(len(names), generator=g)).tolist()
        groups = [
            {"params": [p], "lr": lr * (t + 1) * f}
            for (_, p), f in zip(student.named_parameters(), factors, strict=True)
        ]
        opt = torch.optim.SGD(groups)
        for step in range(steps):
            opt.zero_grad()
            loss_fn(student, data[step % len(data)]).backward()
            opt.step()
        finetuned.append({k: v.detach().clone() for k, v in student.state_dict().items()})
    return model, base, finetuned, calibration


@pytest.fixture(scope="module")
def setup():
    return _setup()


@pytest.fixture(scope="module")
def scores(setup):
    model, _, fts, cal = setup
    return mk.apl.importance(model, loss_fn, cal, fts)


def _spearman(a, b):
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def _sd_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------
# Partitions.
def test_block_rule_and_partitions(scores):
    assert block_of("model.layers.3.mlp.up_proj.weight") == "model.layers.3."
    assert block_of("encoder.block.11.layer.0.q.weight") == "encoder.block.11."
    assert block_of("model.norm.weight") == "model.norm."
    assert block_of("weight") == "weight"
    assert scores.layer_names == [
        "embed.",
        "layers.0.",
        "layers.1.",
        "layers.2.",
        "layers.3.",
        "norm.",
        "head.",
    ]
    assert scores.tensor_layer["layers.2.fc2.bias"] == 3
    # units: rows of >= 2-D weights plus the matching bias; LayerNorm's 1-D tensors have none
    assert scores.row_tensor["head.bias"] == "head.weight"
    assert scores.row_tensor["layers.0.fc1.weight"] == "layers.0.fc1.weight"
    assert "norm.weight" not in scores.row_tensor and "norm.bias" not in scores.row_tensor
    assert scores.hidden["head.weight"].shape == (3, 5)
    assert scores.model.shape == (3,) and scores.layer.shape == (3, 7)


def test_tensor_and_callable_layer_rules(setup):
    model, _, fts, cal = setup
    s = mk.apl.importance(model, loss_fn, cal, fts, layer="tensor", levels="layer")
    assert "head.bias" not in s.layer_names  # an attached bias joins its weight's layer
    assert s.tensor_layer["head.bias"] == s.tensor_layer["head.weight"]
    assert s.tensor_layer["norm.bias"] != s.tensor_layer["norm.weight"]
    assert s.levels == ("layer",) and s.model is None and not s.hidden
    c = mk.apl.importance(model, loss_fn, cal, fts, layer=lambda n: "all", levels=("model", "layer"))
    assert c.layer_names == ["all"]
    torch.testing.assert_close(c.layer[:, 0], c.model, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Importance.
def _naive(model, cal, fts, tasks, grad_at="base"):
    """|sum g (.) Delta| per unit / block / model from the full float64 gradient of the mean loss."""
    params = dict(model.named_parameters())
    base = {n: p.detach().clone() for n, p in params.items()}
    out = []
    for t, task in enumerate(tasks):
        if grad_at == "finetuned":
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(fts[t][n])
        losses = [loss_fn(model, b) for b in cal[task]]
        grads = torch.autograd.grad(sum(losses) / len(losses), list(params.values()))
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(base[n])
        prod = {
            n: g.double() * (fts[t][n].double() - base[n].double())
            for n, g in zip(params, grads, strict=True)
        }
        units = {}
        for n, x in prod.items():
            if x.dim() >= 2:
                units[n] = x.reshape(x.shape[0], -1).sum(1)
        for n, x in prod.items():
            w = n[: -len("bias")] + "weight"
            if n.endswith("bias") and w in units:
                units[w] = units[w] + x
        blocks = {}
        for n, x in prod.items():
            blocks[block_of(n)] = blocks.get(block_of(n), 0.0) + x.sum()
        out.append((sum(blocks.values()).abs(), {k: v.abs() for k, v in blocks.items()}, units))
    return out


@pytest.mark.parametrize("backward", ["task", "batch"])
@pytest.mark.parametrize("grad_at", ["base", "finetuned"])
def test_hook_reductions_equal_naive_full_gradient(setup, backward, grad_at):
    model, _, fts, cal = setup
    model64 = Net()
    model64.load_state_dict(model.state_dict())
    model64.double()
    fts64 = [{k: v.double() for k, v in sd.items()} for sd in fts]
    cal64 = {k: [(x.double(), y) for x, y in v] for k, v in cal.items()}
    s = mk.apl.importance(model64, loss_fn, cal64, fts64, backward=backward, grad_at=grad_at)
    naive = _naive(model64, cal64, fts64, s.tasks, grad_at)
    for t, (m, blocks, units) in enumerate(naive):
        torch.testing.assert_close(s.model[t], m, rtol=1e-9, atol=1e-15)
        torch.testing.assert_close(
            s.layer[t], torch.stack([blocks[lid] for lid in s.layer_names]), rtol=1e-9, atol=1e-15
        )
        for owner, x in units.items():
            torch.testing.assert_close(s.hidden[owner][t], x.abs(), rtol=1e-9, atol=1e-15)


def test_gradients_are_freed_as_they_arrive(setup):
    """The full gradient never exists: whenever a parameter's gradient is complete, every other
    parameter's .grad has already been reduced and freed."""
    model, _, fts, cal = setup
    alive = []

    def spy(p):
        alive.append(sum(q.grad is not None for q in model.parameters()))

    handles = [p.register_post_accumulate_grad_hook(spy) for p in model.parameters()]
    try:
        mk.apl.importance(model, loss_fn, cal, fts)
    finally:
        for h in handles:
            h.remove()
    assert len(alive) == 3 * len(list(model.parameters())) and set(alive) == {1}


def test_float32_importance_close_to_float64(setup, scores):
    model, _, fts, cal = setup
    naive = _naive(model, cal, fts, scores.tasks)
    for t, (m, _, units) in enumerate(naive):
        torch.testing.assert_close(scores.model[t], m, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(
            scores.hidden["head.weight"][t], units["head.weight"].abs(), rtol=1e-3, atol=1e-8
        )


def test_importance_leaves_the_model_as_it_was(setup):
    model, _, fts, cal = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.embed.weight.requires_grad_(False)
    grad = torch.ones_like(model.head.weight)
    model.head.weight.grad = grad
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        a = mk.apl.importance(model, loss_fn, cal, fts, grad_at="finetuned")
        assert _sd_equal(model.state_dict(), before)  # base restored bit for bit
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert model.head.weight.grad is grad
        assert all(p.grad is None for n, p in model.named_parameters() if n != "head.weight")
        # the frozen parameter was scored all the same
        assert a.hidden["embed.weight"].abs().sum() > 0
        mk.apl.exact_importance(model, loss_fn, cal, fts)
        assert _sd_equal(model.state_dict(), before)
        assert model.head.weight.grad is grad
    finally:
        model.embed.weight.requires_grad_(True)
        model.head.weight.grad = None


def test_gradient_importance_ranks_like_the_exact_intervention():
    model, _, fts, cal = _setup(tasks=5, depth=6, lr=0.003, steps=2, seed=1)  # small deltas
    approx = mk.apl.importance(model, loss_fn, cal, fts, levels=("model", "layer"))
    exact = mk.apl.exact_importance(model, loss_fn, cal, fts)
    assert exact.info["method"] == "exact" and exact.layer.shape == approx.layer.shape
    assert _spearman(approx.model, exact.model) >= 0.8
    assert _spearman(approx.layer, exact.layer) >= 0.8
    per_task = [_spearman(approx.layer[t], exact.layer[t]) for t in range(5)]
    assert sum(per_task) / len(per_task) >= 0.8, per_task


def test_exact_hidden_level_ranks_like_gradient():
    model, _, fts, cal = _setup(tasks=2, depth=1, lr=0.003, steps=2, seed=2)
    approx = mk.apl.importance(model, loss_fn, cal, fts, levels="hidden")
    exact = mk.apl.exact_importance(model, loss_fn, cal, fts, levels="hidden")
    assert _spearman(approx.hidden["head.weight"], exact.hidden["head.weight"]) >= 0.8


def test_max_batches_and_generators(setup):
    model, _, fts, cal = setup
    one = {k: v[:1] for k, v in cal.items()}
    a = mk.apl.importance(model, loss_fn, one, fts)
    b = mk.apl.importance(model, loss_fn, {k: iter(v) for k, v in cal.items()}, fts, max_batches=1)
    assert b.info["batches"] == [1, 1, 1]
    torch.testing.assert_close(a.layer, b.layer, rtol=0, atol=0)
    c = mk.apl.importance(model, loss_fn, cal, dict(zip(cal, fts, strict=True)))  # fts by task name
    d = mk.apl.importance(model, loss_fn, cal, fts)
    torch.testing.assert_close(c.layer, d.layer, rtol=0, atol=0)


def test_same_inputs_same_outputs(setup, scores):
    model, base, fts, cal = setup
    again = mk.apl.importance(model, loss_fn, cal, fts)
    assert torch.equal(again.model, scores.model) and torch.equal(again.layer, scores.layer)
    assert all(torch.equal(again.hidden[k], v) for k, v in scores.hidden.items())
    assert _sd_equal(mk.apl.merge(base, fts, scores, seed=5), mk.apl.merge(base, fts, again, seed=5))
    assert not _sd_equal(mk.apl.merge(base, fts, scores, seed=5), mk.apl.merge(base, fts, scores, seed=6))


def test_scores_survive_save_and_load(tmp_path, scores):
    path = tmp_path / "scores.safetensors"
    scores.save(path)
    back = APLScores.load(path)
    assert back.tasks == scores.tasks and back.levels == scores.levels
    assert back.layer_names == scores.layer_names and back.tensor_layer == scores.tensor_layer
    assert back.row_tensor == scores.row_tensor and back.info == scores.info
    assert torch.equal(back.model, scores.model) and torch.equal(back.layer, scores.layer)
    assert back.hidden.keys() == scores.hidden.keys()
    assert all(
        torch.equal(back.hidden[k], v) and back.hidden[k].dtype == v.dtype for k, v in scores.hidden.items()
    )
    partial = mk.apl.APLScores(
        ["a"], ("layer",), ["x"], {"x.w": 0}, {}, layer=torch.ones(1, 1, dtype=torch.float64)
    )
    partial.save(tmp_path / "p.safetensors")
    assert mk.apl.Scores.load(tmp_path / "p.safetensors").model is None


# ----------------------------------------------------------------------------------------------
# Multipliers and keep rates.
@pytest.mark.parametrize("tau", [0.05, 0.5, 1.0, 4.0])
def test_multipliers_average_one_in_every_group(tau):
    g = torch.Generator().manual_seed(0)
    s = torch.rand(3, 4, 50, generator=g, dtype=torch.float64) ** 3
    for dim in (-1, 1, 0):
        m = mk.apl.multipliers(s, tau, dim=dim)
        torch.testing.assert_close(m.mean(dim), torch.ones_like(m.mean(dim)), rtol=0, atol=1e-12)
        assert (m >= 0).all()
    # larger score, larger multiplier; a smaller temperature sharpens them
    m = mk.apl.multipliers(torch.tensor([1.0, 2.0, 3.0]), tau)
    assert m[0] < m[1] < m[2]
    assert mk.apl.multipliers(torch.tensor([1.0, 2.0, 3.0]), tau / 2)[2] > m[2]


def test_multipliers_edge_cases():
    ones = torch.ones(2, 5, dtype=torch.float64)
    assert torch.equal(mk.apl.multipliers(torch.zeros(2, 5), 1.0), ones)  # all-zero importance: uniform
    assert torch.equal(mk.apl.multipliers(torch.rand(2, 5), INF), ones)
    assert torch.equal(
        mk.apl.multipliers(torch.tensor([-1.0, 0.0, 2.0]), 1.0),
        mk.apl.multipliers(torch.tensor([0.0, 0.0, 2.0]), 1.0),
    )
    m = mk.apl.multipliers(
        torch.tensor([0.0, 0.0, 1e300], dtype=torch.float64), 1e-3
    )  # extreme: one unit takes everything
    assert torch.isfinite(m).all() and m[2] == 3.0
    with pytest.raises(ValueError, match="tau"):
        mk.apl.multipliers(torch.ones(3), 0.0)
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="NaN or infinite"):
            mk.apl.multipliers(torch.tensor([1.0, bad]), 1.0)


def test_keep_rates_clip():
    k = mk.apl.keep_rates(0.9, torch.tensor([0.5, 2.0, 20.0]), torch.tensor([1.0, 1.0, 1.0]), k_min=0.06)
    torch.testing.assert_close(k, torch.tensor([0.06, 0.2, 1.0], dtype=torch.float64))
    assert mk.apl.keep_rates(0.9, 1.0, 1.0).item() == 1.0 - 0.9


def test_plan_weights_and_levels(scores):
    p = mk.apl.plan(scores, tau2=0.5, scale=0.3)
    w = torch.tensor(p.weights, dtype=torch.float64)
    torch.testing.assert_close(w.mean(), torch.tensor(1.0, dtype=torch.float64))
    assert int(w.argmax()) == int(scores.model.argmax())
    torch.testing.assert_close(torch.tensor(p.merge_weights), 0.3 * w.float())
    assert mk.apl.plan(scores, tau2=INF).weights == [1.0, 1.0, 1.0]
    # the unit multipliers' siblings are all units of a block (fc1 and fc2 rows together)
    joined = torch.cat([p.row_mult["layers.1.fc1.weight"], p.row_mult["layers.1.fc2.weight"]], 1)
    torch.testing.assert_close(joined.mean(1), torch.ones(3, dtype=torch.float64))
    keep, row_len = p.keep("layers.1.fc1.weight", (16, 16))
    assert keep.shape == (3, 16) and row_len == 16
    c = torch.tensor(p.keep_scale, dtype=torch.float64)[:, None]
    k_min = torch.tensor(p.k_min, dtype=torch.float64)[:, None]
    expected = (1.0 - 0.9) * p.layer_mult[:, 2:3] * p.row_mult["layers.1.fc1.weight"] * c
    torch.testing.assert_close(keep, torch.maximum(expected.clamp(max=1.0), k_min), rtol=0, atol=0)
    bias_keep, bias_len = p.keep("layers.1.fc1.bias", (16,))
    assert torch.equal(bias_keep, keep) and bias_len == 1
    norm_keep, _ = p.keep("norm.weight", (16,))  # no units: the layer multiplier only
    torch.testing.assert_close(
        norm_keep[:, 0],
        torch.maximum(((1.0 - 0.9) * p.layer_mult[:, 5] * c[:, 0]).clamp(max=1.0), k_min[:, 0]),
        rtol=0,
        atol=0,
    )
    free, _ = p.keep("not.scored", (4, 4))  # unscored: plain 1 - p
    assert torch.equal(free, torch.full((3, 1), 1.0 - 0.9, dtype=torch.float64))


def test_levels_choose_what_shapes_the_merge(setup, scores):
    """A level left out of ``levels`` contributes multipliers (or weights) of exactly 1."""
    _, base, fts, _ = setup
    model_only = mk.apl.plan(scores, levels="model", tau2=0.5)
    assert model_only.weights == mk.apl.plan(scores, tau2=0.5).weights
    assert model_only.layer_mult is None and model_only.row_mult == {}
    assert model_only.keep_scale == [1.0, 1.0, 1.0]
    # without the model level the weights are 1; the keep rates are those of the full plan
    rows_only = mk.apl.plan(scores, levels=("layer", "hidden"), tau2=0.5)
    assert rows_only.weights == [1.0, 1.0, 1.0]
    full = mk.apl.plan(scores, tau2=0.5)
    keep, _ = rows_only.keep("layers.1.fc1.weight", (16, 16))
    assert torch.equal(keep, full.keep("layers.1.fc1.weight", (16, 16))[0])
    # model level only, equal weights: DARE + task arithmetic bit for bit, whatever tau1
    out = mk.apl.merge(base, fts, scores, levels=["model"], tau1=0.1, tau2=INF, drop=0.7, seed=3)
    assert _sd_equal(out, mk.merge(base, fts, "dare_linear", drop=0.7, seed=3))
    with pytest.raises(ValueError, match="unknown level 'rows'"):
        mk.apl.plan(scores, levels=("rows",))


# ----------------------------------------------------------------------------------------------
# Merging.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("drop", "scale"), [(0.9, 1.0), (0.5, 0.7)])
def test_infinite_temperatures_are_dare_with_task_arithmetic_bit_for_bit(setup, scores, dtype, drop, scale):
    _, base, fts, _ = setup
    base = {k: v.to(dtype) for k, v in base.items()}
    fts = [{k: v.to(dtype) for k, v in sd.items()} for sd in fts]
    out = mk.apl.merge(base, fts, scores, tau1=INF, tau2=INF, drop=drop, scale=scale, seed=11)
    dare = mk.merge(base, fts, "dare_linear", drop=drop, scale=scale, seed=11)
    assert _sd_equal(out, dare)
    name = "layers.0.fc1.weight"
    one = mk.dare(base[name], [sd[name] for sd in fts], drop=drop, scale=scale, seed=11, key=name)
    assert torch.equal(out[name], one)
    assert out[name].dtype == dtype


def test_all_zero_importance_is_dare(setup, scores):
    _, base, fts, _ = setup
    zero = APLScores(
        scores.tasks,
        scores.levels,
        scores.layer_names,
        scores.tensor_layer,
        scores.row_tensor,
        model=torch.zeros_like(scores.model),
        layer=torch.zeros_like(scores.layer),
        hidden={k: torch.zeros_like(v) for k, v in scores.hidden.items()},
    )
    out = mk.apl.merge(base, fts, zero, seed=2)
    assert all(torch.isfinite(v).all() for v in out.values())
    assert _sd_equal(out, mk.merge(base, fts, "dare_linear", seed=2))


def _reference(plan, name, base, fts, combine):
    """float64 reference of one tensor's random-mode APL merge from the plan's keep rates."""
    keep, row_len = plan.keep(name, base.shape)
    tau = ref.tau32(base, fts)
    n = tau.shape[1]
    vals = []
    for t in range(len(fts)):
        q = keep[t].float().repeat_interleave(row_len)[:n]
        mask = torch.from_numpy(ref.uniforms(plan.seed, name, t, 0, n)) < q
        vals.append(torch.where(mask, tau[t] / q, 0.0).double())
    vals = torch.stack(vals)
    w = torch.tensor(plan.weights, dtype=torch.float64)
    if combine == "ties":
        merged = ref.reduce_ties(vals, w, plan.ties_merge, weighted_election=True)
    else:
        merged = ref.reduce_plain(vals, w, "sum")
    return (base.double().reshape(-1) + plan.scale * merged).reshape(base.shape).to(base.dtype)


@pytest.mark.parametrize(
    ("combine", "ties_merge"), [("task_arithmetic", "sum"), ("ties", "sum"), ("ties", "mean")]
)
def test_merge_matches_float64_reference(setup, scores, combine, ties_merge):
    _, base, fts, _ = setup
    params = {
        "drop": 0.7,
        "tau1": 0.5,
        "tau2": 2.0,
        "scale": 0.8,
        "seed": 4,
        "combine": combine,
        "k_min": 0.01,
        "rescale_warning": 1000.0,  # k_min = 0.01 at p = 0.7 rescales by up to 100: intended here
    }
    params["ties_merge"] = ties_merge
    out = mk.apl.merge(base, fts, scores, **params)
    plan = mk.apl.plan(scores, **params)
    for name in base:
        assert_close_to_ref(out[name], _reference(plan, name, base[name], [sd[name] for sd in fts], combine))
    # the registry path and the per-tensor entry point give the same bits
    via_registry = mk.merge(base, fts, "apl", scores=scores, **params)
    assert _sd_equal(out, via_registry)
    name = "layers.3.fc2.weight"
    assert torch.equal(out[name], mk.apl.merge_tensor(name, base[name], [sd[name] for sd in fts], plan))
    assert torch.equal(out[name], plan.merge_tensor(name, base[name], [sd[name] for sd in fts]))


def test_masks_do_not_depend_on_order_or_chunking(setup, scores):
    _, base, fts, _ = setup
    plan = mk.apl.plan(scores, drop=0.6)
    name = "layers.2.fc1.weight"
    b, f = base[name], [sd[name] for sd in fts]
    whole = plan.merge_tensor(name, b, f)
    rows = [
        plan.merge_tensor(name, b[r0 : r0 + 5], [x[r0 : r0 + 5] for x in f], element_offset=r0 * 16)
        for r0 in range(0, 16, 5)
    ]
    assert torch.equal(torch.cat(rows), whole)
    reordered = mk.apl.merge(
        dict(reversed(list(base.items()))), [dict(reversed(list(sd.items()))) for sd in fts], scores, drop=0.6
    )
    assert torch.equal(reordered[name], whole)


def _one_tensor_scores(unit_scores, name="w.weight", layer_levels=False):
    hidden = torch.as_tensor(unit_scores, dtype=torch.float64)
    return APLScores(
        [f"t{i}" for i in range(hidden.shape[0])],
        ("hidden",),
        ["w."],
        {name: 0, "w.bias": 0},
        {name: name, "w.bias": name},
        hidden={name: hidden},
    )


def test_per_row_keep_rates_are_realised():
    rows, cols = 4, 60000
    base, fts = make_inputs(2, (rows, cols), seed=3)
    s = _one_tensor_scores([[0.0, 1.0, 2.0, 4.0], [3.0, 3.0, 0.5, 0.0]])
    plan = mk.apl.plan(s, drop=0.7)
    keep, _ = plan.keep("w.weight", (rows, cols))
    assert keep.min() < 0.1 and keep.max() > 0.6
    tau = ref.tau32(base, fts).reshape(2, rows, cols)
    for t in range(2):
        solo = dataclasses.replace(plan, weights=[1.0 if i == t else 0.0 for i in range(2)])
        out = solo.merge_tensor("w.weight", base, fts)
        kept = out != base
        for r in range(rows):
            k = float(keep[t, r])
            frac = kept[r].double().mean().item()
            sigma = math.sqrt(k * (1 - k) / cols)
            assert abs(frac - k) <= 5 * sigma + 1e-4, (t, r, frac, k)
            # survivors are rescaled by 1 / k
            q = torch.tensor(k, dtype=torch.float32)
            torch.testing.assert_close(
                (out[r] - base[r])[kept[r]], (tau[t, r] / q)[kept[r]], rtol=1e-5, atol=1e-6
            )


def test_within_magnitude_matches_reference():
    rows, cols = 6, 37
    base, fts = make_inputs(3, (rows, cols), seed=8)
    bbase, bfts = make_inputs(3, (rows,), seed=9)
    g = torch.Generator().manual_seed(1)
    s = _one_tensor_scores(torch.rand(3, rows, generator=g))
    for combine in ("task_arithmetic", "ties"):
        plan = mk.apl.plan(s, drop=0.6, tau1=0.3, scale=0.9, within="magnitude", combine=combine)
        for name, b, f in (("w.weight", base, fts), ("w.bias", bbase, bfts)):
            out = plan.merge_tensor(name, b, f)
            keep, _ = plan.keep(name, b.shape)
            tau = ref.tau32(b, f)
            r, n = (rows, cols) if b.dim() == 2 else (1, rows)
            frac = keep if b.dim() == 2 else keep.mean(1, keepdim=True)  # a 1-D tensor is one row
            vals = []
            for t in range(3):
                x = tau[t].reshape(r, n)
                count = torch.floor(frac[t] * n + 0.5).long()
                order = torch.sort(x.abs(), dim=1, stable=True).indices  # ascending, ties by position
                rank = torch.empty_like(order)
                rank.scatter_(1, order, torch.arange(n).expand(r, n))
                vals.append(torch.where(rank >= (n - count)[:, None], x, 0.0).reshape(-1).double())
            vals = torch.stack(vals)
            w = torch.tensor(plan.weights, dtype=torch.float64)
            if combine == "ties":
                merged = ref.reduce_ties(vals, w, "sum", weighted_election=True)
            else:
                merged = ref.reduce_plain(vals, w, "sum")
            expected = (b.double().reshape(-1) + 0.9 * merged).reshape(b.shape).float()
            assert_close_to_ref(out, expected)
            kept_per_row = (vals[0].reshape(r, n) != 0).sum(1)
            assert torch.equal(kept_per_row, torch.floor(frac[0] * n + 0.5).long())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_odd_shapes_and_dtypes(dtype):
    shapes = {
        "a.weight": (1,),
        "b.weight": (7,),
        "c.weight": (3, 5, 7),
        "d.weight": (33, 65),
        "d.bias": (33,),
        "e.weight": (2, 2051),
    }
    base, fts = {}, [{}, {}]
    for i, (name, shape) in enumerate(shapes.items()):
        b, f = make_inputs(2, shape, dtype, seed=i)
        base[name] = b
        for t in range(2):
            fts[t][name] = f[t]
    base["ids"] = torch.arange(4)
    for sd in fts:
        sd["ids"] = torch.arange(4) + 1
    g = torch.Generator().manual_seed(0)
    s = APLScores(
        ["x", "y"],
        ("model", "layer", "hidden"),
        ["c.", "d.", "e."],
        {"c.weight": 0, "d.weight": 1, "d.bias": 1, "e.weight": 2},
        {"c.weight": "c.weight", "d.weight": "d.weight", "d.bias": "d.weight", "e.weight": "e.weight"},
        model=torch.tensor([1.0, 2.0], dtype=torch.float64),
        layer=torch.rand(2, 3, generator=g, dtype=torch.float64),
        hidden={
            n: torch.rand(2, shapes[n][0], generator=g, dtype=torch.float64)
            for n in ("c.weight", "d.weight", "e.weight")
        },
    )
    for within in ("random", "magnitude"):
        out = mk.apl.merge(base, fts, s, within=within, combine="ties")
        assert torch.equal(out["ids"], base["ids"])
        for name in shapes:
            assert out[name].dtype == dtype and out[name].shape == base[name].shape
            assert torch.isfinite(out[name].float()).all()
    assert _sd_equal(
        mk.apl.merge(base, fts, s, tau1=INF, tau2=INF, seed=1), mk.merge(base, fts, "dare_linear", seed=1)
    )
    out = mk.apl.merge(base, fts, s, exclude=["d.*"])
    assert torch.equal(out["d.weight"], base["d.weight"]) and torch.equal(out["d.bias"], base["d.bias"])


def test_bf16_model_importance(setup):
    model, _, fts, cal = setup
    m16 = Net()
    m16.load_state_dict(model.state_dict())
    m16.to(torch.bfloat16)
    fts16 = [{k: v.bfloat16() for k, v in sd.items()} for sd in fts]
    cal16 = {k: [(x.bfloat16(), y) for x, y in v] for k, v in cal.items()}
    s = mk.apl.importance(m16, loss_fn, cal16, fts16)
    assert s.model.dtype == torch.float64 and torch.isfinite(s.model).all()
    assert all(p.dtype == torch.bfloat16 and p.grad is None for p in m16.parameters())


# ----------------------------------------------------------------------------------------------
# No data, fallbacks and errors.
def test_no_scores_is_refused_unless_dare_fallback(setup):
    _, base, fts, _ = setup
    with pytest.raises(ValueError, match="scores is None.*fallback='dare'"):
        mk.apl.merge(base, fts, None)
    with pytest.raises(ValueError, match="needs scores"):
        mk.merge(base, fts, "apl")
    out = mk.apl.merge(base, fts, None, fallback="dare", drop=0.8, seed=3)
    assert _sd_equal(out, mk.merge(base, fts, "dare_linear", drop=0.8, seed=3))
    assert _sd_equal(mk.merge(base, fts, "apl", scores=None, fallback="dare", drop=0.8, seed=3), out)
    ties = mk.apl.merge(base, fts, None, fallback="dare", combine="ties", seed=3)
    expected = mk.merge(base, fts, "dare_ties", merge="sum", weighted_election=True, seed=3)
    assert _sd_equal(ties, expected)


def test_errors_name_the_argument(setup, scores):
    model, base, fts, cal = setup
    with pytest.raises(ValueError, match="calibration is empty"):
        mk.apl.importance(model, loss_fn, {}, fts)
    with pytest.raises(ValueError, match=r"calibration\['task1'\] has no batches"):
        mk.apl.importance(model, loss_fn, {**cal, "task1": []}, fts)
    with pytest.raises(ValueError, match="finetuned has 2 state dicts but calibration has 3"):
        mk.apl.importance(model, loss_fn, cal, fts[:2])
    with pytest.raises(ValueError, match="finetuned has tasks"):
        mk.apl.importance(model, loss_fn, cal, {"a": fts[0], "b": fts[1], "c": fts[2]})
    with pytest.raises(ValueError, match="levels: unknown level 'rows'"):
        mk.apl.importance(model, loss_fn, cal, fts, levels=("model", "rows"))
    with pytest.raises(ValueError, match="levels: unknown level 'unit'"):
        mk.apl.exact_importance(model, loss_fn, cal, fts, levels="unit")
    with pytest.raises(ValueError, match="grad_at"):
        mk.apl.importance(model, loss_fn, cal, fts, grad_at="merged")
    with pytest.raises(ValueError, match="layer must be"):
        mk.apl.importance(model, loss_fn, cal, fts, layer="module")
    with pytest.raises(ValueError, match="max_batches"):
        mk.apl.importance(model, loss_fn, cal, fts, max_batches=0)
    with pytest.raises(TypeError, match="loss_fn must return"):
        mk.apl.importance(model, lambda m, b: 1.0, cal, fts)
    bad = [dict(sd) for sd in fts]
    bad[1]["head.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"finetuned\['task1'\]\['head.weight'\] has shape"):
        mk.apl.importance(model, loss_fn, cal, bad)
    bad[1] = {k: v for k, v in fts[1].items() if k != "head.weight"}
    with pytest.raises(KeyError, match="lacks parameter 'head.weight'"):
        mk.apl.importance(model, loss_fn, cal, bad)
    with pytest.raises(ValueError, match="no parameter of the model"):
        mk.apl.importance(model, loss_fn, cal, [{"x": torch.ones(1)}] * 3)
    for kw, match in [
        ({"tau1": 0.0}, "tau1"),
        ({"tau2": -1.0}, "tau2"),
        ({"drop": 1.0}, "drop"),
        ({"combine": "mean"}, "combine"),
        ({"within": "top"}, "within"),
        ({"k_min": 2.0}, "k_min"),
        ({"fallback": "ta"}, "fallback"),
    ]:
        with pytest.raises(ValueError, match=match):
            mk.apl.merge(base, fts, scores, **kw)
    with pytest.raises(ValueError, match="scores has 3 tasks"):
        mk.apl.merge(base, fts[:2], scores)
    with pytest.raises(ValueError, match="finetuned is keyed by"):
        mk.apl.merge(base, {"a": fts[0], "b": fts[1], "c": fts[2]}, scores)
    by_name = mk.apl.merge(base, dict(zip(scores.tasks, fts, strict=True)), scores)
    assert _sd_equal(by_name, mk.apl.merge(base, fts, scores))
    with pytest.raises(ValueError, match="none of the scored tensors"):
        mk.apl.merge({"z": base["head.weight"]}, [{"z": sd["head.weight"]} for sd in fts], scores)
    with pytest.raises(ValueError, match="'head.weight' has shape"):
        plan = mk.apl.plan(scores)
        plan.merge_tensor("head.weight", torch.zeros(4, 16), [torch.ones(4, 16)] * 3)


def test_scores_path_through_the_registry(tmp_path, setup, scores):
    _, base, fts, _ = setup
    path = tmp_path / "s.safetensors"
    scores.save(path)
    assert _sd_equal(
        mk.merge(base, fts, "apl", scores=str(path), seed=1), mk.apl.merge(base, fts, scores, seed=1)
    )


# ----------------------------------------------------------------------------------------------
# The keep-rate allocation: each task's keep rates average exactly 1 - p over its elements.
def _model_scores(hidden_rows, layer_scores=None, model_scores=None):
    """Scores of a two-layer model: l0.weight [rows0, 30] with l0.bias, l1.weight [rows1, 7], l1.norm
    [7] (no units); `hidden_rows` is [T, rows0 + rows1] unit scores."""
    hidden = torch.as_tensor(hidden_rows, dtype=torch.float64)
    T, total = hidden.shape
    rows0 = total // 2 if total > 1 else 1
    tensors = {"l0.weight": 0, "l0.bias": 0, "l1.weight": 1, "l1.norm": 1}
    owners = {"l0.weight": "l0.weight", "l0.bias": "l0.weight", "l1.weight": "l1.weight"}
    units = {"l0.weight": hidden[:, :rows0], "l1.weight": hidden[:, rows0:]}
    units = {k: v for k, v in units.items() if v.shape[1] > 0}
    owners = {k: v for k, v in owners.items() if v in units}
    sizes = {"l0.weight": rows0 * 30, "l0.bias": rows0, "l1.weight": (total - rows0) * 7, "l1.norm": 7}
    return APLScores(
        [f"t{t}" for t in range(T)],
        ("model", "layer", "hidden"),
        ["l0.", "l1."],
        tensors,
        owners,
        model=torch.as_tensor(model_scores if model_scores is not None else [1.0] * T, dtype=torch.float64),
        layer=torch.as_tensor(
            layer_scores if layer_scores is not None else [[1.0, 1.0]] * T, dtype=torch.float64
        ),
        hidden=units,
        numel={k: v for k, v in sizes.items() if k in tensors and (k in owners or k == "l1.norm")},
    )


def _mean_keep(plan, scores):
    """Element-weighted mean keep rate per task over the scored tensors."""
    kept, total = 0.0, 0
    for name, numel in scores.numel.items():
        owner = scores.row_tensor.get(name)
        if owner == name:
            rows = scores.hidden[name].shape[1]
            keep, row_len = plan.keep(name, (rows, numel // rows))
            kept = kept + (keep * row_len).sum(1)
        else:
            keep, _ = plan.keep(name, (numel,))
            kept = kept + (keep.sum(1) if keep.shape[1] == numel else keep[:, 0] * numel)
        total += numel
    return kept / total


ADVERSARIAL = {
    "one huge score": [[1e30] + [1.0] * 9, [1.0] * 9 + [1e30]],
    "all zero": [[0.0] * 10, [0.0] * 10],
    "ties": [[2.0] * 5 + [1.0] * 5, [3.0] * 10],
    "heavy tail": [[10.0**i for i in range(10)], [float(i % 3) for i in range(10)]],
}


@pytest.mark.parametrize("case", sorted(ADVERSARIAL))
@pytest.mark.parametrize("tau1", [0.05, 1.0])
@pytest.mark.parametrize("k_min", [None, 0.0])
def test_keep_rates_average_exactly_one_minus_p(case, tau1, k_min):
    scores = _model_scores(ADVERSARIAL[case], layer_scores=[[5.0, 0.1], [0.0, 1.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # k_min = 0 may rescale without bound
        plan = mk.apl.plan(scores, drop=[0.9, 0.6], tau1=tau1, k_min=k_min)
    mean = _mean_keep(plan, scores)
    torch.testing.assert_close(mean, torch.tensor([0.1, 0.4], dtype=torch.float64), rtol=0, atol=1e-9)
    for name in scores.numel:
        shape = (
            (scores.hidden[name].shape[1], scores.numel[name] // scores.hidden[name].shape[1])
            if (scores.row_tensor.get(name) == name)
            else (scores.numel[name],)
        )
        keep, _ = plan.keep(name, shape)
        floor = torch.tensor(plan.k_min, dtype=torch.float64)[:, None]
        assert bool((keep <= 1.0).all()) and bool((keep >= floor).all())


def test_a_single_row_keeps_exactly_one_minus_p():
    scores = _one_tensor_scores([[7.0], [0.0]])
    plan = mk.apl.plan(scores, drop=0.8)
    keep, _ = plan.keep("w.weight", (1, 9))
    assert torch.equal(keep, torch.full((2, 1), 1.0 - 0.8, dtype=torch.float64))


def test_largest_rescale_is_bounded_and_reported():
    peaked = _model_scores([[1e6] + [1e-3] * 19, [1.0] * 20])
    plan = mk.apl.plan(peaked, drop=0.9, tau1=0.01)
    assert plan.max_rescale[0] <= 4 / 0.1 * (1 + 1e-12)  # k_min defaults to (1 - p) / 4
    assert plan.max_rescale[1] == pytest.approx(10.0)  # equal scores: DARE's 1 / (1 - p)
    with pytest.warns(RuntimeWarning, match=r"task 't0' rescales its rarest kept entries by"):
        loose = mk.apl.plan(peaked, drop=0.9, tau1=0.01, k_min=0.0)
    assert loose.max_rescale[0] > 100
    with pytest.raises(ValueError, match="k_min = 0.5 is above the mean keep rate"):
        mk.apl.plan(peaked, drop=0.9, k_min=0.5)


def test_nan_or_infinite_scores_are_refused():
    for bad in (math.nan, math.inf):
        scores = _model_scores([[1.0, bad, 2.0, 3.0], [1.0] * 4])
        with pytest.raises(ValueError, match="NaN or infinite"):
            mk.apl.plan(scores, drop=0.9)


def test_allocate_solves_the_budget_exactly():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        rates = torch.rand(500, generator=g, dtype=torch.float64) ** 8 * 3
        weights = torch.randint(1, 100, (500,), generator=g).double()
        c = mk.apl.allocate(0.2, rates, weights, 0.02)
        kept = (c * rates).clamp(0.02, 1.0)
        assert abs(float((kept * weights).sum() / weights.sum()) - 0.2) < 1e-12
    assert mk.apl.allocate(0.3, torch.full((5,), 0.3, dtype=torch.float64), torch.ones(5), 0.0) == 1.0
