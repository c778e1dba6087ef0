"""Text-classification tasks for the text testbed, built from data that ships in Debian packages.

Nothing comes from a model hub or a data-set hub: :func:`fetch_packages` downloads the packages of
:data:`PACKAGES` with ``apt-get download`` (no root needed, nothing is installed) and unpacks them
with ``dpkg-deb -x`` into a directory the caller caches. :func:`build_tasks` then reads the files:

=================  =====================================================  ===========================
task               input text                                             label
=================  =====================================================  ===========================
``wn_noun``        a WordNet noun definition (gloss without examples)     its lexical file (10 largest)
``wn_verb``        a WordNet verb definition                              its lexical file (10 largest)
``wn_lemma``       a noun synset's words ("dog, domestic dog, ...")       its lexical file (10 largest)
``wn_pos``         a WordNet definition of any part of speech             noun / verb / adjective / adverb
``language``       three words of one dictionary, space-separated         the dictionary's language (9)
``fortune``        one fortune cookie of the ``fortunes`` package         its file (8 topical files)
``man_section``    the description on a man page's NAME line              2 / 3 / 7 / 4 and 5 together
=================  =====================================================  ===========================

Every task is drawn with fixed seeds, balanced across classes as far as the data allows (each class
at most its equal share of :data:`EXAMPLES_PER_TASK`), and split per class into train / validation /
test in the proportions :data:`SPLIT_FRACTIONS`. A sentence that two classes share is dropped from both.
"""

from __future__ import annotations

import gzip
import random
import re
import shutil
import subprocess
import tempfile
from collections import defaultdict
from pathlib import Path

# Debian package -> what the testbed reads from it.
PACKAGES: dict[str, str] = {
    "wordnet-base": "WordNet 3.0 data files (usr/share/wordnet/data.*)",
    "fortunes": "fortune cookie files (usr/share/games/fortunes)",
    "wamerican": "English word list",
    "wngerman": "German word list",
    "wfrench": "French word list",
    "wspanish": "Spanish word list",
    "witalian": "Italian word list",
    "wportuguese": "Portuguese word list",
    "wdutch": "Dutch word list",
    "wswedish": "Swedish word list",
    "wdanish": "Danish word list",
    "manpages": "Linux man pages, sections 2, 4, 5, 7",
    "manpages-dev": "Linux man pages, sections 2 and 3",
}

TASKS: tuple[str, ...] = ("wn_noun", "wn_verb", "wn_lemma", "wn_pos", "language", "fortune", "man_section")
SPLIT_FRACTIONS = {"train": 0.625, "val": 0.125, "test": 0.25}
EXAMPLES_PER_TASK = 1600  # at most, over all splits; each class gets at most its equal share
SEED = 13

# WordNet's lexicographer files, by number (WordNet 3.0's lexnames, a fixed documented list).
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather "
    "adj.ppl"
).split()
POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
# language -> (its word list in usr/share/dict, the package that ships it)
LANGUAGES = {
    "english": ("american-english", "wamerican"),
    "german": ("ngerman", "wngerman"),
    "french": ("french", "wfrench"),
    "spanish": ("spanish", "wspanish"),
    "italian": ("italian", "witalian"),
    "portuguese": ("portuguese", "wportuguese"),
    "dutch": ("dutch", "wdutch"),
    "swedish": ("swedish", "wswedish"),
    "danish": ("danish", "wdanish"),
}
FORTUNE_FILES = ("computers", "politics", "science", "songs-poems", "work", "art", "law", "education")
MAN_SECTIONS = {
    "2": "system call",
    "3": "library function",
    "4": "file or format",
    "5": "file or format",
    "7": "overview",
}


class DataUnavailable(RuntimeError):
    """The Debian packages could not be downloaded or unpacked."""


