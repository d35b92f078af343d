"""Step-for-step parity of the project's training path with a plain peft loop (issue 35).

The benchmark's seed spreads cannot say whether the two paths do the same arithmetic; this can. A tiny
random Llama, the same LoRA weights at step 0 (peft's, imported with ``load_peft``), the same batches in
the same order (the order the project's resumable loader draws, encoded by the plain loop itself), AdamW
with the same settings and the same LR per step. Then ``MoELoRAFineTuner`` + ``TextDataModule`` + a
Lightning Trainer (CPU) and benchmarks/peft_parity.py's own loop (``plain_loop``) must agree on every
step's loss and on the final adapters: to round-off in float32 (32-true), and to 1e-12 in float64
(64-true, both sides), which shows that nothing but round-off separates them. Both task kinds of the
benchmark: instruction (loss on the response and EOS) and classification (loss on the label word's token,
as its SST-2 arm).

The two documented differences are aligned here and checked on their own: the separator, a token of its
own for the byte tokenizer, is supervised by the benchmark's plain encoding and never by the project's
(``test_by_default_the_plain_loop_also_supervises_the_separator``); transformers' warm-up starts at LR 0
where the project's starts at lr / warmup_steps (``test_warmup_start_moves_the_weights``; over a whole
run: benchmarks/warmup_start.py).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import peft_parity  # noqa: E402

from layermoe.adapters import load_peft, named_moe_layers  # noqa: E402
from layermoe.data import TextDataModule  # noqa: E402
from layermoe.lightning_modules import MoELoRAFineTuner  # noqa: E402
from layermoe.lightning_modules.model_factory import build_model  # noqa: E402
from layermoe.lightning_modules.schedule import lr_multiplier  # noqa: E402
from tests.conftest import tiny_llama_spec, write_jsonl  # noqa: E402
from tests.fixtures import cpu_trainer  # noqa: E402

RANK, ALPHA, LR, MIN_LR_RATIO = 2, 4.0, 1e-2, 0.1
BATCH, STEPS = 4, 6  # 12 rows: two epochs, so the second epoch's reshuffle is covered too
TEMPLATE, SEPARATOR = peft_parity.PROMPT_TEMPLATE, peft_parity.SEPARATOR
# Round-off over 6 Adam steps, by precision: the largest loss difference (losses are ~5), and the largest
# weight difference as a share of how far training moved the weights. Observed: float32 1e-6 and 3e-4
# (the plain loop against itself with each batch's rows reversed, pure round-off, gives 5e-5); float64
# 2e-15 and 4e-15, which shows that the float32 differences are round-off, not a difference in the method.
TOLERANCE = {"32-true": (1e-6, 1e-3), "64-true": (1e-12, 1e-12)}
ROWS = [
    {"prompt": f"capital of land {i}?", "response": "city " + "ab" * (1 + i % 5) + ("!" * (i % 3))}
    for i in range(12)
]
# classification as the benchmark's SST-2 runs it: a label word after the template, loss on its token
CLASSIFICATION_ROWS = [{"text": f"film {i} was " + "ok" * (1 + i % 4), "label": i % 2} for i in range(12)]
PLAIN_TASK = {"instruction": "instruction", "classification": "sst2"}  # the benchmark's name for it


class StepRecorder(Callback):
    """Every training batch as the project's loader served it, the LR it trained with and its loss."""

    def __init__(self) -> None:
        self.batches: list[dict[str, torch.Tensor]] = []
        self.lrs: list[float] = []
        self.losses: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append({k: batch[k].clone() for k in ("input_ids", "attention_mask", "labels")})
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _rows(task: str) -> list[dict[str, Any]]:
    return ROWS if task == "instruction" else CLASSIFICATION_ROWS


