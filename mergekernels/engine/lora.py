"""``model+lora`` references: a checkpoint with a PEFT LoRA adapter applied as its tensors are read.

The adapter (a directory or hub id holding ``adapter_config.json`` and ``adapter_model.safetensors``)
is read once; each target module's weight W is read as ``W + s * B @ A`` with s = alpha / r
(alpha / sqrt(r) with ``use_rslora``; ``alpha_pattern`` entries override alpha per module, r is the
factors' own rank), transposed for ``fan_in_fan_out`` layers (GPT-2's Conv1D) and for embeddings
(``lora_embedding_A`` / ``lora_embedding_B``). The product is an ATen matmul in float32 over only
the rows asked for, added to the weight in float32 and rounded once to its dtype; no merged copy is
ever written to disk. Tensors an adapter saves whole (``modules_to_save``) replace the model's.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .checkpoint import Checkpoint, CheckpointError, TensorInfo, header_problem, json_object

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_PREFIX = "base_model.model."
_FACTOR = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$"
)


class LoraCheckpoint:
    """A :class:`Checkpoint` whose reads include a LoRA adapter's updates (same interface)."""

    def __init__(self, model: Checkpoint, adapter: str | Path, *, allow_pickle: bool = False):
        self.model, self.adapter = model, Path(adapter)
        self.path, self.files, self.tensors = model.path, model.files, model.tensors
        self.directory = model.directory
        config = self._config()
        self.alpha = self._number(config.get("lora_alpha", 8), "lora_alpha")
        self.alpha_pattern = self._patterns(config.get("alpha_pattern"))
        self.rslora = self._flag(config, "use_rslora")
        self.fan_in_fan_out = self._flag(config, "fan_in_fan_out")
        if self._flag(config, "use_dora"):
            raise CheckpointError(
                f"{self._config_file}: DoRA adapters (use_dora) are not supported, only LoRA"
            )
        self.updates: dict[str, tuple[torch.Tensor, torch.Tensor, float, bool]] = {}
        self.replaced: dict[str, torch.Tensor] = {}
        self._load(allow_pickle)
        # the adapter's files count in the resume fingerprint (its config sets alpha, rsLoRA ...)
        self.files = [*model.files, *self._weight_files, self.adapter / ADAPTER_CONFIG]

    def _config(self) -> dict:
        file = self._config_file = self.adapter / ADAPTER_CONFIG
        if not file.is_file():
            raise CheckpointError(f"{self.adapter}: not a LoRA adapter (no {ADAPTER_CONFIG})")
        config = json_object(file)
        if config.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"{file}: not a LoRA adapter (peft_type {config.get('peft_type')!r})")
        return config

    # The values the update uses are checked here, naming the key: a wrong type would otherwise fail
    # mid-merge, on the reader thread, with a TypeError or re.error naming nothing.
    def _number(self, value, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise CheckpointError(f"{self._config_file}: {key} must be a finite number, got {value!r:.80}")
        return value

    def _flag(self, config: dict, key: str) -> bool:
        value = config.get(key)
        if value is not None and not isinstance(value, bool):
            raise CheckpointError(f"{self._config_file}: {key} must be true or false, got {value!r:.80}")
        return bool(value)

    def _patterns(self, value) -> dict[re.Pattern, float]:
        """alpha_pattern as {compiled pattern: alpha}: a key matches a module name or its last
        dotted parts (``down_proj`` matches ``model.layers.0.mlp.down_proj``)."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise CheckpointError(
                f"{self._config_file}: alpha_pattern must map module patterns to alphas, got {value!r:.80}"
            )
        patterns = {}
        for pattern, alpha in value.items():
            self._number(alpha, f"alpha_pattern[{pattern!r}]")
            try:
                patterns[re.compile(rf"(.*\.)?{pattern}")] = alpha
            except re.error as exc:
                raise CheckpointError(
                    f"{self._config_file}: alpha_pattern key {pattern!r} is not a regular expression ({exc})"
                ) from None
        return patterns

    def _load(self, allow_pickle: bool) -> None:
        weights = next((self.adapter / n for n in ADAPTER_WEIGHTS if (self.adapter / n).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{self.adapter}: no {' or '.join(ADAPTER_WEIGHTS)}")
        self._weight_files = [weights]
        try:
            if weights.suffix == ".safetensors":
                state = load_file(str(weights))
            elif allow_pickle:
                state = torch.load(weights, map_location="cpu", weights_only=True)
            else:
                raise CheckpointError(f"{weights}: a pickle adapter needs allow_pickle (--allow-pickle)")
        except (SafetensorError, OSError, RuntimeError) as exc:
            problem = header_problem(weights) if isinstance(exc, SafetensorError) else None
            raise CheckpointError(f"{weights}: cannot be read ({problem or exc})") from None
        factors: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            name = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
            match = _FACTOR.match(name)
            if match:
                factors.setdefault(match["module"], {})[match["kind"]] = value
            elif name in self.model.tensors:
                info = self.model.tensors[name]
                if tuple(value.shape) != tuple(info.shape):
                    raise CheckpointError(
                        f"{weights}: adapter tensor {key!r} has shape {list(value.shape)}, {name!r} of "
                        f"{self.model.path} {list(info.shape)}"
                    )
                self.replaced[name] = value.to(info.dtype)  # stored in the model's dtype, as merged
            elif "lora_magnitude_vector" in name:
                raise CheckpointError(f"{weights}: DoRA adapters are not supported ({key!r})")
            else:
                raise CheckpointError(
                    f"{weights}: adapter tensor {key!r} matches no tensor of {self.model.path}"
                )
        for module, pair in factors.items():
            embedding = "lora_embedding_A" in pair or "lora_embedding_B" in pair
            a, b = (
                (pair.get("lora_embedding_A"), pair.get("lora_embedding_B"))
                if embedding
                else (
                    pair.get("lora_A"),
                    pair.get("lora_B"),
                )
            )
            target = f"{module}.weight"
            if a is None or b is None:
                raise CheckpointError(f"{weights}: module {module!r} has only one of its two LoRA factors")
            if target not in self.model.tensors:
                raise CheckpointError(
                    f"{weights}: LoRA module {module!r} matches no tensor of {self.model.path}"
                )
            rank = a.shape[0]
            if rank == 0 or not (a.is_floating_point() and b.is_floating_point()):
                raise CheckpointError(
                    f"{weights}: module {module!r} needs floating-point LoRA factors of rank >= 1, got "
                    f"{a.dtype} {list(a.shape)} and {b.dtype} {list(b.shape)}"
                )
            alpha = self._alpha(module)
            scale = alpha / math.sqrt(rank) if self.rslora else alpha / rank
            transposed = embedding or self.fan_in_fan_out
            shape = self.model.tensors[target].shape
            out_shape = (b.shape[0], a.shape[1]) if not transposed else (a.shape[1], b.shape[0])
            if tuple(out_shape) != tuple(shape):
                raise CheckpointError(
                    f"{weights}: LoRA update of {target!r} has shape {list(out_shape)}, "
                    f"the weight {list(shape)}"
                )
            self._check_range(weights, module, target, a, b, scale)
            self.updates[target] = (a.float(), b.float(), scale, transposed)

    def _check_range(self, weights, module: str, target: str, a, b, scale: float) -> None:
        """Finite factors, and an update |s * B @ A| <= s * r * max|A| * max|B| within the weight's
        dtype (an overflow would fail mid-merge, or read as NaN / Inf in the model's file)."""
        dtype = self.model.tensors[target].dtype
        a_max, b_max = a.abs().max().item() if a.numel() else 0.0, b.abs().max().item() if b.numel() else 0.0
        if not (math.isfinite(a_max) and math.isfinite(b_max)):
            raise CheckpointError(f"{weights}: the LoRA factors of module {module!r} hold NaN or Inf")
        bound = abs(scale) * a.shape[0] * a_max * b_max
        limit = torch.finfo(dtype).max if dtype.is_floating_point else torch.finfo(torch.float32).max
        if not bound <= limit:
            raise CheckpointError(
                f"{weights}: the LoRA update of {target!r} may overflow {dtype} (scale {scale:g} from "
                f"lora_alpha / alpha_pattern in {self._config_file.name}, factors up to {a_max:g}, {b_max:g})"
            )

    def _alpha(self, module: str) -> float:
        for pattern, alpha in self.alpha_pattern.items():
            if pattern.fullmatch(module):
                return alpha
        return self.alpha

    # the Checkpoint interface ------------------------------------------------------------------
    def names(self) -> list[str]:
        return self.model.names()

    def __contains__(self, name: str) -> bool:
        return name in self.model

    def info(self, name: str) -> TensorInfo:
        return self.model.info(name)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The model's tensor (or rows of it) with the adapter's update added."""
        if name in self.replaced:
            whole = self.replaced[name]
            return (whole if rows is None else whole[rows[0] : rows[1]]).clone()
        tensor = self.model.read(name, rows)
        if name not in self.updates:
            return tensor
        a, b, scale, transposed = self.updates[name]
        lo, hi = rows if rows is not None else (0, tensor.shape[0])
        # rows of s * B @ A, or of its transpose (embeddings, fan_in_fan_out): only those computed
        delta = a[:, lo:hi].T @ b.T if transposed else b[lo:hi] @ a
        return torch.add(tensor.float(), delta, alpha=scale).to(tensor.dtype)

    def close(self) -> None:
        self.model.close()

    def __repr__(self) -> str:
        return (
            f"LoraCheckpoint({str(self.model.path)!r} + {str(self.adapter)!r}, {len(self.updates)} update(s))"
        )


__all__ = ["LoraCheckpoint"]
