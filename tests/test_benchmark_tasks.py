"""The generative benchmark tasks (benchmarks/tasks.py): seeded, test prompts unseen in training, every
test fact stated in training, skills computed right, and the written files read by ``task: instruction``."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import tasks  # noqa: E402

from layermoe.data import TextDataModule  # noqa: E402


@pytest.mark.parametrize("name", sorted(tasks.GENERATORS))
def test_rows_are_a_function_of_the_seed(name):
    make = tasks.GENERATORS[name]
    assert make(seed=3) == make(seed=3)
    assert make(seed=3).train != make(seed=4).train


@pytest.mark.parametrize("name", sorted(tasks.GENERATORS))
def test_no_test_prompt_appears_in_training(name):
    task = tasks.GENERATORS[name](seed=0)
    train_prompts = {r["prompt"] for r in task.train}
    assert task.test and not [r["prompt"] for r in task.test if r["prompt"] in train_prompts]


def test_every_test_fact_is_stated_in_training_in_each_phrasing():
    task = tasks.facts_rows(seed=1, entities=25, attributes=4, phrasings=3)
    assert len(task.test) == 100 and len(task.train) == 300
    for row in task.test:
        name = re.match(r"^([A-Z][a-z]+ [A-Z][a-z]+) ", row["prompt"]).group(1)
        attribute = next(
            a for a, (_, test) in tasks.ATTRIBUTES.items() if row["prompt"] == test.format(name=name)
        )
        stated = [
            r
            for r in task.train
            if r["prompt"] in {p.format(name=name) for p in tasks.ATTRIBUTES[attribute][0]}
        ]
        assert len(stated) == 3 and {r["response"] for r in stated} == {row["response"]}


def test_sizes_are_checked():
    with pytest.raises(ValueError, match="phrasings"):
        tasks.facts_rows(phrasings=4)


EXPECTED = {
    "reverse": lambda x: x[::-1],
    "sort": lambda x: "".join(sorted(x)),
    "number": lambda x: tasks.number_in_words(int(x)),
    "date": lambda x: tasks._date_in_words(x),
}


def _skill_and_input(prompt: str) -> tuple[str, str]:
    for skill, (template, _, _) in tasks.SKILLS.items():
        head, tail = template.split("{x}")
        if prompt.startswith(head) and prompt.endswith(tail):
            return skill, prompt[len(head) : len(prompt) - len(tail)]
    raise AssertionError(f"no skill reads {prompt!r}")


def test_skills_answers_against_hand_written_ones():
    assert tasks.number_in_words(0) == "zero"
    assert tasks.number_in_words(40) == "forty"
    assert tasks.number_in_words(115) == "one hundred fifteen"
    assert tasks.number_in_words(347) == "three hundred forty-seven"
    assert tasks._date_in_words("2023-04-07") == "7 April 2023"


def test_skills_test_inputs_are_new_and_answered_right():
    task = tasks.skills_rows(seed=2, train_rows=40, test_rows=20)
    train_inputs = {_skill_and_input(r["prompt"])[1] for r in task.train}
    skills = set()
    for row in task.test:
        skill, x = _skill_and_input(row["prompt"])
        skills.add(skill)
        assert x not in train_inputs
        assert row["response"] == EXPECTED[skill](x)
    assert skills == set(tasks.SKILLS)


def test_written_files_serve_instruction_batches(tmp_path, capsys):
    assert (
        tasks.main(
            ["write", "--task", "skills", "--out", str(tmp_path), "--train-rows", "12", "--test-rows", "4"]
        )
        == 0
    )
    assert "12 train rows" in capsys.readouterr().out
    dm = TextDataModule(
        dataset=str(tmp_path), test_split="test", task="instruction", val_size=0, max_length=128
    )
    dm.setup()
    assert len(dm.datasets["train"]) == 12 and len(dm.datasets["test"]) == 4
    with pytest.raises(SystemExit):
        tasks.main(["write", "--task", "skills", "--out", str(tmp_path), "--entities", "3"])


def test_translate_answers_follow_the_grammar_word_by_word():
    """Each answer is the lexicon's word for noun, adjective, noun, adjective, verb (adjective after its
    noun, verb last), rebuilt here from the prompt's English words."""
    lexicon = tasks.translation_lexicon(0)
    assert (
        len(set(lexicon.values())) == len(lexicon) == len(set(tasks.NOUNS + tasks.VERBS + tasks.ADJECTIVES))
    )
    task = tasks.translate_rows(seed=1)
    for row in task.train + task.test:
        match = re.fullmatch(
            r"Translate into Veltish: the (\w+) (\w+) (\w+) the (\w+) (\w+)\.", row["prompt"]
        )
        assert match, row["prompt"]
        a1, n1, v, a2, n2 = match.groups()
        assert {a1, a2} <= set(tasks.ADJECTIVES) and {n1, n2} <= set(tasks.NOUNS) and v in tasks.VERBS
        assert row["response"] == f"{lexicon[n1]} {lexicon[a1]} {lexicon[n2]} {lexicon[a2]} {lexicon[v]}."


def test_translate_trains_every_word_and_tests_new_sentences():
    task = tasks.translate_rows(seed=0)
    trained = [r["prompt"].split(": ", 1)[1].rstrip(".").split() for r in task.train]
    counts = {w: sum(s.count(w) for s in trained) for w in tasks.NOUNS + tasks.VERBS + tasks.ADJECTIVES}
    assert min(counts[w] for w in tasks.NOUNS) >= 2 * 360 // len(tasks.NOUNS)  # each slot cycles its list
    assert min(counts[w] for w in tasks.VERBS) >= 360 // len(tasks.VERBS)
    assert len({r["prompt"] for r in task.test}) == len(task.test) == 180