def _data_module(tmp_path: Path, seed: int, task: str = "instruction") -> TextDataModule:
    if task == "instruction":
        encoding = {"prompt_template": TEMPLATE, "response_separator": SEPARATOR}
    else:
        words = peft_parity.CLASSIFICATION["words"]
        encoding = {"prompt_template": peft_parity.CLASSIFICATION["template"], "label_words": words}
    dm = TextDataModule(
        train_file=str(write_jsonl(tmp_path / "train.jsonl", _rows(task))),
        task=task,
        tokenizer="tiny",
        **encoding,
        val_size=0,
        batch_size=BATCH,
        max_length=64,
        seed=seed,
    )
    dm.setup("fit")
    return dm


def _plain_batches(
    dm: TextDataModule, steps: int, separator_in_prompt: bool = True, task: str = "instruction"
) -> list[dict[str, torch.Tensor]]:
    """The plain loop's batches: its own encoding of the rows (``plain_encode``), in the order the project's
    training loader draws them epoch after epoch. The byte tokenizer makes the separator a token of its
    own: the plain loop supervises it unless ``separator_in_prompt`` (the project never does)."""
    tokenizer = dm.prepare_tokenizer()
    examples = [
        peft_parity.plain_encode(tokenizer, row, PLAIN_TASK[task], 64, separator_in_prompt)
        for row in _rows(task)
    ]
    sampler = dm.train_dataloader().sampler
    batches: list[dict[str, torch.Tensor]] = []
    epoch = 0
    while len(batches) < steps:
        sampler.set_epoch(epoch)
        order = list(sampler)
        for start in range(0, len(order), BATCH):
            rows = [examples[i] for i in order[start : start + BATCH]]
            batches.append(peft_parity.pad(rows, tokenizer.pad_token_id))
        epoch += 1
    return batches[:steps]


def _peft_model(seed: int, random_b: bool) -> torch.nn.Module:
    """peft LoRA on the base the project builds from the same spec; ``random_b``: B drawn non-zero, so the
    first step already trains A (fresh LoRA has B = 0 and A's gradient is 0 at step 1)."""
    base = build_model(tiny_llama_spec(), seed=0)
    torch.manual_seed(seed)
    model = peft_parity.peft_lora(base, RANK, ALPHA, peft_parity.ALL_PROJECTIONS)
    if random_b:
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    return model


def _peft_factors(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """(A, B, scaling) of every peft LoRA module, by the wrapped module's name."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            key = name.removeprefix("base_model.model.")
            out[key] = (
                module.lora_A["default"].weight.detach().clone(),
                module.lora_B["default"].weight.detach().clone(),
                float(module.scaling["default"]),
            )
    return out


def _project_factors(module: MoELoRAFineTuner) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    return {
        name: (layer.lora_A.detach().clone(), layer.lora_B.detach().clone(), float(layer.scaling))
        for name, layer in named_moe_layers(module.model).items()
    }


def _train_plain(
    model: torch.nn.Module,
    batches: list[dict[str, torch.Tensor]],
    warmup: int,
    schedule: str,
    aggregation: str,
    weight_decay: float,
) -> tuple[list[float], list[float]]:
    """benchmarks/peft_parity.py's loop; ``schedule``: "transformers" (the benchmark's) or "project"
    (the project's multiplier: warm-up from lr / warmup). Returns the per-step losses and LRs."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=weight_decay)
    if schedule == "transformers":
        scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, warmup, len(batches), min_lr_rate=MIN_LR_RATIO
        )
    else:
        multiplier = lr_multiplier("cosine", warmup, len(batches), MIN_LR_RATIO)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
    lrs: list[float] = []

    def recording(batches_: list[dict[str, torch.Tensor]]):
        for batch in batches_:
            lrs.append(optimizer.param_groups[0]["lr"])
            yield batch

    losses = peft_parity.plain_loop(model, recording(batches), optimizer, scheduler, aggregation)
    return losses, lrs


