"""Tiny models with real tokenizers that differ by added tokens, for the tokenizer-merge tests.

A tokenizer here is a byte-free BPE over lower-case letters (``tokenizers``), saved with
``transformers`` as a fast tokenizer (``tokenizer.json`` + ``tokenizer_config.json``): ids 0-2 are the
special tokens ``<unk> <s> </s>``, then the letters, then a few merged words. A model adds regular
tokens (entries of the BPE vocabulary) and added tokens (special or not) after those, so two models
can give the same id to different tokens, as fine-tuned models that add chat or tool markers do.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path

import torch

from . import mergekit_oracle as oracle

SPECIALS = ["<unk>", "<s>", "</s>"]
MERGES = [("t", "h"), ("th", "e"), ("a", "n"), ("an", "d"), ("i", "n"), ("in", "g")]


def base_vocabulary() -> dict[str, int]:
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in string.ascii_lowercase:
        vocab[ch] = len(vocab)
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    return vocab


def write_tokenizer(
    directory: str | Path,
    *,
    regular: Sequence[str] = (),
    added: Sequence[str] = (),
    special: Sequence[str] = (),
    chat_template: str | None = None,
) -> int:
    """Save a tokenizer into ``directory``: the base vocabulary, then ``regular`` tokens in the BPE
    vocabulary, then ``added`` (normal) and ``special`` added tokens, in that order. Returns its length."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = base_vocabulary()
    for tok in regular:
        vocab[tok] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=list(MERGES), unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.add_tokens([AddedToken(t, special=False) for t in added])
    tok.add_special_tokens({"additional_special_tokens": list(special)}) if special else None
    if chat_template is not None:
        tok.chat_template = chat_template
    tok.save_pretrained(str(directory))
    return len(tok)


def write_vocab_model(
    directory: str | Path,
    *,
    rows: int | None = None,
    seed: int = 0,
    tie_embeddings: bool = False,
    dtype: torch.dtype = torch.float32,
    perturb_from: dict[str, torch.Tensor] | None = None,
    **tokens,
) -> dict[str, torch.Tensor]:
    """A tiny Llama checkpoint whose embedding (and lm_head) has one row per token of its tokenizer
    (``rows`` more, padded, when given), plus that tokenizer; returns its tensors. Rows the base shares
    with ``perturb_from`` are the base's plus noise; the rest are fresh."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tok")
    length = write_tokenizer(tmp, **tokens)
    rows = rows or length
    tensors = oracle.write_model(
        directory,
        "llama",
        layers=2,
        hidden=16,
        intermediate=24,
        vocab=rows,
        heads=2,
        kv_heads=1,
        seed=seed,
        dtype=dtype,
        tie_embeddings=tie_embeddings,
        shards=1,
    )
    if perturb_from is not None:  # the shared tensors (and shared rows) stay close to the base's
        from safetensors.torch import save_file

        g = torch.Generator().manual_seed(seed + 1000)
        for name, value in tensors.items():
            base = perturb_from[name].float()
            if value.shape == base.shape:
                tensors[name] = (base + 0.01 * torch.randn(value.shape, generator=g)).to(dtype)
            else:
                shared = min(value.shape[0], base.shape[0])
                fresh = value.float().clone()
                fresh[:shared] = base[:shared] + 0.01 * torch.randn(fresh[:shared].shape, generator=g)
                tensors[name] = fresh.to(dtype)
        save_file(tensors, str(directory / "model-00001-of-00001.safetensors"), metadata={"format": "pt"})
    for f in tmp.iterdir():
        f.rename(directory / f.name)
    tmp.rmdir()
    return tensors
