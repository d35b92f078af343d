"""Generative benchmark tasks made by code (nothing read or downloaded), as instruction rows.

- ``facts``: made-up people with made-up attributes (home town, job, pet, drink). Training rows ask each
  fact in several phrasings; test rows ask the same facts in a phrasing never used in training, so the
  test measures stored facts, not memorized prompts. Capacity binds: every fact is a separate mapping.
- ``skills``: deterministic string skills (reverse a word's letters, sort them, write an ISO date in
  words, write a number in words); test rows apply them to inputs never seen in training.
- ``translate``: English sentences into a made-up language: a lexicon of made-up words (one per English
  word) and a grammar (adjective after its noun, verb last). Test sentences are new combinations of words
  the training sentences all use: the skill of translating, which needs the whole lexicon stored.

Rows are ``{"prompt", "response"}`` (the column names ``task: instruction`` reads by default); the same seed
and sizes always give the same rows. Write them with
``python benchmarks/tasks.py write --task facts --out DIR [--seed 0] [sizes]``: ``DIR/train.jsonl`` and
``DIR/test.jsonl``, a folder ``data.dataset`` (or ``train_file`` / ``test_file``) reads.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from layermoe.data.synthetic import make_word  # noqa: E402

Row = dict[str, str]
# Per attribute: the training phrasings, then the test phrasing (never used in training).
ATTRIBUTES: dict[str, tuple[tuple[str, ...], str]] = {
    "town": (
        ("Where does {name} live?", "In which town is the home of {name}?", "Name the home town of {name}."),
        "{name} has a house in which town?",
    ),
    "job": (
        ("What does {name} do for a living?", "What is the job of {name}?", "Name the profession of {name}."),
        "{name} earns money working as what?",
    ),
    "pet": (
        (
            "What is the name of the pet of {name}?",
            "What is the pet of {name} called?",
            "Name the pet of {name}.",
        ),
        "{name} owns an animal with which name?",
    ),
    "drink": (
        (
            "What does {name} like to drink?",
            "What is the favourite drink of {name}?",
            "Name the drink {name} likes.",
        ),
        "{name} always orders which drink?",
    ),
}


@dataclass(frozen=True)
class TaskRows:
    """A task's rows and a one-line description of its sizes."""

    train: list[Row]
    test: list[Row]
    description: str


def _made_up_names(rng: random.Random, count: int, words: int, taken: set[str]) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = " ".join(make_word(rng).capitalize() for _ in range(words))
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


def facts_rows(
    seed: int = 0, entities: int = 60, attributes: int = 3, phrasings: int = 2, values_per_attribute: int = 20
) -> TaskRows:
    """``entities`` made-up people x ``attributes`` facts each; ``phrasings`` training rows per fact and one
    test row per fact. Values come from a made-up pool of ``values_per_attribute`` words per attribute."""
    if not 1 <= attributes <= len(ATTRIBUTES):
        raise ValueError(f"attributes must be in 1..{len(ATTRIBUTES)}, got {attributes}")
    if not 1 <= phrasings <= 3:
        raise ValueError(f"phrasings must be in 1..3 (the training phrasings per attribute), got {phrasings}")
    if entities < 1 or values_per_attribute < 1:
        raise ValueError("entities and values_per_attribute must be >= 1")
    rng = random.Random(seed)
    taken: set[str] = set()
    names = _made_up_names(rng, entities, 2, taken)
    chosen = list(ATTRIBUTES)[:attributes]
    pools = {a: _made_up_names(rng, values_per_attribute, 1, taken) for a in chosen}
    train: list[Row] = []
    test: list[Row] = []
    for name in names:
        for attribute in chosen:
            value = rng.choice(pools[attribute])
            train_phrasings, test_phrasing = ATTRIBUTES[attribute]
            train += [{"prompt": p.format(name=name), "response": value} for p in train_phrasings[:phrasings]]
            test.append({"prompt": test_phrasing.format(name=name), "response": value})
    rng.shuffle(train)
    rng.shuffle(test)
    description = (
        f"facts: {entities} people x {attributes} attributes = {len(test)} facts, {phrasings} training "
        f"phrasings each ({len(train)} train rows), 1 unseen phrasing each ({len(test)} test rows)"
    )
    return TaskRows(train, test, description)


ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen".split()
ONES += "sixteen seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
MONTHS = "January February March April May June July August September October November December".split()


