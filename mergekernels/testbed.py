"""A small, real model-merging testbed: six input-transformed digit tasks on one MLP.

The recipe (version ``digits-v1``), every step seeded and run in float32 on the CPU:

- Data: scikit-learn's bundled digits (8x8 images, 1,797 samples) scaled to [0, 1], split by a
  fixed permutation (seed 0) into 1,100 train / 300 validation / 397 test samples.
- Tasks: the ten labels stay, the input changes: ``rot90`` (a quarter turn counter-clockwise,
  :func:`torch.rot90`), ``rot180``, ``hflip`` (mirror left to right), ``invert`` (1 - x) and two
  fixed random pixel permutations ``permute1`` / ``permute2`` (seeds 1 and 2).
- Model (:class:`DigitsMLP`): a body 64 -> 128 -> 128 -> 128 of nn.Linear layers ``body.fc1``,
  ``body.fc2``, ``body.fc3``, each followed by a ReLU, and a 10-way head ``head``.
- Pre-training (the base): 400 full-batch Adam steps (lr 1e-3) of body and head on a mixture of the
  original train digits, four copies shifted by one pixel (up, down, left, right; zero fill), one
  copy with Gaussian noise (sigma 0.1, seed 3, clipped to [0, 1]) and 30 labelled train examples
  of every task (seeded choice, seed 4 + task index), transformed. The head is never trained again.
- Experts: one per task; the body (head frozen) fine-tunes for 200 full-batch Adam steps (lr 3e-4)
  on that task's train split, starting from the base.
- Score: normalised accuracy, the mean over tasks of (merged model's accuracy on task t) /
  (expert t's accuracy on task t). Merge coefficients are picked on validation and the score is
  reported on test (:func:`pick_and_score`).

Layout on disk (``build_testbed``): ``base/`` and ``expert-<task>/`` each hold ``model.safetensors``
(float32) and ``config.json``; ``data.safetensors`` holds the scaled images, labels, split indices
and pixel permutations; ``manifest.json``, written last, records the recipe version and the
sha256 of every other file. A directory whose manifest is missing, of another recipe or whose
hashes do not match is rebuilt: into a temporary sibling directory, renamed into place at the end,
so a reader never sees a half-written testbed.

Determinism: the same torch build on the same machine (same thread count) gives the same bytes;
other BLAS libraries or thread counts may round differently, which the manifest does not check
(its hashes guard integrity, not cross-machine reproducibility).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import cachedir

RECIPE = "digits-v1"
TASKS: tuple[str, ...] = ("rot90", "rot180", "hflip", "invert", "permute1", "permute2")
# Seeds of the two pixel permutations (by task name).
PERMUTATION_SEEDS = {"permute1": 1, "permute2": 2}
SPLIT_SEED = 0
NOISE_SEED = 3
FEW_SHOT_SEED = 4  # plus the task's index
INIT_SEED = 5
SPLIT_SIZES = {"train": 1100, "val": 300, "test": 397}
SPLITS = tuple(SPLIT_SIZES)

INPUT_DIM = 64
HIDDEN = 128
CLASSES = 10
PRETRAIN_STEPS = 400
PRETRAIN_LR = 1e-3
FINETUNE_STEPS = 200
FINETUNE_LR = 3e-4
FEW_SHOT_PER_TASK = 30
NOISE_SIGMA = 0.1
# One-pixel shifts of the pre-training mixture, as (rows, columns); the uncovered edge is zero.
SHIFTS = ((-1, 0), (1, 0), (0, -1), (0, 1))

# Module names of the body's linear layers (their weights are what merging changes).
BODY_LINEAR = ("body.fc1", "body.fc2", "body.fc3")

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
DATA_FILE = "data.safetensors"
MANIFEST_FILE = cachedir.MANIFEST_FILE


class DigitsMLP(torch.nn.Module):
    """The testbed's model: body ``fc1`` 64 -> 128, ``fc2`` / ``fc3`` 128 -> 128 (ReLU after each)
    and a linear 10-way ``head``. State-dict names: ``body.fc1.weight`` ... ``head.bias``."""

    def __init__(self, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            OrderedDict(
                [
                    ("fc1", torch.nn.Linear(INPUT_DIM, hidden)),
                    ("act1", torch.nn.ReLU()),
                    ("fc2", torch.nn.Linear(hidden, hidden)),
                    ("act2", torch.nn.ReLU()),
                    ("fc3", torch.nn.Linear(hidden, hidden)),
                    ("act3", torch.nn.ReLU()),
                ]
            )
        )
        self.head = torch.nn.Linear(hidden, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def model_config(task: str | None) -> dict:
    """The ``config.json`` of the base (``task=None``) or of the expert for ``task``."""
    return {
        "architecture": "digits-mlp",
        "input": INPUT_DIM,
        "hidden": HIDDEN,
        "layers": 3,
        "classes": CLASSES,
        "activation": "relu",
        "dtype": "float32",
        "recipe": RECIPE,
        "task": task,
    }


# ----------------------------------------------------------------------------------------------
# Data and tasks.
def transform(task: str, images: torch.Tensor, permutations: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Apply task ``task`` to flattened 8x8 images ``images`` [N, 64] (``"original"``: none).

    ``permutations`` maps ``permute1`` / ``permute2`` to their pixel orders ([64] int64).
    """
    if task == "original":
        return images
    if task in PERMUTATION_SEEDS:
        return images[:, permutations[task]]
    if task == "invert":
        return 1.0 - images
    square = images.reshape(-1, 8, 8)
    if task == "rot90":
        square = torch.rot90(square, 1, dims=(1, 2))
    elif task == "rot180":
        square = torch.rot90(square, 2, dims=(1, 2))
    elif task == "hflip":
        square = torch.flip(square, dims=(2,))
    else:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    return square.reshape(-1, INPUT_DIM).contiguous()


