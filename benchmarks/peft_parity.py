"""Parity with a plain peft loop (issue 35): does the project's training path learn as well?

The same rows, steps, batch size, optimizer (AdamW, no weight decay), schedule (linear warm-up, then cosine
to ``--min-lr-ratio``), seed and adapter function go through

- ``peft``: a plain PyTorch loop with peft LoRA (its own tokenization, shuffling, loss and scheduler:
  transformers' ``get_cosine_with_min_lr_schedule_with_warmup``), as a user would write it. Two known
  differences: its warm-up starts at LR 0 (the project's at lr / warmup), and it supervises the
  separator when the tokenizer gives it a token of its own (SmolLM2 before digits: a quarter of the
  skills rows); ``train_encoding_same_as_project`` is the share of training rows encoded identically.
  With both aligned, the two paths agree step for step to round-off (tests/test_training_parity.py);
  benchmarks/warmup_start.py measures what the warm-up's first LR changes;
- ``layermoe``: ``MoELoRAFineTuner`` + ``TextDataModule`` + a Lightning ``Trainer`` (what ``train.py fit``
  builds), MoE-LoRA with one expert (no router): the same function and parameter count as LoRA;
- ``layermoe-router``: ``--router-experts`` experts of rank ``rank // experts`` each (the same total rank),
  the router on with its default auxiliary losses; no validation run.

Each run is evaluated by one evaluator on the task's test rows: loss over the answer tokens averaged per
sample (``loss_sample``) and per token (``loss_token``), and exact match (every answer token, end marker
included, is the greedy choice: greedy decoding reproduces the reference); classification adds
``acc`` (the best-scored label word is right). Tasks: ``facts`` and ``skills`` (benchmarks/tasks.py, made by
code) and ``sst2`` (``$LAYERMOE_SHARED_DATA/sst2``; its validation split is the test set).

Runs write one JSON file each under ``--results`` and are skipped when present (resumable);
``--table`` prints the markdown table; ``--quick`` runs a tiny random Llama with the byte tokenizer for
the test suite. Usage::

    python benchmarks/peft_parity.py                        # 3 tasks x 2 systems x 3 seeds (SmolLM2)
    python benchmarks/peft_parity.py --systems layermoe-router
    python benchmarks/peft_parity.py --table
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
for folder in (REPO, REPO / "benchmarks"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import tasks  # noqa: E402
from allocation_quality import machine_description  # noqa: E402
from quality_results import load_results, result_path, write_result  # noqa: E402

from layermoe.paths import cache_dir, resolve_path  # noqa: E402

SYSTEMS = ("peft", "layermoe", "layermoe-router")
TASKS = ("facts", "skills", "sst2")
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT_TEMPLATE = "{text}\nAnswer:"
SEPARATOR = " "
CLASSIFICATION = {"template": "Review: {text}\nSentiment:", "words": ["negative", "positive"]}
TINY_MODEL = {
    "type": "llama",
    "vocab_size": 320,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}
Example = dict[str, list[int]]


# ------------------------------------------------------------------ settings
def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--systems", default="peft,layermoe")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--rank", type=int, default=2)
    p.add_argument("--alpha", type=float, default=4.0)
    p.add_argument("--targets", default=",".join(ALL_PROJECTIONS))
    p.add_argument("--router-experts", type=int, default=2, help="layermoe-router: experts per module")
    p.add_argument(
        "--loss-aggregation", default="token_mean", choices=["token_mean", "sample_mean"], help="both systems"
    )
    p.add_argument(
        "--separator-in-prompt",
        action="store_true",
        help="peft: a separator that is a token of its own goes to the prompt (unsupervised), as the project's",
    )
    p.add_argument("--val-size", type=int, default=0, help="layermoe arms: rows carved for validation")
    p.add_argument("--val-from-train", default="holdout", choices=["holdout", "overlap"])
    p.add_argument("--sst2-train-rows", type=int, default=1200)
    p.add_argument("--sst2-test-rows", type=int, default=400)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--results", default=None, help="default: benchmarks/results/parity (--quick: .../quick)")
    p.add_argument("--workdir", default=None, help="where task files are written (default: {cache}/parity)")
    p.add_argument("--quick", action="store_true", help="tiny random Llama, a few steps (for tests)")
    p.add_argument("--table", action="store_true", help="print the table of the finished runs and exit")
    args = p.parse_args(argv)
    if args.results is None:
        args.results = str(REPO / "benchmarks" / "results" / "parity" / ("quick" if args.quick else ""))
    if args.quick:
        args.steps, args.batch_size, args.warmup, args.lr = min(args.steps, 6), 4, 1, 1e-2
        args.sst2_train_rows, args.sst2_test_rows, args.max_length = 24, 8, 96
    for name, value in (("tasks", args.tasks), ("systems", args.systems)):
        known = TASKS if name == "tasks" else SYSTEMS
        wrong = [v for v in value.split(",") if v not in known]
        if wrong:
            p.error(f"--{name}: unknown {wrong}; choose from {list(known)}")
    return args


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What defines a run besides task, system and seed (stored in each result; a differing file is rerun)."""
    keys = (
        "steps",
        "batch_size",
        "lr",
        "warmup",
        "min_lr_ratio",
        "rank",
        "alpha",
        "targets",
        "router_experts",
    )
    keys += ("loss_aggregation", "val_size", "val_from_train", "max_length", "model", "quick")
    keys += ("separator_in_prompt",)
    keys += ("sst2_train_rows", "sst2_test_rows")
    return {k: getattr(args, k) for k in keys}


