"""The peft parity benchmark (issue 35): --quick end to end and resumable, its evaluator against the
project's own test loop and a naive token mean, and its plain-loop schedule against the project's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import peft_parity  # noqa: E402

from layermoe.lightning_modules import MoELoRAFineTuner  # noqa: E402
from layermoe.lightning_modules.schedule import lr_multiplier  # noqa: E402
from tests.fixtures import cpu_trainer  # noqa: E402


def test_quick_runs_every_system_resumes_and_tabulates(tmp_path, capsys):
    argv = ["--quick", "--seeds", "0", "--systems", ",".join(peft_parity.SYSTEMS)]
    argv += ["--results", str(tmp_path / "results"), "--workdir", str(tmp_path / "data")]
    assert peft_parity.main(argv) == 0
    results = peft_parity.load_results(tmp_path / "results")
    assert len(results) == len(peft_parity.TASKS) * len(peft_parity.SYSTEMS)
    for task in peft_parity.TASKS:
        runs = {r["system"]: r for r in results if r["task"] == task}
        assert runs["peft"]["trainable_params"] == runs["layermoe"]["trainable_params"]
        assert runs["layermoe-router"]["trainable_params"] > runs["layermoe"]["trainable_params"]
        assert runs["peft"]["test_rows"] == runs["layermoe"]["test_rows"] > 0
        for run in runs.values():
            assert all(torch.isfinite(torch.tensor(run[k])) for k in ("loss_sample", "loss_token"))
            assert 0.0 <= run["exact_match"] <= 1.0
    sst2 = {r["system"]: r for r in results if r["task"] == "sst2"}
    assert sst2["peft"]["train_encoding_same_as_project"] == 1.0
    assert sst2["peft"]["loss_sample"] == pytest.approx(sst2["peft"]["loss_token"])  # one label token
    capsys.readouterr()
    assert peft_parity.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("(done)") == len(results)
    assert "| facts | peft | 1 |" in out and "| sst2 | layermoe-router | 1 |" in out


def test_evaluator_matches_the_project_test_loop_and_a_naive_token_mean(tmp_path):
    args = peft_parity.parse(["--quick"])
    folder, _ = peft_parity.prepare_task("skills", args, tmp_path / "skills")
    dm = peft_parity.data_module("skills", folder, args, seed=0)
    module = MoELoRAFineTuner(
        model=peft_parity.TINY_MODEL,
        adapter={"experts": 1, "rank": 2},
        task="instruction",
        print_layout=False,
    )
    trainer = cpu_trainer()
    project = trainer.test(module, datamodule=dm, verbose=False)[0]
    examples = peft_parity.project_examples(dm, "test")
    pad_id = dm.prepare_tokenizer().pad_token_id
    ours = peft_parity.evaluate(module.model, examples, pad_id, batch_size=3, candidates=None)
    assert ours["loss_sample"] == pytest.approx(project["test/loss"], rel=1e-5)
    assert ours["exact_match"] == pytest.approx(project["test/exact_match"])
    batch = peft_parity.pad(examples, pad_id)
    with torch.no_grad():
        logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    naive = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))
    assert ours["loss_token"] == pytest.approx(float(naive), rel=1e-5)


def test_plain_schedule_is_the_projects_after_warmup():
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = get_cosine_with_min_lr_schedule_with_warmup(optimizer, 3, 150, min_lr_rate=0.1)
    project = lr_multiplier("cosine", 3, 150, 0.1)
    plain = [fn(step) for step in range(150) for fn in schedule.lr_lambdas]
    assert plain[3:] == pytest.approx([project(step) for step in range(3, 150)])
    assert plain[:3] == pytest.approx([0.0, 1 / 3, 2 / 3])  # the project starts at 1/3: a known difference
    assert [project(step) for step in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_results_are_json_with_their_settings(tmp_path):
    args = peft_parity.parse(["--quick", "--loss-aggregation", "sample_mean", "--val-size", "4"])
    assert peft_parity.arm_name("layermoe", args) == "layermoe+loss_aggregation=sample_mean+val_size=4"
    assert peft_parity.arm_name("peft", args) == "peft+loss_aggregation=sample_mean"
    assert peft_parity.arm_name("layermoe", peft_parity.parse(["--quick"])) == "layermoe"
    assert json.loads(json.dumps(peft_parity.run_settings(args)))["loss_aggregation"] == "sample_mean"


def test_carve_out_applies_to_the_project_arms_only(tmp_path):
    argv = ["--quick", "--seeds", "0", "--tasks", "facts", "--systems", "peft,layermoe", "--val-size", "4"]
    assert peft_parity.main(argv + ["--results", str(tmp_path / "r"), "--workdir", str(tmp_path / "d")]) == 0
    runs = {r["system"]: r for r in peft_parity.load_results(tmp_path / "r")}
    assert runs["layermoe"]["arm"] == "layermoe+val_size=4" and runs["peft"]["arm"] == "peft"
    assert runs["layermoe"]["train_rows"] == runs["peft"]["train_rows"] - 4 == 32


def test_separator_in_prompt_names_the_peft_arm_and_aligns_its_encoding(tmp_path):
    argv = ["--quick", "--seeds", "0", "--tasks", "skills", "--systems", "peft", "--separator-in-prompt"]
    assert peft_parity.main(argv + ["--results", str(tmp_path / "r"), "--workdir", str(tmp_path / "d")]) == 0
    (run,) = peft_parity.load_results(tmp_path / "r")
    assert run["arm"] == "peft+separator_in_prompt=True"
    assert run["train_encoding_same_as_project"] == 1.0
    args = peft_parity.parse(["--quick", "--separator-in-prompt"])
    assert peft_parity.arm_name("layermoe", args) == "layermoe"  # the project never supervises it


def test_a_run_from_before_a_setting_existed_counts_at_its_default():
    args = peft_parity.parse(["--quick"])
    older = {k: v for k, v in peft_parity.run_settings(args).items() if k != "separator_in_prompt"}
    assert peft_parity.same_settings(older, args)
    assert not peft_parity.same_settings(older, peft_parity.parse(["--quick", "--separator-in-prompt"]))
    assert not peft_parity.same_settings({**older, "lr": 1.0}, args)
    assert not peft_parity.same_settings(None, args)


def test_the_table_says_where_each_project_mean_falls_in_the_plain_loops_range():
    def runs(task, arm, losses):
        return [
            {"task": task, "arm": arm, "system": arm.split("+")[0], "seed": i, "loss_sample": v,
             "loss_token": v, "exact_match": 0.5, "train_seconds": 1.0}
            for i, v in enumerate(losses)
        ]  # fmt: skip

    results = runs("a", "peft", [1.0, 1.2]) + runs("a", "layermoe", [1.05, 1.25])  # 1.15: inside
    results += runs("b", "peft", [1.0, 1.1]) + runs("b", "layermoe", [1.2, 1.3])  # mean 1.25: above
    results += runs("b", "peft+separator_in_prompt=True", [1.3, 1.4])  # 1.25: below this one
    results += runs("c", "peft", [1.0]) + runs("c", "layermoe", [1.0, 1.0])  # one peft seed: no verdict
    text = peft_parity.table(results)
    assert "- a: layermoe mean 1.150 (2 seeds) is inside peft's range [1.000, 1.200] (2 seeds; +4.5%" in text
    assert "- b: layermoe mean 1.250 (2 seeds) is above peft's range [1.000, 1.100] (2 seeds; +19.0%" in text
    assert "- b: layermoe mean 1.250 (2 seeds) is below peft+separator_in_prompt=True's range" in text
    assert "- c:" not in text


class _WordTokenizer:
    """A stand-in for SmolLM2's BPE on this point: " yes" is one token (the separator merged into the
    answer), while " 42" is the separator token " " then "42"."""

    vocab = {"Q\nAnswer:": 1, " ": 2, " yes": 3, "42": 4}
    eos_token_id = 9

    def __call__(self, text, add_special_tokens=True):
        ids, rest = [], text
        while rest:
            piece = max((p for p in self.vocab if rest.startswith(p)), key=len)
            ids.append(self.vocab[piece])
            rest = rest[len(piece) :]
        return {"input_ids": ids}

    def decode(self, ids):
        names = {v: k for k, v in self.vocab.items()}
        return "".join(names[i] for i in ids)


def test_separator_in_prompt_moves_only_a_separator_that_is_a_token_of_its_own():
    """Before: the option put the separator in the prompt text for every row, which re-tokenized the merged
    rows (" yes" -> "yes"): 26% of SmolLM2's skills rows then matched the project's encoding instead of 100%."""
    tok = _WordTokenizer()
    merged, own = {"prompt": "Q", "response": "yes"}, {"prompt": "Q", "response": "42"}
    for flag in (False, True):
        assert peft_parity.plain_encode(tok, merged, "skills", 64, flag) == {
            "input_ids": [1, 3, 9],
            "labels": [-100, 3, 9],
        }
    assert peft_parity.plain_encode(tok, own, "skills", 64) == {
        "input_ids": [1, 2, 4, 9],
        "labels": [-100, 2, 4, 9],
    }
    assert peft_parity.plain_encode(tok, own, "skills", 64, True) == {
        "input_ids": [1, 2, 4, 9],
        "labels": [-100, -100, 4, 9],
    }
