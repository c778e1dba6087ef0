"""The digits merging testbed: recipe pieces against hand-written references, the cache's manifest
and atomic rebuilds, determinism, and the scores.

Builds use ``steps_scale`` (fewer training steps) to keep the file fast: 0.25 for the tests that
look at accuracies, 0.02 for the tests of the cache mechanics (which only need some model).
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import mergekernels as mk
from mergekernels import cachedir
from mergekernels import testbed as tb

SCORED_SCALE = 0.25
CHEAP_SCALE = 0.02


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A testbed trained long enough for its experts to be experts."""
    return tb.build_testbed(tmp_path_factory.mktemp("scored") / "digits", steps_scale=SCORED_SCALE)


@pytest.fixture(scope="module")
def cheap(tmp_path_factory):
    """A testbed built with very few steps, for the cache tests."""
    return tb.build_testbed(tmp_path_factory.mktemp("cheap") / "digits", steps_scale=CHEAP_SCALE)


def _file_bytes(directory):
    return {name: (directory / name).read_bytes() for name in tb._expected_files()}


# ------------------------------------------------------------------------------------------------
# Recipe pieces.
def test_data_split_and_scaling(cheap):
    from sklearn.datasets import load_digits

    data = load_file(cheap.directory / tb.DATA_FILE)
    expected = torch.tensor(load_digits().data, dtype=torch.float64) / 16
    assert data["images"].dtype == torch.float32 and data["images"].shape == (1797, 64)
    assert torch.equal(data["images"].double(), expected)
    assert data["images"].min() == 0 and data["images"].max() == 1
    sizes = {split: data[f"split.{split}"].numel() for split in tb.SPLITS}
    assert sizes == {"train": 1100, "val": 300, "test": 397}
    together = torch.cat([data[f"split.{split}"] for split in tb.SPLITS])
    assert torch.equal(together.sort().values, torch.arange(1797))  # disjoint and complete
    for task in ("permute1", "permute2"):
        perm = data[f"permutation.{task}"]
        assert torch.equal(perm.sort().values, torch.arange(64)) and not torch.equal(perm, torch.arange(64))
    assert not torch.equal(data["permutation.permute1"], data["permutation.permute2"])
    labels = torch.tensor(load_digits().target)
    assert torch.equal(cheap.labels("val"), labels[data["split.val"]])


def _reference_transform(task, image, perm=None):
    """One 8x8 image (list of lists) transformed by explicit index arithmetic."""
    if task == "rot90":  # counter-clockwise quarter turn
        return [[image[j][7 - i] for j in range(8)] for i in range(8)]
    if task == "rot180":
        return [[image[7 - i][7 - j] for j in range(8)] for i in range(8)]
    if task == "hflip":
        return [[image[i][7 - j] for j in range(8)] for i in range(8)]
    if task == "invert":
        return [[1.0 - image[i][j] for j in range(8)] for i in range(8)]
    flat = [v for row in image for v in row]
    return [[flat[perm[8 * i + j]] for j in range(8)] for i in range(8)]


@pytest.mark.parametrize("task", tb.TASKS)
def test_transforms_match_index_arithmetic(task, cheap):
    images = torch.rand(3, 64, generator=torch.Generator().manual_seed(11))
    perms = tb._permutations(load_file(cheap.directory / tb.DATA_FILE))
    out = tb.transform(task, images, perms)
    for n in range(3):
        grid = images[n].reshape(8, 8).tolist()
        perm = perms[task].tolist() if task in perms else None
        expected = torch.tensor(_reference_transform(task, grid, perm))
        assert torch.allclose(out[n].reshape(8, 8), expected, rtol=0, atol=1e-7), task
    with pytest.raises(ValueError, match="unknown task"):
        tb.transform("rot45", images, perms)


@pytest.mark.parametrize("rows,cols", [(1, 0), (-1, 0), (0, 1), (0, -1)])
def test_one_pixel_shift_fills_with_zeros(rows, cols):
    image = torch.arange(1, 65, dtype=torch.float32)[None]
    out = tb._shift(image, rows, cols).reshape(8, 8)
    grid = image.reshape(8, 8)
    for i in range(8):
        for j in range(8):
            si, sj = i - rows, j - cols
            expected = grid[si, sj] if 0 <= si < 8 and 0 <= sj < 8 else 0.0
            assert out[i, j] == expected