def _shift(images: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Shift 8x8 images by (rows, cols) pixels, filling the uncovered edge with zeros."""
    square = images.reshape(-1, 8, 8)
    out = torch.zeros_like(square)
    src_r = slice(max(0, -rows), 8 - max(0, rows))
    dst_r = slice(max(0, rows), 8 - max(0, -rows))
    src_c = slice(max(0, -cols), 8 - max(0, cols))
    dst_c = slice(max(0, cols), 8 - max(0, -cols))
    out[:, dst_r, dst_c] = square[:, src_r, src_c]
    return out.reshape(-1, INPUT_DIM)


def make_data() -> dict[str, torch.Tensor]:
    """The digits data set, scaled and split, with the pixel permutations: the tensors of
    ``data.safetensors`` (``images`` [1797, 64] float32 in [0, 1], ``labels`` int64,
    ``split.<train|val|test>`` int64 indices, ``permutation.<task>`` int64 [64])."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.data, dtype=torch.float32) / 16.0
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    if images.shape != (sum(SPLIT_SIZES.values()), INPUT_DIM):
        raise RuntimeError(
            f"testbed: scikit-learn's digits have shape {tuple(images.shape)}, expected 1797x64"
        )
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(SPLIT_SEED))
    data = {"images": images.contiguous(), "labels": labels.contiguous()}
    start = 0
    for split, size in SPLIT_SIZES.items():
        data[f"split.{split}"] = order[start : start + size].clone()
        start += size
    for task, seed in PERMUTATION_SEEDS.items():
        data[f"permutation.{task}"] = torch.randperm(INPUT_DIM, generator=torch.Generator().manual_seed(seed))
    return data