def number_in_words(n: int) -> str:
    """0..999 in English words, e.g. 347 -> "three hundred forty-seven"."""
    if not 0 <= n <= 999:
        raise ValueError(f"number_in_words takes 0..999, got {n}")
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    rest = n % 100
    return ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_in_words(rest))


def _word(rng: random.Random) -> str:
    return make_word(rng)


def _date(rng: random.Random) -> str:
    return f"{rng.randint(1950, 2049)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def _date_in_words(iso: str) -> str:
    year, month, day = iso.split("-")
    return f"{int(day)} {MONTHS[int(month) - 1]} {year}"


# skill: (prompt template, input generator, transformation)
SKILLS: dict[str, tuple[str, Callable[[random.Random], str], Callable[[str], str]]] = {
    "reverse": ("Reverse the letters of the word {x}.", _word, lambda w: w[::-1]),
    "sort": ("Sort the letters of the word {x} alphabetically.", _word, lambda w: "".join(sorted(w))),
    "date": ("Write the date {x} in words.", _date, _date_in_words),
    "number": (
        "Write the number {x} in words.",
        lambda rng: str(rng.randint(0, 999)),
        lambda x: number_in_words(int(x)),
    ),
}


def skills_rows(seed: int = 0, train_rows: int = 360, test_rows: int = 180) -> TaskRows:
    """Skills cycled evenly over the rows; every input appears once, and no test input is a training one."""
    rng = random.Random(seed)
    seen: set[str] = set()
    names = sorted(SKILLS)

    def rows(count: int) -> list[Row]:
        out = []
        for index in range(count):
            skill = names[index % len(names)]
            template, draw, transform = SKILLS[skill]
            for _ in range(10_000):
                x = draw(rng)
                if x not in seen:
                    break
            else:
                raise ValueError(f"ran out of distinct {skill} inputs; ask for fewer rows")
            seen.add(x)
            out.append({"prompt": template.format(x=x), "response": transform(x)})
        rng.shuffle(out)
        return out

    train, test = rows(train_rows), rows(test_rows)
    description = (
        f"skills: {len(names)} string skills ({', '.join(names)}), {len(train)} train rows, "
        f"{len(test)} test rows on inputs never seen in training"
    )
    return TaskRows(train, test, description)


# translate: English words (written for this task), each given a made-up word of the target language
NOUNS = """cat dog fox bird horse cow fish frog bear wolf lion mouse goat duck owl snake tree river stone
house boat bridge tower garden forest hill lake road door window table chair lamp book letter cup bowl
bell drum flute coat hat shoe ring key box bag cart wheel rope sword shield crown apple bread cheese
honey""".split()
VERBS = """sees likes finds follows pushes carries paints hears holds watches builds breaks moves opens
hides guards wants cleans fixes draws throws catches keeps sells""".split()
ADJECTIVES = """red old small big green quiet happy dark bright cold warm young tall short heavy light
round sharp soft loud brave clever lazy strange""".split()
LANGUAGE = "Veltish"


