"""How much does CountSketching the per-sample gradients change the scores? (SmolLM2, SST-2)

The one-shot LayerIF arm of the allocation-quality experiment scores the frozen attention weights of every
block (884k numbers per block); exact per-sample rows of all 30 blocks would need ~20 GB, so that arm
sketches them to ``k`` coordinates. This script scores a few blocks both ways on the same samples and
prints each block's exact and sketched score, their relative difference, and the rank agreement; with
several scorers and sketch seeds, one summary line per scorer (Spearman and the largest relative
difference at each seed; every scorer reads the same captured statistics).

    python benchmarks/sketch_fidelity.py --blocks 0 6 12 18 24 29 --k 16384
    python benchmarks/sketch_fidelity.py --blocks 0 7 14 21 29 --seeds 5 \
        --scorers layerif fisher_influence curvature_gain grad_norm
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--blocks", nargs="+", type=int, default=[0, 6, 12, 18, 24, 29])
    parser.add_argument("--k", type=int, default=16384, help="sketch size (projection_dim)")
    parser.add_argument("--n", type=int, default=128, help="training samples")
    parser.add_argument("--m", type=int, default=64, help="validation samples")
    parser.add_argument("--scorers", nargs="+", default=["layerif"], help="the first gets the table")
    parser.add_argument("--seeds", type=int, default=1, help="sketch seeds 0..seeds-1")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from scipy.stats import spearmanr

    from layermoe.adapters import MoELoRAConfig, inject
    from layermoe.callbacks.data import training_batches, validation_batches
    from layermoe.data import TextDataModule
    from layermoe.lightning_modules.model_factory import build_model
    from layermoe.scoring import capture_statistics, get_scorer

    data = TextDataModule(
        train_file="{shared}/sst2/train.jsonl",
        test_file="{shared}/sst2/validation.jsonl",
        tokenizer="{cache}/smollm2-135m-instruct",
        prompt_template="Review: {text}\nSentiment:",
        label_words=["negative", "positive"],
        max_length=48,
        val_size=512,
    )
    data.setup("fit")
    train = training_batches(data.train_dataloader(), args.n, seed=0, batch_size=8)
    val = validation_batches(data.val_dataloader(), args.m, batch_size=8)
    model = build_model("{cache}/smollm2-135m-instruct")
    inject(model, MoELoRAConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], experts=4, rank=4))
    scorers = {name: get_scorer(name) for name in args.scorers}
    common = {"scope": "base", "modules": ["self_attn"], "blocks": args.blocks, "progress": False}
    started = time.perf_counter()
    exact_stats = capture_statistics(model, train, val, max_store_bytes=2**40, **common)
    exact_s = time.perf_counter() - started
    exact = {name: scorer.score(exact_stats) for name, scorer in scorers.items()}
    sketched: dict[str, list[dict[int, float]]] = {name: [] for name in scorers}
    sketch_s = []
    for seed in range(args.seeds):
        started = time.perf_counter()
        stats = capture_statistics(model, train, val, projection_dim=args.k, projection_seed=seed, **common)
        sketch_s.append(time.perf_counter() - started)
        for name, scorer in scorers.items():
            sketched[name].append(scorer.score(stats))
    first = args.scorers[0]
    print(f"{first} on base attention weights, n={args.n}, m={args.m}, k={args.k}, sketch seed 0")
    print(f"capture: exact {exact_s:.0f} s, sketched {min(sketch_s):.0f}-{max(sketch_s):.0f} s")
    print("| block | exact | sketched | relative difference |")
    print("| --- | --- | --- | --- |")
    for block in args.blocks:
        value, reference = sketched[first][0][block], exact[first][block]
        print(f"| {block} | {reference:.4e} | {value:.4e} | {100 * _relative(value, reference):.2f}% |")
    values = [exact[first][b] for b in args.blocks]
    spread = (max(values) - min(values)) / max(abs(v) for v in values)
    rho = spearmanr(values, [sketched[first][0][b] for b in args.blocks]).statistic
    print(f"Spearman rank correlation over blocks: {rho:.3f}")
    print(f"spread of the exact scores across these blocks: {100 * spread:.1f}% of the largest")
    print()
    print(
        f"| scorer | Spearman, seeds 0-{args.seeds - 1} | largest relative difference, seeds 0-{args.seeds - 1} |"
    )
    print("| --- | --- | --- |")
    for name in scorers:
        rhos, worst = [], []
        for scores in sketched[name]:
            rhos.append(
                spearmanr([exact[name][b] for b in args.blocks], [scores[b] for b in args.blocks]).statistic
            )
            worst.append(max(_relative(scores[b], exact[name][b]) for b in args.blocks))
        print(
            f"| {name} | {' '.join(f'{r:.2f}' for r in rhos)} | {' '.join(f'{100 * w:.2f}%' for w in worst)} |"
        )


def _relative(value: float, reference: float) -> float:
    return abs(value - reference) / max(abs(reference), 1e-30)


if __name__ == "__main__":
    main()