def test_layout_configs_and_state_dicts(scored):
    assert scored.tasks == list(tb.TASKS)
    assert list(scored.expert_dirs) == scored.tasks
    base = scored.base_state_dict()
    shapes = {k: tuple(v.shape) for k, v in base.items()}
    assert shapes == {
        "body.fc1.weight": (128, 64),
        "body.fc1.bias": (128,),
        "body.fc2.weight": (128, 128),
        "body.fc2.bias": (128,),
        "body.fc3.weight": (128, 128),
        "body.fc3.bias": (128,),
        "head.weight": (10, 128),
        "head.bias": (10,),
    }
    for directory, task in [(scored.base_dir, None), *[(scored.expert_dirs[t], t) for t in scored.tasks]]:
        config = json.loads((directory / tb.CONFIG_FILE).read_text())
        assert config["architecture"] == "digits-mlp" and config["hidden"] == 128 and config["task"] == task
    for task, expert in zip(scored.tasks, scored.expert_state_dicts(), strict=True):
        assert all(v.dtype == torch.float32 for v in expert.values())
        # the head is frozen after pre-training; the body moved
        assert torch.equal(expert["head.weight"], base["head.weight"])
        assert torch.equal(expert["head.bias"], base["head.bias"])
        assert not torch.equal(expert["body.fc2.weight"], base["body.fc2.weight"]), task
    # the umask, not mkdtemp's 0700 or save_file's 0600, sets the permissions
    assert scored.directory.stat().st_mode & 0o777 == 0o777 & ~cachedir.umask()
    assert (scored.base_dir / tb.MODEL_FILE).stat().st_mode & 0o777 == 0o666 & ~cachedir.umask()
    manifest = json.loads((scored.directory / tb.MANIFEST_FILE).read_text())
    assert manifest["recipe"] == tb.RECIPE and manifest["steps_scale"] == SCORED_SCALE
    assert set(manifest["files"]) == set(tb._expected_files())


# ------------------------------------------------------------------------------------------------
# The cache: load, missing manifest, corruption, determinism.
def test_complete_testbed_is_loaded_not_rebuilt(cheap):
    stamps = {name: (cheap.directory / name).stat().st_mtime_ns for name in tb._expected_files()}
    again = tb.build_testbed(cheap.directory, steps_scale=CHEAP_SCALE)
    assert not again.built and cheap.built
    assert {name: (cheap.directory / name).stat().st_mtime_ns for name in tb._expected_files()} == stamps
    # another steps_scale is another testbed
    assert tb.read_manifest(cheap.directory, CHEAP_SCALE) is not None
    assert tb.read_manifest(cheap.directory, 1.0) is None


def test_force_rebuilds_a_complete_testbed(cheap, tmp_path):
    target = tmp_path / "digits"
    shutil.copytree(cheap.directory, target)
    (target / "marker").write_text("the old directory")
    rebuilt = tb.build_testbed(target, force=True, steps_scale=CHEAP_SCALE)
    assert rebuilt.built and not (target / "marker").exists()
    assert _file_bytes(target) == _file_bytes(cheap.directory)


def test_missing_manifest_rebuilds_the_same_bytes(cheap, tmp_path):
    """An interrupted build (no manifest) is rebuilt in full; two builds give identical files."""
    target = tmp_path / "digits"
    shutil.copytree(cheap.directory, target)
    (target / tb.MANIFEST_FILE).unlink()
    (target / "leftover.tmp").write_text("from an interrupted build")
    rng_state = torch.get_rng_state()
    deterministic = torch.are_deterministic_algorithms_enabled()
    rebuilt = tb.build_testbed(target, steps_scale=CHEAP_SCALE)
    assert rebuilt.built
    assert torch.equal(torch.get_rng_state(), rng_state)  # the build leaves the global RNG alone
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    assert not (target / "leftover.tmp").exists()  # the old directory was replaced as a whole
    assert _file_bytes(target) == _file_bytes(cheap.directory)
    assert [p.name for p in tmp_path.iterdir()] == ["digits"]  # no scratch directories left


def test_corrupt_file_triggers_a_rebuild(cheap, tmp_path):
    target = tmp_path / "digits"
    shutil.copytree(cheap.directory, target)
    victim = target / "expert-hflip" / tb.MODEL_FILE
    raw = bytearray(victim.read_bytes())
    raw[-5] ^= 0x40  # one flipped bit in the last weights
    victim.write_bytes(bytes(raw))
    assert tb.read_manifest(target, CHEAP_SCALE) is None
    rebuilt = tb.build_testbed(target, steps_scale=CHEAP_SCALE)
    assert rebuilt.built
    assert _file_bytes(target) == _file_bytes(cheap.directory)
    assert tb.read_manifest(target, CHEAP_SCALE) is not None