def translate_rows(
    seed: int = 0, train_rows: int = 360, test_rows: int = 180, lexicon_seed: int = 0
) -> TaskRows:
    """Sentences "the A1 N1 V the A2 N2" and their translation "N1' A1' N2' A2' V'" (primes: the word's
    made-up translation in ``lexicon_seed``'s lexicon). Each slot of the training sentences cycles through
    its shuffled word list, so every word is trained about equally often (a noun in about 2 x 360 / 57
    sentences); test rows are random sentences that are not training ones."""
    lexicon = translation_lexicon(lexicon_seed)
    rng = random.Random(seed)

    def cycled(words: list[str], count: int) -> list[str]:
        out: list[str] = []
        while len(out) < count:
            block = list(words)
            rng.shuffle(block)
            out += block
        return out[:count]

    def row(a1: str, n1: str, v: str, a2: str, n2: str) -> Row:
        english = f"the {a1} {n1} {v} the {a2} {n2}"
        target = " ".join(lexicon[w] for w in (n1, a1, n2, a2, v))
        return {"prompt": f"Translate into {LANGUAGE}: {english}.", "response": target + "."}

    slots = [ADJECTIVES, NOUNS, VERBS, ADJECTIVES, NOUNS]
    columns = [cycled(words, train_rows) for words in slots]
    seen: set[tuple[str, ...]] = set()
    train = []
    for words in zip(*columns, strict=True):
        seen.add(words)
        train.append(row(*words))
    test = []
    while len(test) < test_rows:
        words = tuple(rng.choice(w) for w in slots)
        if words not in seen:
            seen.add(words)
            test.append(row(*words))
    description = (
        f"translate: {len(lexicon)} English words into made-up {LANGUAGE} words, adjective after noun and verb "
        f"last; {len(train)} train sentences, {len(test)} test sentences never seen in training"
    )
    return TaskRows(train, test, description)


def translation_lexicon(seed: int = 0) -> dict[str, str]:
    """Every English word of the task -> a distinct made-up word (no two English words share one)."""
    rng = random.Random(f"lexicon/{seed}")
    taken: set[str] = set()
    lexicon = {}
    for word in NOUNS + VERBS + ADJECTIVES:
        made = make_word(rng)
        while made in taken:
            made = make_word(rng)
        taken.add(made)
        lexicon[word] = made
    return lexicon


GENERATORS: dict[str, Callable[..., TaskRows]] = {
    "facts": facts_rows,
    "skills": skills_rows,
    "translate": translate_rows,
}


def write_task(name: str, out: Path | str, seed: int = 0, **sizes: Any) -> TaskRows:
    """Write ``out/train.jsonl`` and ``out/test.jsonl`` of task ``name``; returns its rows."""
    if name not in GENERATORS:
        raise ValueError(f"task must be one of {sorted(GENERATORS)}, got {name!r}")
    task = GENERATORS[name](seed=seed, **sizes)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", task.train), ("test", task.test)):
        path = folder / f"{split}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(path)
    return task


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    write = sub.add_parser("write", help="write DIR/train.jsonl and DIR/test.jsonl of a task")
    write.add_argument("--task", choices=sorted(GENERATORS), required=True)
    write.add_argument("--out", required=True)
    write.add_argument("--seed", type=int, default=0)
    write.add_argument("--entities", type=int, help="facts: people")
    write.add_argument("--attributes", type=int, help="facts: facts per person (1-4)")
    write.add_argument("--phrasings", type=int, help="facts: training phrasings per fact (1-3)")
    write.add_argument("--values-per-attribute", type=int, help="facts: size of each value pool")
    write.add_argument("--train-rows", type=int, help="skills, translate: training rows")
    write.add_argument("--test-rows", type=int, help="skills, translate: test rows")
    args = parser.parse_args(argv)
    keys = {
        "facts": ("entities", "attributes", "phrasings", "values_per_attribute"),
        "skills": ("train_rows", "test_rows"),
        "translate": ("train_rows", "test_rows"),
    }
    given = {
        k: v for k, v in vars(args).items() if v is not None and k not in ("command", "task", "out", "seed")
    }
    wrong = sorted(set(given) - set(keys[args.task]))
    if wrong:
        parser.error(
            f"--task {args.task} takes {['--' + k.replace('_', '-') for k in keys[args.task]]}, not {wrong}"
        )
    task = write_task(args.task, args.out, args.seed, **given)
    print(f"{task.description}\nwritten to {Path(args.out).resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