def _permutations(data: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {task: data[f"permutation.{task}"] for task in PERMUTATION_SEEDS}


def _pretraining_mixture(data: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels of the pre-training mixture (see the module docstring)."""
    train = data["split.train"]
    x, y = data["images"][train], data["labels"][train]
    parts, targets = [x], [y]
    for rows, cols in SHIFTS:
        parts.append(_shift(x, rows, cols))
        targets.append(y)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(NOISE_SEED))
    parts.append((x + NOISE_SIGMA * noise).clamp(0.0, 1.0))
    targets.append(y)
    permutations = _permutations(data)
    for i, task in enumerate(TASKS):
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(FEW_SHOT_SEED + i))
        pick = pick[:FEW_SHOT_PER_TASK]
        parts.append(transform(task, x[pick], permutations))
        targets.append(y[pick])
    return torch.cat(parts), torch.cat(targets)


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    """Deterministic algorithms on, the global RNG untouched; both restored afterwards."""
    previous = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=warn_only)


def _train(model: torch.nn.Module, params, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> None:
    """Full-batch Adam on the cross entropy."""
    optimizer = torch.optim.Adam(params, lr=lr)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()


def _state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.float32).clone().contiguous() for k, v in model.state_dict().items()}


def train_models(
    data: Mapping[str, torch.Tensor], steps_scale: float = 1.0
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Pre-train the base and fine-tune one expert per task (in :data:`TASKS` order).

    Args:
        data: the tensors of :func:`make_data`.
        steps_scale: multiplies both step counts (default 1.0, the recipe; tests use less).

    Returns:
        (base state dict, expert state dicts), float32 on the CPU.
    """
    pretrain_steps = max(1, round(PRETRAIN_STEPS * steps_scale))
    finetune_steps = max(1, round(FINETUNE_STEPS * steps_scale))
    with _deterministic():
        torch.manual_seed(INIT_SEED)
        model = DigitsMLP()
        x, y = _pretraining_mixture(data)
        _train(model, model.parameters(), x, y, pretrain_steps, PRETRAIN_LR)
        base = _state_dict(model)
        permutations = _permutations(data)
        train = data["split.train"]
        experts = []
        for task in TASKS:
            model.load_state_dict(base)
            model.head.requires_grad_(False)
            task_x = transform(task, data["images"][train], permutations)
            _train(model, model.body.parameters(), task_x, data["labels"][train], finetune_steps, FINETUNE_LR)
            experts.append(_state_dict(model))
    return base, experts


# ----------------------------------------------------------------------------------------------
# The cache directory.
def default_directory() -> Path:
    """``$MK_CACHE_DIR/testbed-digits-v1`` if MK_CACHE_DIR is set, else
    ``~/.cache/mergekernels/testbed-digits-v1``."""
    return cachedir.cache_root() / f"testbed-{RECIPE}"


def _expected_files() -> list[str]:
    files = [DATA_FILE, f"base/{MODEL_FILE}", f"base/{CONFIG_FILE}"]
    for task in TASKS:
        files += [f"expert-{task}/{MODEL_FILE}", f"expert-{task}/{CONFIG_FILE}"]
    return files


def _manifest_fields(steps_scale: float) -> dict:
    return {"recipe": RECIPE, "steps_scale": steps_scale, "tasks": list(TASKS)}


def read_manifest(directory: str | Path, steps_scale: float = 1.0) -> dict | None:
    """The manifest of a complete, intact testbed in ``directory``, or None when the directory
    is missing, has no manifest (an interrupted build), holds another recipe or ``steps_scale``
    (default 1.0), or any file's sha256 differs from the manifest's."""
    return cachedir.read_manifest(directory, _manifest_fields(steps_scale), _expected_files())


def _write_testbed(directory: Path, steps_scale: float) -> None:
    """Build every file of the testbed into the existing empty ``directory``, manifest last."""
    data = make_data()
    save_file(data, directory / DATA_FILE)
    base, experts = train_models(data, steps_scale)
    for task, state_dict in [(None, base), *zip(TASKS, experts, strict=True)]:
        sub = directory / ("base" if task is None else f"expert-{task}")
        sub.mkdir()
        save_file(state_dict, sub / MODEL_FILE)
        (sub / CONFIG_FILE).write_text(json.dumps(model_config(task), indent=2) + "\n")
    cachedir.write_manifest(directory, _manifest_fields(steps_scale), _expected_files())


def build_testbed(
    directory: str | Path | None = None, *, force: bool = False, steps_scale: float = 1.0
) -> Testbed:
    """Load the digits testbed from ``directory``, building it first if needed.

    Args:
        directory: where the testbed lives (default :func:`default_directory`:
            ``$MK_CACHE_DIR/testbed-digits-v1``, or ``~/.cache/mergekernels/testbed-digits-v1``).
        force: rebuild even if ``directory`` holds a complete testbed (default False).
        steps_scale: multiplies the pre-training and fine-tuning step counts (default 1.0, the
            recipe). Only for tests that need a faster build; it is recorded in the manifest, so a
            testbed built with one value is never loaded as another.

    A complete testbed (its manifest names this recipe and ``steps_scale`` and every file's sha256
    matches) is loaded as it is. Otherwise it is built into a temporary sibling directory and
    renamed into place, so readers never see a partial testbed. (A build killed midway leaves its
    ``.testbed-digits-v1.build-*`` scratch directory next to ``directory``; it is never read.)
    """
    directory = Path(directory).expanduser() if directory is not None else default_directory()
    steps_scale = float(steps_scale)
    if not steps_scale > 0:
        raise ValueError(f"build_testbed: steps_scale must be positive, got {steps_scale}")
    start = time.perf_counter()
    _, built = cachedir.build(
        directory,
        lambda scratch: _write_testbed(scratch, steps_scale),
        lambda d: read_manifest(d, steps_scale),
        force,
    )
    return Testbed(
        directory=directory,
        base_dir=directory / "base",
        expert_dirs={task: directory / f"expert-{task}" for task in TASKS},
        tasks=list(TASKS),
        built=built,
        seconds=time.perf_counter() - start,
    )


# ----------------------------------------------------------------------------------------------
# Using a testbed.
@dataclass
class TestbedBase:
    """What every testbed (digits, text) has: its directories, tasks and scores normalised by the
    experts. Subclasses provide ``accuracies(state_dict, split, tasks)`` and
    ``expert_accuracy(task, split)``, ``describe()`` and the model-specific parts the demo uses.

    Attributes:
        directory: the testbed's directory.
        base_dir: ``directory/base``, an HF-style model directory.
        expert_dirs: task -> ``directory/expert-<task>``, in :attr:`tasks` order.
        tasks: the task names, in the testbed's fixed order.
        built: whether ``build_testbed`` built it (True) or loaded it from the cache (False).
        seconds: how long ``build_testbed`` took.
    """

    directory: Path
    base_dir: Path
    expert_dirs: dict[str, Path]
    tasks: list[str]
    built: bool = False
    seconds: float = 0.0
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The base (pre-trained) model's state dict, float32."""
        return load_file(self.base_dir / MODEL_FILE)

    def expert_state_dict(self, task: str) -> dict[str, torch.Tensor]:
        """The state dict of the expert for ``task``."""
        self._check_task(task)
        return load_file(self.expert_dirs[task] / MODEL_FILE)

    def expert_state_dicts(self) -> list[dict[str, torch.Tensor]]:
        """The experts' state dicts, in :attr:`tasks` order."""
        return [self.expert_state_dict(task) for task in self.tasks]

    def _check_task(self, task: str) -> None:
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; tasks: {', '.join(self.tasks)}")

    def normalised_accuracies(
        self, state_dict: Mapping[str, torch.Tensor], split: str = "test"
    ) -> dict[str, float]:
        """{task: accuracy of ``state_dict`` / accuracy of the task's expert} on ``split``."""
        out = {}
        for task, acc in self.accuracies(state_dict, split).items():
            reference = self.expert_accuracy(task, split)
            if reference == 0:
                raise RuntimeError(
                    f"testbed: the {task!r} expert scores 0 on {split!r}; nothing to normalise by"
                )
            out[task] = acc / reference
        return out

    def normalised_accuracy(self, state_dict: Mapping[str, torch.Tensor], split: str = "test") -> float:
        """Mean over tasks of (accuracy of ``state_dict`` on task t) / (expert t's accuracy on
        task t), on ``split`` (default ``"test"``)."""
        values = self.normalised_accuracies(state_dict, split)
        return sum(values.values()) / len(values)


@dataclass
class Testbed(TestbedBase):
    """A built digits testbed (see the module docstring); everything runs on the CPU in float32.
    Attributes as :class:`TestbedBase`."""

    merge_exclude: tuple[str, ...] = ("head.*",)  # the frozen head is never merged
    scale_grid: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5)  # the demo's coefficient grid

    def describe(self) -> str:
        return f"digits testbed ({len(self.tasks)} tasks: {', '.join(self.tasks)})"

    # -- models --
    def model(self, state_dict: Mapping[str, torch.Tensor]) -> torch.nn.Module:
        """A :class:`DigitsMLP` in eval mode holding (a float32 copy of) ``state_dict``.

        Built on the meta device, so making a model draws nothing from the global RNG.
        """
        with torch.device("meta"):
            model = DigitsMLP()
        weights = {
            k: torch.as_tensor(v).detach().to("cpu", torch.float32).clone() for k, v in state_dict.items()
        }
        model.load_state_dict(weights, strict=True, assign=True)
        return model.eval()

    # -- data --
    def _data(self) -> dict[str, torch.Tensor]:
        if "data" not in self._cache:
            self._cache["data"] = load_file(self.directory / DATA_FILE)
        return self._cache["data"]

    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")

    def inputs(self, task: str, split: str = "test") -> torch.Tensor:
        """Transformed inputs of ``task`` on ``split`` (default ``"test"``): float32 [N, 64]."""
        self._check_task(task)
        self._check_split(split)
        key = ("inputs", task, split)
        if key not in self._cache:
            data = self._data()
            images = data["images"][data[f"split.{split}"]]
            self._cache[key] = transform(task, images, _permutations(data))
        return self._cache[key]

    def labels(self, split: str = "test") -> torch.Tensor:
        """Labels (int64 [N], 0..9) of ``split`` (default ``"test"``); the same for every task."""
        self._check_split(split)
        data = self._data()
        return data["labels"][data[f"split.{split}"]]

    def calibration_batches(
        self, task: str, split: str = "train", batch_size: int = 256
    ) -> list[torch.Tensor]:
        """The transformed inputs of ``task`` on ``split`` (default ``"train"``) in order, in
        batches of ``batch_size`` (default 256; the last may be smaller)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        return list(torch.split(self.inputs(task, split), batch_size))

    def labelled_batches(
        self, task: str, split: str = "train", batch_size: int = 256
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, labels) batches of ``task`` on ``split`` (default ``"train"``), in order, of
        ``batch_size`` (default 256; the last may be smaller)."""
        inputs = self.calibration_batches(task, split, batch_size)
        labels = torch.split(self.labels(split), batch_size)
        return list(zip(inputs, labels, strict=True))

    def calibration(self, task: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """APL's calibration batches for ``task``: :meth:`labelled_batches` of the train split."""
        return self.labelled_batches(task, "train")

    @staticmethod
    def loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Mean cross entropy of ``model`` on one (inputs, labels) batch."""
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y)

    # -- scores --
    def accuracy(self, state_dict: Mapping[str, torch.Tensor], task: str, split: str = "test") -> float:
        """Accuracy of the model ``state_dict`` on ``task``'s ``split`` (default ``"test"``)."""
        return self.accuracies(state_dict, split, tasks=[task])[task]

    def accuracies(
        self, state_dict: Mapping[str, torch.Tensor], split: str = "test", tasks: Sequence[str] | None = None
    ) -> dict[str, float]:
        """{task: accuracy} of ``state_dict`` on ``split`` (default ``"test"``) for ``tasks``
        (default: all)."""
        model = self.model(state_dict)
        labels = self.labels(split)
        out = {}
        with torch.no_grad():
            for task in tasks if tasks is not None else self.tasks:
                predicted = model(self.inputs(task, split)).argmax(dim=1)
                out[task] = (predicted == labels).double().mean().item()
        return out

    def expert_accuracy(self, task: str, split: str = "test") -> float:
        """Accuracy of ``task``'s expert on ``task``'s ``split`` (default ``"test"``); cached."""
        self._check_task(task)
        self._check_split(split)
        key = ("expert_accuracy", task, split)
        if key not in self._cache:
            self._cache[key] = self.accuracy(self.expert_state_dict(task), task, split)
        return self._cache[key]

    # -- RegMean --
    def grams(self, reduction_ready: bool = True) -> dict[str, list[torch.Tensor]] | dict[str, dict]:
        """RegMean's input Grams: expert t on its own task's train split
        (:meth:`calibration_batches`), through :func:`mergekernels.collect_input_grams`, for every
        nn.Linear weight of the body (the frozen head is never merged). Float64; cached.

        Args:
            reduction_ready: True (default): ``{weight name: [Gram of task 1, ..., task T]}`` in
                :attr:`tasks` order, the layout ``mk.merge(..., method="regmean", grams=...)``
                takes. False: ``{task: {weight name: Gram}}``.
        """
        if "grams" not in self._cache:
            from .methods import collect_input_grams

            per_task = {}
            for task in self.tasks:
                model = self.model(self.expert_state_dict(task))
                per_task[task] = collect_input_grams(
                    model, self.calibration_batches(task), modules=BODY_LINEAR
                )
            self._cache["grams"] = per_task
        per_task = self._cache["grams"]
        if not reduction_ready:
            return {task: dict(g) for task, g in per_task.items()}
        names = list(per_task[self.tasks[0]])
        return {name: [per_task[task][name] for task in self.tasks] for name in names}


def pick_and_score(
    testbed: Testbed, merge: Callable[[float], Mapping[str, torch.Tensor]], grid: Sequence[float]
) -> dict:
    """Pick a merge coefficient on validation and score it on test.

    Args:
        testbed: the testbed.
        merge: ``merge(value)`` returns the merged state dict for one coefficient value (e.g. a
            closure merging with ``scale=value``).
        grid: the values to try, in order; the first of equally good values wins.

    Returns:
        ``{"value": best value, "val": its validation normalised accuracy, "test": its test
        normalised accuracy, "seconds": how long merge(best value) took, "grid": [(value, val)]}``.
    """
    grid = list(grid)
    if not grid:
        raise ValueError("pick_and_score: grid is empty")
    best = None
    tried = []
    for value in grid:
        start = time.perf_counter()
        merged = merge(value)
        seconds = time.perf_counter() - start
        val = testbed.normalised_accuracy(merged, "val")
        tried.append((value, val))
        if best is None or val > best[1]:
            best = (value, val, seconds, merged)
    value, val, seconds, merged = best
    return {
        "value": value,
        "val": val,
        "test": testbed.normalised_accuracy(merged, "test"),
        "seconds": seconds,
        "grid": tried,
    }
