"""How much does CountSketching the per-sample gradients change the scores? (SmolLM2, SST-2)

The one-shot LayerIF arm of the allocation-quality experiment scores the frozen attention weights of every
block (884k numbers per block); exact per-sample rows of all 30 blocks would need ~20 GB, so that arm
sketches them to ``k`` coordinates. This script scores a few blocks both ways on the same samples and
prints each block's exact and sketched score, their relative difference, and the rank agreement.

    python benchmarks/sketch_fidelity.py --blocks 0 6 12 18 24 29 --k 16384
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
    parser.add_argument("--scorer", default="layerif")
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
    scorer = get_scorer(args.scorer)
    common = {"scope": "base", "modules": ["self_attn"], "blocks": args.blocks, "progress": False}
    started = time.perf_counter()
    exact = scorer.score(capture_statistics(model, train, val, max_store_bytes=2**40, **common))
    exact_s = time.perf_counter() - started
    started = time.perf_counter()
    sketched = scorer.score(
        capture_statistics(model, train, val, projection_dim=args.k, projection_seed=0, **common)
    )
    sketch_s = time.perf_counter() - started
    print(f"{args.scorer} on base attention weights, n={args.n}, m={args.m}, k={args.k}")
    print(f"capture: exact {exact_s:.0f} s, sketched {sketch_s:.0f} s")
    print("| block | exact | sketched | relative difference |")
    print("| --- | --- | --- | --- |")
    for block in args.blocks:
        rel = abs(sketched[block] - exact[block]) / max(abs(exact[block]), 1e-30)
        print(f"| {block} | {exact[block]:.4e} | {sketched[block]:.4e} | {100 * rel:.2f}% |")
    values = [exact[b] for b in args.blocks], [sketched[b] for b in args.blocks]
    spread = (max(values[0]) - min(values[0])) / max(abs(v) for v in values[0])
    print(f"Spearman rank correlation over blocks: {spearmanr(*values).statistic:.3f}")
    print(f"spread of the exact scores across these blocks: {100 * spread:.1f}% of the largest")


if __name__ == "__main__":
    main()