def test_default_directory_and_bad_arguments(monkeypatch, tmp_path):
    monkeypatch.setenv("MK_CACHE_DIR", str(tmp_path / "cache"))
    assert tb.default_directory() == tmp_path / "cache" / "testbed-digits-v1"
    monkeypatch.delenv("MK_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tb.default_directory() == tmp_path / "home" / ".cache" / "mergekernels" / "testbed-digits-v1"
    with pytest.raises(ValueError, match="steps_scale"):
        tb.build_testbed(tmp_path / "x", steps_scale=0)


# ------------------------------------------------------------------------------------------------
# Scores.
def _reference_accuracy(state_dict, inputs, labels):
    """Accuracy from explicit float64 matrix products."""
    h = inputs.double()
    for layer in ("fc1", "fc2", "fc3"):
        w, b = state_dict[f"body.{layer}.weight"].double(), state_dict[f"body.{layer}.bias"].double()
        h = torch.clamp(h @ w.T + b, min=0)
    logits = h @ state_dict["head.weight"].double().T + state_dict["head.bias"].double()
    return (logits.argmax(1) == labels).double().mean().item()


def test_accuracy_matches_an_explicit_forward(scored):
    base = scored.base_state_dict()
    for task in scored.tasks:
        for split in ("val", "test"):
            expected = _reference_accuracy(base, scored.inputs(task, split), scored.labels(split))
            # float32 vs float64 logits may flip one near-tie
            assert abs(scored.accuracy(base, task, split) - expected) <= 1.001 / len(scored.labels(split))


def test_experts_beat_the_base_on_their_own_task(scored):
    base = scored.base_state_dict()
    for task in scored.tasks:
        for split in ("val", "test"):
            assert scored.expert_accuracy(task, split) > scored.accuracy(base, task, split) + 0.05, task


def test_normalised_accuracy(scored):
    experts = scored.expert_state_dicts()
    for task, expert in zip(scored.tasks, experts, strict=True):
        assert scored.normalised_accuracies(expert, "test")[task] == 1.0
    base = scored.base_state_dict()
    expected = sum(scored.accuracy(base, t) / scored.expert_accuracy(t) for t in scored.tasks) / 6
    assert scored.normalised_accuracy(base) == pytest.approx(expected, rel=1e-12)
    assert 0 < scored.normalised_accuracy(base) < 1
    rng_state = torch.get_rng_state()
    scored.model(base)
    assert torch.equal(torch.get_rng_state(), rng_state)  # making a model draws no random numbers
    with pytest.raises(ValueError, match="unknown split"):
        scored.accuracy(base, "rot90", "dev")
    with pytest.raises(ValueError, match="unknown task"):
        scored.expert_accuracy("rot45")


def test_batches(scored):
    for task in ("rot90", "permute2"):
        batches = scored.calibration_batches(task, batch_size=256)
        assert [b.shape[0] for b in batches] == [256, 256, 256, 256, 76]
        assert torch.equal(torch.cat(batches), scored.inputs(task, "train"))
        labelled = scored.labelled_batches(task, "val", batch_size=128)
        assert [x.shape[0] for x, _ in labelled] == [128, 128, 44]
        assert torch.equal(torch.cat([y for _, y in labelled]), scored.labels("val"))
        model = scored.model(scored.expert_state_dict(task))
        loss = scored.loss_fn(model, labelled[0])
        x, y = labelled[0]
        expected = -torch.log_softmax(model(x).double(), 1)[torch.arange(len(y)), y].mean()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_grams_are_each_experts_inputs_on_its_own_task(scored):
    grams = scored.grams()
    assert list(grams) == ["body.fc1.weight", "body.fc2.weight", "body.fc3.weight"]
    by_task = scored.grams(reduction_ready=False)
    for t, task in enumerate(scored.tasks):
        expert = scored.expert_state_dict(task)
        h = scored.inputs(task, "train").double()
        for layer in ("fc1", "fc2", "fc3"):
            expected = h.T @ h / h.shape[0]
            got = grams[f"body.{layer}.weight"][t]
            assert got.dtype == torch.float64 and got.shape == expected.shape
            assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())
            assert torch.equal(by_task[task][f"body.{layer}.weight"], got)
            w, b = expert[f"body.{layer}.weight"].double(), expert[f"body.{layer}.bias"].double()
            h = torch.clamp(h @ w.T + b, min=0)


def test_regmean_on_the_testbed_beats_zero_shot(scored):
    base, experts = scored.base_state_dict(), scored.expert_state_dicts()
    merged = mk.merge(base, experts, method="regmean", grams=scored.grams(), exclude=["head.*"])
    assert torch.equal(merged["head.weight"], base["head.weight"])
    assert scored.normalised_accuracy(merged) > scored.normalised_accuracy(base) + 0.1


def test_pick_and_score_picks_on_validation(scored):
    base, experts = scored.base_state_dict(), scored.expert_state_dicts()
    calls = []

    def merge(scale):
        calls.append(scale)
        return mk.merge(base, experts, method="task_arithmetic", scale=scale, exclude=["head.*"])

    grid = [0.0, 0.2, 3.0]
    result = tb.pick_and_score(scored, merge, grid)
    assert calls == grid
    vals = [scored.normalised_accuracy(merge(s), "val") for s in grid]
    assert [v for _, v in result["grid"]] == vals
    best = max(range(3), key=lambda i: (vals[i], -i))  # first of equals
    assert result["value"] == grid[best] and result["val"] == vals[best]
    assert result["test"] == scored.normalised_accuracy(merge(grid[best]), "test")
    assert result["seconds"] >= 0
    with pytest.raises(ValueError, match="grid is empty"):
        tb.pick_and_score(scored, merge, [])