def _train_project(
    tmp_path: Path,
    init: Path,
    seed: int,
    warmup: int,
    aggregation: str,
    weight_decay: float,
    precision: str,
    task: str = "instruction",
) -> tuple[MoELoRAFineTuner, StepRecorder, dict[str, Any]]:
    dm = _data_module(tmp_path, seed, task)
    module = MoELoRAFineTuner(
        model=tiny_llama_spec(),
        adapter={
            "experts": 1,
            "rank": RANK,
            "lora_alpha": ALPHA,
            "target_modules": peft_parity.ALL_PROJECTIONS,
        },
        task=task,
        lr=LR,
        weight_decay=weight_decay,
        warmup_steps=warmup,
        scheduler="cosine",
        min_lr_ratio=MIN_LR_RATIO,
        loss_aggregation=aggregation,
        print_layout=False,
        print_metrics=False,
    )
    load_peft(module.model, init)
    start = _project_factors(module)
    recorder = StepRecorder()
    trainer = cpu_trainer([recorder], max_steps=STEPS, precision=precision, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    return module, recorder, start


def _max_differences(
    ours: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
    theirs: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
) -> dict[str, float]:
    """Largest absolute difference of A, of B and of the update scaling * B A over every module."""
    assert set(ours) == set(theirs)
    out = {"A": 0.0, "B": 0.0, "delta": 0.0}
    for name, (A, B, s) in ours.items():
        A2, B2, s2 = theirs[name]
        out["A"] = max(out["A"], float((A - A2).abs().max()))
        out["B"] = max(out["B"], float((B - B2).abs().max()))
        out["delta"] = max(out["delta"], float((s * B @ A - s2 * B2 @ A2).abs().max()))
    return out


@pytest.mark.parametrize(
    ("warmup", "schedule", "aggregation", "weight_decay", "random_b", "precision", "task"),
    [
        # the benchmark's loop as it is, without warm-up, from a fresh LoRA (B = 0)
        (0, "transformers", "token_mean", 0.0, False, "32-true", "instruction"),
        (0, "transformers", "token_mean", 0.0, False, "64-true", "instruction"),
        # warm-up aligned (the plain loop given the project's multiplier); weight decay on the same tensors
        (2, "project", "token_mean", 0.01, True, "32-true", "instruction"),
        (2, "project", "token_mean", 0.01, True, "64-true", "instruction"),
        (0, "transformers", "sample_mean", 0.0, True, "32-true", "instruction"),  # per-sample, both
        # classification (the label word's token after the template), as the benchmark's SST-2 arm
        (0, "transformers", "token_mean", 0.0, True, "32-true", "classification"),
        (0, "transformers", "token_mean", 0.0, True, "64-true", "classification"),
    ],
    ids=[
        "ecosystem",
        "ecosystem-float64",
        "aligned-warmup-decay",
        "aligned-warmup-decay-float64",
        "sample-mean",
        "classification",
        "classification-float64",
    ],
)
def test_project_path_matches_a_plain_peft_loop_step_for_step(
    tmp_path, warmup, schedule, aggregation, weight_decay, random_b, precision, task
):
    seed = 3
    peft_model = _peft_model(seed, random_b)
    peft_model.save_pretrained(str(tmp_path / "init"))
    module, recorder, start = _train_project(
        tmp_path, tmp_path / "init", seed, warmup, aggregation, weight_decay, precision, task
    )

    # the same weights at step 0, the same scaling
    initial = _peft_factors(peft_model)
    assert _max_differences(start, initial) == {"A": 0.0, "B": 0.0, "delta": 0.0}
    assert {s for *_, s in start.values()} == {ALPHA / RANK}

    # the same batches, token for token: prompt, separator, response, EOS and padding masked alike
    plain = _plain_batches(_data_module(tmp_path, seed, task), STEPS, task=task)
    assert len(recorder.batches) == STEPS
    for served, ours in zip(recorder.batches, plain, strict=True):
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(served[key], ours[key]), key

    if precision == "64-true":
        peft_model.double()  # what Lightning's 64-true did to the project's module
    losses, lrs = _train_plain(peft_model, plain, warmup, schedule, aggregation, weight_decay)
    assert recorder.lrs == pytest.approx(lrs, rel=1e-12)
    loss_tolerance, weight_tolerance = TOLERANCE[precision]
    loss_gap = max(abs(a - b) for a, b in zip(recorder.losses, losses, strict=True))
    assert loss_gap <= loss_tolerance, (recorder.losses, losses)

    final_ours, final_peft = _project_factors(module), _peft_factors(peft_model)
    moved = _max_differences(final_ours, start)
    gap = _max_differences(final_ours, final_peft)
    assert moved["A"] > 1e-3 and moved["B"] > 1e-3  # both factors trained, so the comparison says something
    # Adam divides by sqrt(v): a gradient entry that is ~0 up to round-off turns its round-off into a visible
    # update, so the weights are compared relative to how far training moved them
    for factor in ("A", "B", "delta"):
        assert gap[factor] <= weight_tolerance * moved[factor], (factor, gap, moved)
    print(
        f"\n[{task} {precision} {warmup=} {schedule} {aggregation} wd={weight_decay}] max |loss diff| "
        f"{loss_gap:.3g}; max |diff| A "
        f"{gap['A']:.3g}, B {gap['B']:.3g}, scaling*B@A {gap['delta']:.3g} (moved: A {moved['A']:.3g}, "
        f"B {moved['B']:.3g})"
    )


def test_warmup_start_moves_the_weights(tmp_path):
    """transformers' warm-up (LR 0 at step 1) against the project's (lr / warmup at step 1), everything
    else equal, in the plain loop (which matches the project step for step, above)."""
    seed, warmup = 3, 2
    dm = _data_module(tmp_path, seed)
    batches = _plain_batches(dm, STEPS)
    runs = {}
    for schedule in ("transformers", "project"):
        model = _peft_model(seed, random_b=False)
        start = _peft_factors(model)
        losses, lrs = _train_plain(model, batches, warmup, schedule, "token_mean", 0.0)
        runs[schedule] = (_peft_factors(model), losses, lrs)
    (hf, hf_losses, hf_lrs), (ours, our_losses, our_lrs) = runs["transformers"], runs["project"]
    assert hf_lrs[:2] == pytest.approx([0.0, LR / 2]) and our_lrs[:2] == pytest.approx([LR / 2, LR])
    assert hf_lrs[2:] == pytest.approx(our_lrs[2:])
    assert hf_losses[0] == our_losses[0]  # the same weights at step 1
    gap = _max_differences(hf, ours)
    moved = _max_differences(ours, start)
    # far above the round-off of the parity test: a real difference in the trajectory
    assert gap["delta"] > 0.05 * moved["delta"]
    print(
        f"\n[warm-up {warmup} of {STEPS} steps] transformers vs project: max |diff| scaling*B@A "
        f"{gap['delta']:.3g} (project moved it by {moved['delta']:.3g}); final loss "
        f"{hf_losses[-1]:.4f} vs {our_losses[-1]:.4f}"
    )


def test_by_default_the_plain_loop_also_supervises_the_separator(tmp_path):
    """The other documented difference: the benchmark's plain encoding supervises a separator that is a
    token of its own (here every row: the byte tokenizer), the project's never does; nothing else differs."""
    dm = _data_module(tmp_path, seed=0)
    separator = dm.prepare_tokenizer()(SEPARATOR, add_special_tokens=False)["input_ids"]
    assert len(separator) == 1
    plain = _plain_batches(dm, STEPS, separator_in_prompt=False)
    aligned = _plain_batches(dm, STEPS)
    extra = 0
    for a, b in zip(plain, aligned, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])
        differs = a["labels"] != b["labels"]
        assert bool((a["labels"][differs] == separator[0]).all()) and bool(
            (b["labels"][differs] == -100).all()
        )
        assert differs.sum(dim=1).tolist() == [1] * a["labels"].shape[0]  # one per row: its separator
        extra += int(differs.sum())
    assert extra == STEPS * BATCH