# ----------------------------------------------------------------------------------------------
# Fetching.
def fetch_packages(dest: str | Path) -> dict[str, str]:
    """Download the packages of :data:`PACKAGES` and unpack them into ``dest``.

    Uses ``apt-get download`` (into a temporary directory; nothing is installed) and
    ``dpkg-deb -x``. Returns {package: version}. Raises :class:`DataUnavailable` naming the
    package and the command's message when either step fails.
    """
    dest = Path(dest)
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise DataUnavailable(
                f"text testbed: {tool} not found; the tasks are built from Debian packages "
                f"({', '.join(PACKAGES)}). On a machine without apt, unpack those packages' .deb files "
                "into one directory and pass it as data_dir"
            )
    versions = {}
    with tempfile.TemporaryDirectory(prefix="mk-debs-") as tmp:
        run = subprocess.run(
            ["apt-get", "download", *PACKAGES], cwd=tmp, capture_output=True, text=True, check=False
        )
        if run.returncode != 0:
            raise DataUnavailable(
                "text testbed: `apt-get download " + " ".join(PACKAGES) + "` failed "
                f"(exit {run.returncode}): {run.stderr.strip()[-800:]}\n"
                "(run `apt-get update` first if the package lists are missing)"
            )
        for package in PACKAGES:
            debs = sorted(Path(tmp).glob(f"{package}_*.deb"))
            if len(debs) != 1:
                raise DataUnavailable(f"text testbed: apt-get download gave no single .deb for {package!r}")
            versions[package] = debs[0].name.split("_")[1].replace("%3a", ":")
            unpack = subprocess.run(
                ["dpkg-deb", "-x", str(debs[0]), str(dest)], capture_output=True, text=True, check=False
            )
            if unpack.returncode != 0:
                raise DataUnavailable(f"text testbed: dpkg-deb -x {debs[0].name} failed: {unpack.stderr}")
    return versions


# ----------------------------------------------------------------------------------------------
# Readers of the unpacked files.
def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _wordnet_synsets(root: Path):
    """(part of speech letter, lexical file name, words, definition) of every WordNet synset."""
    for pos in ("noun", "verb", "adj", "adv"):
        path = root / "usr/share/wordnet" / f"data.{pos}"
        if not path.is_file():
            raise DataUnavailable(f"text testbed: {path} missing (package wordnet-base)")
        for line in _read_text(path).splitlines():
            if line.startswith(" ") or "|" not in line:
                continue  # the licence header
            fields, gloss = line.split("|", 1)
            parts = fields.split()
            lexfile = LEXNAMES[int(parts[1])]
            count = int(parts[3], 16)
            words = [parts[4 + 2 * i].replace("_", " ") for i in range(count)]
            words = [re.sub(r"\([a-z]+\)$", "", w) for w in words]  # adjective markers: (a), (p), (ip)
            definition = gloss.split('; "')[0].strip().rstrip(";").strip()
            yield parts[2], lexfile, words, definition


def _wordnet_tasks(root: Path) -> dict[str, list[tuple[str, str]]]:
    synsets = list(_wordnet_synsets(root))
    nouns = [(s[1], s[2], s[3]) for s in synsets if s[0] == "n" and s[1] != "noun.Tops"]
    verbs = [(s[1], s[3]) for s in synsets if s[0] == "v"]
    noun_classes = _largest([lex for lex, _, _ in nouns], 10)
    verb_classes = _largest([lex for lex, _ in verbs], 10)
    return {
        "wn_noun": [(d, lex) for lex, _, d in nouns if lex in noun_classes],
        "wn_verb": [(d, lex) for lex, d in verbs if lex in verb_classes],
        "wn_lemma": [(", ".join(w), lex) for lex, w, _ in nouns if lex in noun_classes],
        "wn_pos": [(s[3], POS_NAMES[s[0]]) for s in synsets],
    }


def _largest(labels: list[str], n: int) -> set[str]:
    counts: dict[str, int] = defaultdict(int)
    for label in labels:
        counts[label] += 1
    return set(sorted(counts, key=lambda k: (-counts[k], k))[:n])