def same_settings(stored: dict[str, Any] | None, args: argparse.Namespace) -> bool:
    """Whether a finished run used ``args``' settings; a setting added after it ran counts at its default."""
    if stored is None:
        return False
    defaults = run_settings(parse(["--quick"] if args.quick else []))
    return {**defaults, **stored} == run_settings(args)


def arm_name(system: str, args: argparse.Namespace) -> str:
    """The system plus every setting that differs from the defaults and applies to it (the table's row
    label and part of the result's file name, so runs with other settings never overwrite these)."""
    defaults = run_settings(parse(["--quick"] if args.quick else []))
    skip = {"val_size", "val_from_train"} if system == "peft" else {"separator_in_prompt"}
    if system != "layermoe-router":
        skip.add("router_experts")
    diffs = [f"{k}={v}" for k, v in run_settings(args).items() if k not in skip and v != defaults[k]]
    return "+".join([system, *diffs])


# ------------------------------------------------------------------ data
def classification_rows(count: int, seed: int) -> list[dict[str, Any]]:
    """--quick's stand-in for SST-2: the first word decides the class."""
    rng = random.Random(seed)
    words = ["film", "plot", "cast", "score", "pace", "end"]
    rows = []
    for _ in range(count):
        label = rng.randint(0, 1)
        lead = "superb" if label else "dismal"
        rows.append({"text": " ".join([lead, *rng.choices(words, k=rng.randint(2, 6))]), "label": label})
    return rows


def _sample_jsonl(source: Path, count: int, seed: int) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    if count < len(rows):
        rows = random.Random(seed).sample(rows, count)
    return rows


def prepare_task(task: str, args: argparse.Namespace, folder: Path) -> tuple[Path, str]:
    """Write ``folder/train.jsonl`` and ``folder/test.jsonl`` (data seed 0 for every training seed)."""
    if task == "sst2":
        if args.quick:
            train, test = (
                classification_rows(args.sst2_train_rows, 0),
                classification_rows(args.sst2_test_rows, 1),
            )
        else:
            shared = resolve_path("{shared}") / "sst2"
            train = _sample_jsonl(shared / "train.jsonl", args.sst2_train_rows, 0)
            test = _sample_jsonl(shared / "validation.jsonl", args.sst2_test_rows, 0)
        folder.mkdir(parents=True, exist_ok=True)
        for split, rows in (("train", train), ("test", test)):
            (folder / f"{split}.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8"
            )
        return folder, f"sst2: {len(train)} train rows, {len(test)} test rows (validation split)"
    sizes: dict[str, int] = {}
    if args.quick:
        sizes = {"entities": 6} if task == "facts" else {"train_rows": 24, "test_rows": 8}
    return folder, tasks.write_task(task, folder, seed=0, **sizes).description


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plain_encode(
    tokenizer: Any, row: dict[str, Any], task: str, max_length: int, separator_in_prompt: bool = False
) -> Example:
    """The plain loop's own encoding: prompt ids, then the answer's ids (+ EOS), loss on the answer only.

    The answer is tokenized with the separator before it, so a separator that is a token of its own is
    supervised; ``separator_in_prompt`` moves such a token to the prompt (unsupervised, as the project
    encodes it: tests/test_training_parity.py). A separator merged into the answer's first token (most
    SmolLM2 rows: " yes") stays there in both encodings.
    """
    if task == "sst2":
        prompt = tokenizer(CLASSIFICATION["template"].replace("{text}", row["text"]))["input_ids"]
        answer = tokenizer(" " + CLASSIFICATION["words"][row["label"]], add_special_tokens=False)["input_ids"]
        prompt = prompt[: max_length - len(answer)]
    else:
        head, tail = PROMPT_TEMPLATE.replace("{text}", row["prompt"]), SEPARATOR + row["response"]
        prompt = tokenizer(head)["input_ids"]
        answer = tokenizer(tail, add_special_tokens=False)["input_ids"]
        if separator_in_prompt and answer and tokenizer.decode(answer[:1]) == SEPARATOR:
            prompt, answer = [*prompt, answer[0]], answer[1:]  # a token of its own: the prompt's
        answer = [*answer, tokenizer.eos_token_id]
    ids = (list(prompt) + list(answer))[:max_length]
    return {"input_ids": ids, "labels": ([-100] * len(prompt) + list(answer))[:max_length]}


