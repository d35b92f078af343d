"""Multiple choice: answer formats, option scores against a hand computation (summed and per-token
log-likelihood), and option accuracy as the module reports it."""

from __future__ import annotations

import math

import pytest
import torch

from layermoe.data import DataError, TextDataModule
from layermoe.lightning_modules import MoELoRAFineTuner
from tests.conftest import tiny_llama_spec, write_jsonl
from tests.fixtures import quiet_trainer

TEMPLATE = "Q: {text}\nA:"
QUESTIONS = [
    {"q": "color of the sky", "options": ["blue", "green", "a very long wrong answer"], "answer": "A"},
    {"q": "2+2", "options": ["3", "4", "22", "four"], "answer": 1},
    {"q": "first letter", "options": ["a", "zz"], "answer": "1"},
    {"q": "opposite of up", "options": ["down", "sideways", "up"], "answer": "A"},
    {"q": "plural of cat", "options": ["cats", "cat", "caties"], "answer": "C"},
]


def _module_and_data(tmp_path, choice_score: str = "sum") -> tuple[MoELoRAFineTuner, TextDataModule]:
    path = write_jsonl(tmp_path / "mc.jsonl", QUESTIONS)
    dm = TextDataModule(
        train_file=str(path),
        val_file=str(path),
        task="multiple_choice",
        prompt_column="q",
        choices_column="options",
        label_column="answer",
        prompt_template=TEMPLATE,
        eval_batch_size=2,
    )
    dm.setup("fit")
    module = MoELoRAFineTuner(
        model=tiny_llama_spec(), task="multiple_choice", choice_score=choice_score, print_layout=False
    )
    return module.eval(), dm


def _hand_scores(module: MoELoRAFineTuner, tokenizer, question: dict) -> tuple[list[float], list[float]]:
    """Sum and mean of log p(option token | everything before it), one unpadded forward per option."""
    head = tokenizer(TEMPLATE.replace("{text}", question["q"]) + " ")["input_ids"]
    sums, means = [], []
    for option in question["options"]:
        tail = tokenizer(option, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = module.model(input_ids=torch.tensor([head + tail])).logits[0].double()
        terms = [float(torch.log_softmax(logits[len(head) + i - 1], -1)[t]) for i, t in enumerate(tail)]
        sums.append(math.fsum(terms))
        means.append(math.fsum(terms) / len(terms))
    return sums, means


@pytest.mark.parametrize("choice_score", ["sum", "mean"])
def test_option_scores_and_accuracy_match_a_hand_computation(tmp_path, choice_score):
    module, dm = _module_and_data(tmp_path, choice_score)
    expected_answers = [0, 1, 1, 0, 2]
    assert [e["class_label"] for e in dm.datasets["val"].examples] == expected_answers
    rows = dm.datasets["val"].examples
    scores = []
    for i in range(0, len(rows), 2):  # batches of two rows, options padded to each batch's widest row
        batch_scores = module.choice_scores(dm.collator(with_choices=True)(rows[i : i + 2]))
        scores += [row + [float("-inf")] * (4 - len(row)) for row in batch_scores.tolist()]
    scores = torch.tensor(scores)
    hand_correct = []
    for row, question in enumerate(QUESTIONS):
        sums, means = _hand_scores(module, dm.tokenizer, question)
        hand = sums if choice_score == "sum" else means
        k = len(hand)
        assert scores[row, :k].tolist() == pytest.approx(hand, abs=1e-4)
        assert (scores[row, k:] == float("-inf")).all()  # padded options never win
        hand_correct.append(max(range(k), key=hand.__getitem__) == expected_answers[row])
    # the module's val/acc over the same rows (its loader sorts rows by length; accuracy does not care)
    trainer = quiet_trainer()
    (result,) = trainer.validate(module, dm, verbose=False)
    assert result["val/acc"] == pytest.approx(sum(hand_correct) / len(QUESTIONS))


def test_training_rows_supervise_the_correct_option_only(tmp_path):
    _, dm = _module_and_data(tmp_path)
    batch = dm.collator()(dm.datasets["train"].examples)
    assert "choice_input_ids" not in batch  # training batches carry the correct option only
    for row, question in enumerate(QUESTIONS):
        supervised = batch["labels"][row][batch["labels"][row] != -100].tolist()
        answer = question["options"][dm.datasets["train"].examples[row]["class_label"]]
        assert dm.tokenizer.decode(supervised) == answer


def test_answer_formats_and_errors(tmp_path):
    arc = [
        {"question": "q", "choices": {"text": ["x", "y", "z"], "label": ["1", "2", "3"]}, "answerKey": "3"}
    ]
    piqa = [{"goal": "g", "sol1": "a", "sol2": "b", "label": 1}]
    cases = [
        (arc, {"prompt_column": "question", "label_column": "answerKey"}, 2),
        (piqa, {"prompt_column": "goal", "choices_column": ["sol1", "sol2"]}, 1),
    ]
    for rows, columns, answer in cases:
        path = write_jsonl(tmp_path / "rows.jsonl", rows)
        dm = TextDataModule(train_file=str(path), task="multiple_choice", val_size=0, **columns)
        dm.setup("fit")
        assert dm.datasets["train"].examples[0]["class_label"] == answer
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "choices": ["a", "b"], "label": "C"}])
    with pytest.raises(DataError, match="answer 'C' in column 'label' is not one of the 2 options"):
        TextDataModule(train_file=str(bad), task="multiple_choice", val_size=0).setup("fit")
    with pytest.raises(DataError, match="needs label_column"):
        TextDataModule(train_file=str(bad), task="multiple_choice", label_column=None)
    with pytest.raises(ValueError, match="choice_score must be one of"):
        MoELoRAFineTuner(model=tiny_llama_spec(), task="multiple_choice", choice_score="max")


def test_model_and_data_tasks_must_agree(tmp_path):
    module, dm = _module_and_data(tmp_path)
    other = MoELoRAFineTuner(model=tiny_llama_spec(), task="instruction", print_layout=False)
    trainer = quiet_trainer(max_steps=1)
    with pytest.raises(ValueError, match="model.task='instruction' but data.task='multiple_choice'"):
        trainer.fit(other, dm)


def test_validation_line_shows_the_chance_level_and_the_rows(tmp_path, capsys):
    module, dm = _module_and_data(tmp_path)
    trainer = quiet_trainer()
    trainer.validate(module, dm, verbose=False)
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "val/acc=" in line]
    # guessing among each row's options (3, 4, 2, 3 and 3 of them), averaged over the 5 rows
    chance = sum(1 / len(q["options"]) for q in QUESTIONS) / len(QUESTIONS)
    assert f"(chance acc {chance:.4f})" in line
    assert line.endswith("on 5 validation rows")
