"""Our built-in chat templates (mergekernels/vocab/chat_templates/<name>.jinja) against mergekit's.

mergekit 0.1.5 accepts ``chat_template: <name>`` for five names and writes its own Jinja file of
that name into the output tokenizer. Ours are written independently, so the check here is on what
users see: every conversation below is rendered through transformers' ``apply_chat_template``
(``tokenize=False``) with our file and with mergekit's file of the same name, with and without
``add_generation_prompt``, and the two strings must be equal; where mergekit's template raises
for a conversation, ours must raise the same kind of error.

mergekit's files are read (never imported) from its cached environment (``make mergekit-venv``,
see tests/mergekit_oracle.py); without it the comparisons are skipped.
"""

from __future__ import annotations

from pathlib import Path

import jinja2
import pytest

from .mergekit_oracle import REPO, oracle_venv

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

NAMES = ("alpaca", "chatml", "exaone", "llama3", "mistral")
OURS = REPO / "mergekernels" / "vocab" / "chat_templates"


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


def _system(text):
    return {"role": "system", "content": text}


# Conversations every template must render without error (in mergekit's as in ours).
CORE = {
    "single_user": [_user("What is the capital of France?")],
    "system_user": [_system("You are a helpful assistant."), _user("Hi!")],
    "multi_turn": [_user("Name a prime."), _assistant("7"), _user("Another one?")],
    "system_ending_with_assistant": [
        _system("Answer briefly."),
        _user("2+2?"),
        _assistant("4"),
        _user("And 3+3?"),
        _assistant("6"),
    ],
    "whitespace_and_newlines": [
        _system("  \n Be terse.\n\n"),
        _user("\n  Hello,\n  world!  \n"),
        _assistant(" \tSure.\n "),
        _user("\n"),
    ],
    "empty_contents": [_system(""), _user(""), _assistant(""), _user("   ")],
    "markup_in_content": [
        _user("{{ not a template }} {% raw %} <|im_end|> [INST] </s> [|endofturn|]"),
        _assistant("<|eot_id|>### Response:\nunicode: héllo ✓ 你好"),
    ],
}

# Odd shapes: some templates raise for them (mistral refuses roles out of order), others render
# them in their own way; ours must do the same as mergekit's either way.
ODD = {
    "assistant_first": [_assistant("I start."), _user("Ok.")],
    "two_users_in_a_row": [_user("one"), _user("two")],
    "two_assistants_in_a_row": [_user("q"), _assistant("a1"), _assistant("a2")],
    "system_only": [_system("Just a system prompt.")],
    "two_systems": [_system("First system."), _system("Second system."), _user("Which one?")],
    "system_in_the_middle": [_user("q"), _system("late system"), _assistant("a")],
    "system_last": [_user("q"), _assistant("a"), _system(" trailing system ")],
    "user_context": [
        _system("sys"),
        _user("Summarize."),
        {"role": "user_context", "content": " The text. "},
        _assistant("Summary."),
    ],
    "tool_role": [_user("Weather?"), {"role": "tool", "content": "sunny"}, _assistant("It is sunny.")],
    "list_content": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    "assistant_without_content": [_user("q"), {"role": "assistant", "content": None}, _user("q2")],
    "system_without_content": [{"role": "system", "content": None}, _user("q")],
}

CONVERSATIONS = {**CORE, **ODD}


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny in-memory fast tokenizer with bos ``<s>`` and eos ``</s>`` (the templates read them)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def mergekit_templates_dir() -> Path | None:
    """mergekit's ``_data/chat_templates`` in the cached oracle environment, or None."""
    venv = oracle_venv()
    for found in sorted(venv.glob("lib/python*/site-packages/mergekit/_data/chat_templates")):
        if found.is_dir():
            return found
    return None


@pytest.fixture(scope="module")
def mergekit_dir() -> Path:
    found = mergekit_templates_dir()
    if found is None:
        pytest.skip(
            f"mergekit's chat templates not found under {oracle_venv()}/lib/python*/site-packages/mergekit/"
            "_data/chat_templates: build the oracle environment with `make mergekit-venv`"
        )
    return found


def render(tokenizer, template: str, messages, add_generation_prompt: bool) -> str:
    """What a user of the merged model gets: ``apply_chat_template`` with the template, as text."""
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def outcome(tokenizer, template: str, messages, add_generation_prompt: bool):
    """("ok", text) or ("raises", exception type)."""
    try:
        return "ok", render(tokenizer, template, messages, add_generation_prompt)
    except Exception as exc:  # compared by type below
        return "raises", type(exc)


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("name", NAMES)
def test_same_text_as_mergekit(name, conversation, tokenizer, mergekit_dir):
    ours = (OURS / f"{name}.jinja").read_text()
    theirs = (mergekit_dir / f"{name}.jinja").read_text()
    messages = CONVERSATIONS[conversation]
    for add_generation_prompt in (False, True):
        expected = outcome(tokenizer, theirs, messages, add_generation_prompt)
        got = outcome(tokenizer, ours, messages, add_generation_prompt)
        if conversation in CORE:
            assert expected[0] == "ok", f"mergekit's {name} template raised {expected[1]} on {conversation}"
        assert got == expected, f"{name} / {conversation} / add_generation_prompt={add_generation_prompt}"


def test_mistral_refuses_roles_out_of_order(tokenizer, mergekit_dir):
    """The shapes mistral's format cannot express raise in both (so the comparison above is not vacuous)."""
    ours = (OURS / "mistral.jinja").read_text()
    theirs = (mergekit_dir / "mistral.jinja").read_text()
    for conversation in ("assistant_first", "two_users_in_a_row", "two_assistants_in_a_row", "tool_role"):
        for template in (ours, theirs):
            with pytest.raises(jinja2.exceptions.TemplateError):
                render(tokenizer, template, CONVERSATIONS[conversation], False)


@pytest.mark.parametrize("name", NAMES)
def test_our_templates_render(name, tokenizer):
    """Needs no mergekit: each file exists and renders a system + user conversation with the user's text."""
    path = OURS / f"{name}.jinja"
    assert path.is_file(), f"missing {path}"
    text = path.read_text()
    assert text.startswith("{#-"), "each template starts with a Jinja comment saying what it renders"
    messages = [_system("You are terse."), _user("Tell me about tokenizers.")]
    for add_generation_prompt in (False, True):
        out = render(tokenizer, text, messages, add_generation_prompt)
        assert "Tell me about tokenizers." in out