def pad(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    length = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def data_module(task: str, folder: Path, args: argparse.Namespace, seed: int, carve: bool = True) -> Any:
    """The project's data module of a task (``carve``: with the ``--val-size`` carve-out)."""
    from layermoe.data import TextDataModule

    common = {
        "dataset": str(folder),
        "train_split": "train",
        "test_split": "test",
        "tokenizer": "tiny" if args.quick else args.model_folder,
        "max_length": args.max_length,
        "val_size": args.val_size if carve else 0,
        "val_from_train": args.val_from_train,
        "batch_size": args.batch_size,
        "eval_batch_size": args.eval_batch_size,
        "seed": seed,
    }
    if task == "sst2":
        return TextDataModule(
            task="classification",
            prompt_template=CLASSIFICATION["template"],
            label_words=CLASSIFICATION["words"],
            **common,
        )
    return TextDataModule(
        task="instruction", prompt_template=PROMPT_TEMPLATE, response_separator=SEPARATOR, **common
    )


def project_examples(dm: Any, stage: str) -> list[Example]:
    """The project's encoding of ``stage`` rows in file order, as (input_ids, labels)."""
    examples = []
    for e in dm.datasets[stage].examples:
        ids = list(e["input_ids"])
        if "label_position" in e:
            labels = [-100] * len(ids)
            labels[e["label_position"]] = ids[e["label_position"]]
        else:
            labels = [t if s else -100 for t, s in zip(ids, e["supervised"], strict=True)]
        examples.append({"input_ids": ids, "labels": labels})
    return examples


# ------------------------------------------------------------------ evaluation (both systems)
@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    examples: Sequence[Example],
    pad_id: int,
    batch_size: int,
    candidates: list[int] | None,
) -> dict[str, float]:
    """Answer-token losses (per-sample mean and token mean), exact match and, with candidates, accuracy."""
    model.eval()
    sample_losses: list[float] = []
    token_sum, token_count, exact, correct = 0.0, 0, 0, 0
    for start in range(0, len(examples), batch_size):
        batch = pad(examples[start : start + batch_size], pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        logits, targets = logits[:, :-1], batch["labels"][:, 1:]
        supervised = targets != -100
        losses = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
        counts = supervised.sum(dim=1)
        sample_losses += (losses.sum(dim=1) / counts.clamp_min(1)).tolist()
        token_sum += float(losses.sum())
        token_count += int(counts.sum())
        hits = (logits.argmax(dim=-1) == targets) | ~supervised
        exact += int((hits.all(dim=1) & (counts > 0)).sum())
        if candidates is not None:
            position = supervised.int().argmax(dim=1)
            rows = torch.arange(len(position))
            scores = logits[rows, position][:, candidates]
            truth = targets[rows, position]
            correct += int((torch.tensor(candidates)[scores.argmax(dim=1)] == truth).sum())
    n = len(examples)
    out = {
        "loss_sample": statistics.fmean(sample_losses),
        "loss_token": token_sum / token_count,
        "exact_match": exact / n,
    }
    if candidates is not None:
        out["acc"] = correct / n
    return out


# ------------------------------------------------------------------ systems
def plain_batches(
    examples: Sequence[Example], batch_size: int, steps: int, seed: int, pad_id: int
) -> Iterator[dict]:
    generator = torch.Generator().manual_seed(seed)
    produced = 0
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            if produced == steps:
                return
            yield pad([examples[i] for i in order[start : start + batch_size]], pad_id)
            produced += 1


def peft_lora(base: torch.nn.Module, rank: int, alpha: float, targets: Sequence[str]) -> torch.nn.Module:
    """The plain loop's model: peft LoRA on ``targets`` (no dropout, no bias), in train mode."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none")
    return get_peft_model(base, config).train()


def plain_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], aggregation: str) -> torch.Tensor:
    """The plain loop's training loss: cross-entropy over the supervised (answer) tokens, one mean over
    every token of the batch (``token_mean``, as Hugging Face and peft reduce it) or per row first."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # at least float32 (a bf16 model's logits are upcast; a float64 one, the tests' exact reference, stays)
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    targets = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    counts = (targets != -100).sum(dim=1)
    if aggregation == "token_mean":
        return losses.sum() / counts.sum()
    return (losses.sum(dim=1) / counts.clamp_min(1)).mean()


def plain_loop(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    aggregation: str,
) -> list[float]:
    """One optimizer step per batch, as a user writes it; returns the training loss of every step."""
    losses = []
    for batch in batches:
        loss = plain_loss(model, batch, aggregation)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def train_peft(
    base: torch.nn.Module, train: Sequence[Example], args: argparse.Namespace, seed: int, pad_id: int
):
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    torch.manual_seed(seed)
    model = peft_lora(base, args.rank, args.alpha, args.targets.split(","))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, args.warmup, args.steps, min_lr_rate=args.min_lr_ratio
    )
    batches = plain_batches(train, args.batch_size, args.steps, seed, pad_id)
    losses = plain_loop(model, batches, optimizer, scheduler, args.loss_aggregation)
    return model, sum(p.numel() for p in params), losses[-1] if losses else math.nan