def _language_task(root: Path, rng: random.Random) -> list[tuple[str, str]]:
    """Three words of one language's dictionary; a word in two dictionaries is not used."""
    lists = {}
    for language, (name, package) in LANGUAGES.items():
        path = root / "usr/share/dict" / name
        if not path.is_file():
            raise DataUnavailable(f"text testbed: {path} missing (package {package})")
        words = {w for w in _read_text(path).split() if len(w) >= 4 and w.isalpha() and w.islower()}
        lists[language] = words
    seen: dict[str, int] = defaultdict(int)
    for words in lists.values():
        for w in words:
            seen[w] += 1
    examples = []
    per_language = EXAMPLES_PER_TASK // len(LANGUAGES) + 1
    for language, words in lists.items():
        unique = sorted(w for w in words if seen[w] == 1)
        picked = rng.sample(unique, 3 * per_language)
        examples += [(" ".join(picked[3 * i : 3 * i + 3]), language) for i in range(per_language)]
    return examples


def _fortune_task(root: Path) -> list[tuple[str, str]]:
    examples = []
    for name in FORTUNE_FILES:
        path = root / "usr/share/games/fortunes" / name
        if not path.is_file():
            raise DataUnavailable(f"text testbed: {path} missing (package fortunes)")
        for cookie in re.split(r"^%$", _read_text(path), flags=re.MULTILINE):
            text = " ".join(cookie.split())
            if len(text) >= 20:
                examples.append((text, name))
    return examples


def _man_task(root: Path) -> list[tuple[str, str]]:
    examples = []
    for page in sorted((root / "usr/share/man").glob("man[2-7]/*.gz")):
        section = page.parent.name[3:]
        if section not in MAN_SECTIONS:
            continue
        with gzip.open(page, "rt", encoding="utf-8", errors="replace") as f:
            text = f.read()
        match = re.search(r"^\.SH NAME\s*\n(.+?)\n\.", text, flags=re.MULTILINE | re.DOTALL)
        if match is None:
            continue  # a .so link to another page
        line = " ".join(match.group(1).split())
        if "\\-" not in line:
            continue
        description = line.split("\\-", 1)[1].strip()
        description = re.sub(r"\\f[BIRP]|\\\(..|\\", "", description).strip()
        if description:
            examples.append((description, MAN_SECTIONS[section]))
    return examples


# ----------------------------------------------------------------------------------------------
# Tasks and splits.
def build_tasks(root: str | Path) -> dict[str, dict]:
    """The tasks of :data:`TASKS` from the unpacked packages in ``root``.

    Returns {task: {"classes": [class names, sorted], "splits": {split: [[text, label index], ...]}}}.
    """
    root = Path(root)
    rng = random.Random(SEED)
    raw = _wordnet_tasks(root)
    raw["language"] = _language_task(root, rng)
    raw["fortune"] = _fortune_task(root)
    raw["man_section"] = _man_task(root)
    return {task: _split(task, raw[task], random.Random(f"{SEED}-{task}")) for task in TASKS}


def _split(task: str, examples: list[tuple[str, str]], rng: random.Random) -> dict:
    by_text: dict[str, set[str]] = defaultdict(set)
    for text, label in examples:
        by_text[text].add(label)
    by_class: dict[str, list[str]] = defaultdict(list)
    for text in sorted(by_text):
        labels = by_text[text]
        if len(labels) == 1:
            by_class[next(iter(labels))].append(text)
    classes = sorted(by_class)
    if len(classes) < 2:
        raise DataUnavailable(f"text testbed: task {task!r} has fewer than two classes in the data")
    cap = EXAMPLES_PER_TASK // len(classes)
    splits: dict[str, list] = {split: [] for split in SPLIT_FRACTIONS}
    for index, label in enumerate(classes):
        texts = by_class[label]
        rng.shuffle(texts)
        texts = texts[:cap]
        n_test = round(len(texts) * SPLIT_FRACTIONS["test"])
        n_val = round(len(texts) * SPLIT_FRACTIONS["val"])
        splits["test"] += [[t, index] for t in texts[:n_test]]
        splits["val"] += [[t, index] for t in texts[n_test : n_test + n_val]]
        splits["train"] += [[t, index] for t in texts[n_test + n_val :]]
    for rows in splits.values():
        rng.shuffle(rows)
    return {"classes": classes, "splits": splits}
