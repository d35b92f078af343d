"""Resume mid-epoch with the instruction (prompt/response and chat) and multiple_choice tasks: a run
resumed from a mid-epoch checkpoint ends with the same adapters as the uninterrupted run, with the
influence callback scoring these tasks' batches (response-only per-sample losses) and rewiring after
the resume point."""

from __future__ import annotations

import random
from pathlib import Path

import lightning as L
import pytest
import torch

from layermoe.adapters import layout
from layermoe.checkpointing import AtomicCheckpointIO
from layermoe.data import TextDataModule
from layermoe.lightning_modules import MoELoRAFineTuner
from tests.conftest import tiny_llama_spec, write_jsonl
from tests.fixtures import every_step_checkpoint, quiet_influence, quiet_trainer

WORDS = ["cat", "dog", "sun", "tree", "moon", "fish"]
TASKS = {
    "instruction": {"task": "instruction", "prompt_template": "Do: {text}\n"},
    "chat": {"task": "instruction", "messages_column": "messages"},
    "multiple_choice": {"task": "multiple_choice"},
}


def _rows(kind: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = rng.choice(WORDS)
        prompt, answer = f"upper {word}", word.upper()
        if kind == "instruction":
            rows.append({"prompt": prompt, "response": answer})
        elif kind == "chat":
            rows.append(
                {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
            )
        else:
            options = [answer, word, word[::-1]]
            rng.shuffle(options)
            rows.append({"prompt": prompt, "choices": options, "label": options.index(answer)})
    return rows


def _fit(kind: str, data: Path, root: Path, ckpt: Path | None) -> dict[str, torch.Tensor]:
    L.seed_everything(0)
    task = TASKS[kind]["task"]
    module = MoELoRAFineTuner(
        model=tiny_llama_spec(),
        adapter={"experts": 2, "rank": 2, "lora_dropout": 0.1},
        task=task,
        lr=1e-2,
        print_layout=False,
        print_metrics=False,
    )
    dm = TextDataModule(
        train_file=str(data / "train.jsonl"),
        val_file=str(data / "val.jsonl"),
        max_length=64,
        batch_size=4,
        eval_batch_size=4,
        group_by_length=True,
        **TASKS[kind],
    )
    influence = quiet_influence(
        "grad_norm", schedule={"warmup": 5, "interval": "step"}, num_train_samples=4, num_val_samples=4
    )
    trainer = quiet_trainer(
        [influence, every_step_checkpoint(root / "ckpt")],
        accelerator="cpu",
        max_steps=8,
        val_check_interval=4,
        check_val_every_n_epoch=None,
        deterministic=True,
        default_root_dir=root,
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(module, dm, ckpt_path=ckpt)
    assert influence.state.rewires_done == 1
    state = {k: v.detach().clone() for k, v in module.named_parameters() if v.requires_grad}
    state["layout"] = torch.tensor(
        [[e["experts"], e["rank"]] for _, e in sorted(layout(module.model).items())]
    )
    return state


@pytest.mark.parametrize("kind", sorted(TASKS))
def test_resume_mid_epoch_matches_the_uninterrupted_run(tmp_path, kind):
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", _rows(kind, 22, seed=1))  # 6 batches per epoch: step 8 is in epoch 2
    write_jsonl(data / "val.jsonl", _rows(kind, 6, seed=2))
    full = _fit(kind, data, tmp_path / "a", None)
    resumed = _fit(
        kind, data, tmp_path / "b", tmp_path / "a" / "ckpt" / "step=3.ckpt"
    )  # mid-epoch, pre-rewire
    assert full.keys() == resumed.keys()
    for name, tensor in full.items():
        assert torch.equal(tensor, resumed[name]), name