def train_layermoe(task: str, dm: Any, args: argparse.Namespace, seed: int, router: bool):
    import lightning.pytorch as pl

    from layermoe.lightning_modules import MoELoRAFineTuner

    pl.seed_everything(seed, verbose=False)
    experts = args.router_experts if router else 1
    adapter = {
        "target_modules": args.targets.split(","),
        "experts": experts,
        "rank": max(1, args.rank // experts),
        "lora_alpha": args.alpha * max(1, args.rank // experts) / args.rank,  # same alpha / r as LoRA
    }
    module = MoELoRAFineTuner(
        model=TINY_MODEL if args.quick else args.model,
        adapter=adapter,
        task="classification" if task == "sst2" else "instruction",
        lr=args.lr,
        warmup_steps=args.warmup,
        scheduler="cosine",
        min_lr_ratio=args.min_lr_ratio,
        loss_aggregation=args.loss_aggregation,
        print_layout=False,
        print_metrics=False,
        exact_resume=False,
    )
    trainer = pl.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        devices=1,
        precision="32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=dm)
    last = float(
        trainer.callback_metrics.get("train/loss_step", trainer.callback_metrics.get("train/loss", math.nan))
    )
    params = sum(p.numel() for _, p in module.trainable_parameters())
    return module.model, params, last


def run_one(task: str, system: str, seed: int, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    from layermoe.data.tokenizer import load_tokenizer
    from layermoe.lightning_modules.model_factory import build_model

    dm = data_module(task, folder, args, seed, carve=system != "peft")
    dm.setup()
    tokenizer = dm.prepare_tokenizer()
    pad_id = tokenizer.pad_token_id
    candidates = list(dm.candidate_ids) if task == "sst2" else None
    project_test = project_examples(dm, "test")
    started = time.perf_counter()
    if system == "peft":
        plain_tokenizer = tokenizer if args.quick else load_tokenizer(args.model_folder)
        raw_train = read_rows(folder / "train.jsonl")
        train = [
            plain_encode(plain_tokenizer, r, task, args.max_length, args.separator_in_prompt)
            for r in raw_train
        ]
        base = build_model(TINY_MODEL) if args.quick else build_model(args.model_folder)
        model, params, last = train_peft(base, train, args, seed, pad_id)
        project_train = project_examples(dm, "train")
        same = sum(a == b for a, b in zip(train, project_train, strict=True)) / len(train)
    else:
        model, params, last = train_layermoe(task, dm, args, seed, router=system == "layermoe-router")
        same = 1.0
    trained = time.perf_counter()
    # One test encoding for every system (the project's: the answer's tokens, not a separator token
    # of its own), so the systems differ only in how they trained.
    metrics = evaluate(model, project_test, pad_id, args.eval_batch_size, candidates)
    return {
        "task": task,
        "system": system,
        "arm": arm_name(system, args),
        "seed": seed,
        "settings": run_settings(args),
        "train_rows": len(dm.datasets["train"]),
        "test_rows": len(project_test),
        "trainable_params": params,
        "final_train_loss": last,
        "train_encoding_same_as_project": same,
        **metrics,
        "train_seconds": trained - started,
        "eval_seconds": time.perf_counter() - trained,
        "threads": torch.get_num_threads(),
        "machine": machine_description(),
    }


# ------------------------------------------------------------------ results
def spread(values: Sequence[float]) -> str:
    """mean, then [min, max] over seeds."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def table(results: Sequence[dict[str, Any]]) -> str:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["task"], r["arm"]), []).append(r)
    lines = [
        "| task | system | seeds | test loss (per sample) | test loss (per token) | exact match | acc | train s/run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (task, arm), runs in sorted(groups.items()):
        runs.sort(key=lambda r: r["seed"])
        cells = [spread([r[k] for r in runs]) for k in ("loss_sample", "loss_token", "exact_match")]
        acc = spread([r["acc"] for r in runs]) if "acc" in runs[0] else "-"
        seconds = statistics.fmean(r["train_seconds"] for r in runs)
        lines.append(f"| {task} | {arm} | {len(runs)} | {' | '.join(cells)} | {acc} | {seconds:.0f} |")
    verdicts = parity_verdicts(groups)
    return "\n".join([*lines, "", "Cells: mean over seeds [min, max].", *verdicts])


def parity_verdicts(groups: dict[tuple[str, str], list[dict[str, Any]]]) -> list[str]:
    """Issue 35's criterion per task: is each project arm's mean test loss per sample inside the seed range
    of each plain-loop arm (two or more seeds)?"""
    lines = []
    for (task, arm), runs in sorted(groups.items()):
        if arm.startswith("peft"):
            continue
        mean = statistics.fmean(r["loss_sample"] for r in runs)
        for (other_task, peft_arm), peft_runs in sorted(groups.items()):
            if other_task != task or not peft_arm.startswith("peft") or len(peft_runs) < 2:
                continue
            low, high = (f(r["loss_sample"] for r in peft_runs) for f in (min, max))
            where = "inside" if low <= mean <= high else "above" if mean > high else "below"
            peft_mean = statistics.fmean(r["loss_sample"] for r in peft_runs)
            lines.append(
                f"- {task}: {arm} mean {mean:.3f} ({len(runs)} seeds) is {where} {peft_arm}'s range"
                f" [{low:.3f}, {high:.3f}] ({len(peft_runs)} seeds; {100 * (mean / peft_mean - 1):+.1f}% on the mean)"
            )
    return ["", "Test loss per sample, project vs plain loop:", *lines] if lines else []


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    results = Path(args.results)
    if args.table:
        print(table(load_results(results)))
        return 0
    if not args.quick:
        from layermoe.lightning_modules.model_factory import resolve_model_dir

        args.model_folder = resolve_model_dir(args.model)
    workdir = Path(args.workdir) if args.workdir else cache_dir() / "parity"
    if args.quick:
        workdir = workdir / "quick"
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    seeds = [int(s) for s in args.seeds.split(",")]
    for task in args.tasks.split(","):
        folder, description = prepare_task(task, args, workdir / task)
        print(f"{description}; {args.steps} steps of batch {args.batch_size}", flush=True)
        for system in args.systems.split(","):
            for seed in seeds:
                arm = arm_name(system, args)
                path = result_path(results, task, arm, seed)
                if path.is_file() and same_settings(json.loads(path.read_text()).get("settings"), args):
                    print(f"skip {path.name} (done)", flush=True)
                    continue
                result = run_one(task, system, seed, args, folder)
                write_result(path, result)
                print(
                    f"{task} {arm} seed {seed}: loss/sample {result['loss_sample']:.4f}, loss/token "
                    f"{result['loss_token']:.4f}, exact {result['exact_match']:.3f}, "
                    f"{result['train_seconds']:.0f} s",
                    flush=True,
                )
    print(table(load_results(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
