"""Scoring-engine speed and memory on SmolLM2-135M with uniform MoE-LoRA (E=4, r=8, all 7 projections).

(a) each scorer vs the LayerIF loop formulation (per validation sample, per training sample, per
    tensor) on the same captured per-sample gradients of one block, adapter scope and base scope on the
    attention weights;
(b) the whole scoring pass (capture + every gradient scorer) vs one forward+backward over the same
    n + m samples in training batches, and vs the LayerIF pipeline end to end (one backward per sample
    + the loop on all blocks);
(c) peak RSS of each job, each in its own subprocess (resource.getrusage), beside plain training.

Every job runs in a fresh subprocess so peak RSS is its own; ratios come from the same invocation.

    python benchmarks/scoring_speed.py                         # the issue's sizes (slow on 2 cores)
    python benchmarks/scoring_speed.py --n 32 --m 8 --out /tmp/scoring.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

JOBS = (
    "train",
    "score_adapter_exact",
    "score_adapter_sketch",
    "score_base_sketch",
    "layerif_pipeline",
    "loops",
)
GRADIENT_SCORERS = ("layerif", "fisher_influence", "curvature_gain", "grad_norm")


def build_model(random_init: bool):
    """SmolLM2-135M (prepared by `python -m layermoe.models prepare smollm2`) with MoE-LoRA adapters.

    Falls back to a randomly initialised model with SmolLM2's dims when the weights are not prepared
    (timings only depend on the shapes).
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from layermoe.adapters import MoELoRAConfig, inject
    from layermoe.models.smollm2 import is_prepared, smollm2_dir

    if not random_init and is_prepared():
        model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir()), dtype=torch.float32)
        source = "SmolLM2-135M-Instruct weights"
    else:
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            max_position_embeddings=8192,
            tie_word_embeddings=True,
        )
        model = LlamaForCausalLM(config)
        source = "random init, SmolLM2 dims"
    inject(model, MoELoRAConfig(experts=4, rank=8))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero B so every adapter parameter has a gradient (as after some training)
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.copy_(0.01 * torch.randn(param.shape, generator=generator))
    return model, source


def make_batches(count: int, seq_len: int, batch_size: int, seed: int):
    """Causal-LM batches from the shared SST-2 text when present (right padded), else random tokens."""
    import torch

    from layermoe.models.smollm2 import is_prepared, smollm2_dir
    from layermoe.paths import shared_data_dir

    path = shared_data_dir() / "sst2" / "train.jsonl"
    ids = mask = None
    if path.is_file() and is_prepared():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir()))
        with path.open() as handle:
            lines = [
                json.loads(line)["text"] for _, line in zip(range(seed * count + count), handle, strict=False)
            ]
        texts = lines[seed * count : seed * count + count]
        if len(texts) == count:
            tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
            tokenizer.padding_side = "right"
            enc = tokenizer(
                texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt"
            )
            ids, mask = enc["input_ids"], enc["attention_mask"]
    if ids is None:
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 49152, (count, seq_len), generator=generator)
        mask = torch.ones_like(ids)
    labels = ids.masked_fill(mask == 0, -100)
    return [
        {
            "input_ids": ids[s : s + batch_size],
            "attention_mask": mask[s : s + batch_size],
            "labels": labels[s : s + batch_size],
        }
        for s in range(0, count, batch_size)
    ]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_job(job: str, args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from layermoe.scoring import capture_statistics, causal_lm_per_sample_loss, get_scorer

    model, source = build_model(args.random_init)
    train = make_batches(args.n, args.seq_len, args.batch_size, seed=0)
    val = make_batches(args.m, args.seq_len, args.batch_size, seed=1)
    result: dict = {"job": job, "source": source, "rss_after_load_mib": peak_rss_mib()}
    start = time.perf_counter()
    if job == "train":
        model.train()
        for batch in train + val:
            losses = causal_lm_per_sample_loss(model, batch)
            losses.mean().backward()
        result["seconds"] = time.perf_counter() - start
    elif job.startswith("score_"):
        scope = "base" if "base" in job else "adapter"
        k = None if job.endswith("exact") else args.projection_dim
        stats = capture_statistics(
            model,
            train,
            val,
            scope=scope,
            modules=["self_attn"] if scope == "base" else None,
            chunk_size=args.batch_size,
            projection_dim=k,
            max_store_bytes=args.max_store_bytes,
            progress=False,
        )
        result["capture_seconds"] = time.perf_counter() - start
        result["scorer_seconds"] = {}
        for name in GRADIENT_SCORERS:
            t0 = time.perf_counter()
            get_scorer(name).score(stats)
            result["scorer_seconds"][name] = time.perf_counter() - t0
        result["seconds"] = time.perf_counter() - start
        result["dim_per_block"] = next(iter(stats.values())).dim
    elif job == "layerif_pipeline":
        # What the published pipeline does: one forward+backward per sample, reading .grad per tensor.
        model.eval()
        params = [p for p in model.parameters() if p.requires_grad]
        samples = [
            {k: v[i : i + 1] for k, v in b.items()}
            for b in train + val
            for i in range(b["input_ids"].shape[0])
        ]
        timed = samples[: args.pipeline_samples]
        for sample in timed:
            model.zero_grad(set_to_none=True)
            causal_lm_per_sample_loss(model, sample).sum().backward()
            _ = [p.grad.detach().clone() for p in params]
        per_sample = (time.perf_counter() - start) / len(timed)
        result["per_sample_backward_seconds"] = per_sample
        result["samples_timed"] = len(timed)
        result["seconds"] = per_sample * len(samples)
    elif job == "loops":
        result.update(loop_comparison(model, args))
        result["seconds"] = time.perf_counter() - start
    result["peak_rss_mib"] = peak_rss_mib()
    return result


def loop_comparison(model, args: argparse.Namespace) -> dict:
    """(a): one block's captured per-sample gradients, the loop vs Gram formation and each scorer."""
    from layermoe.scoring import capture_per_sample_gradients, get_scorer, layerif_loop_influences
    from layermoe.scoring.statistics import statistics_from_pieces

    out: dict = {}
    train = make_batches(args.loop_n, args.loop_seq_len, args.batch_size, seed=2)
    val = make_batches(args.loop_m, args.loop_seq_len, args.batch_size, seed=3)
    for scope, modules in (("adapter", None), ("base", ["self_attn"])):
        kwargs = {
            "scope": scope,
            "modules": modules,
            "blocks": [args.loop_block],
            "chunk_size": args.batch_size,
        }
        g_train = capture_per_sample_gradients(model, train, **kwargs)[args.loop_block]
        g_val = capture_per_sample_gradients(model, val, **kwargs)[args.loop_block]
        names = sorted(g_train)
        for label, n, m in (("full", args.loop_n, args.loop_m), ("small", args.n, args.m)):
            per_train = [{k: g_train[k][i] for k in names} for i in range(n)]
            per_val = [{k: g_val[k][j] for k in names} for j in range(m)]
            t0 = time.perf_counter()
            loop = layerif_loop_influences(per_train, per_val)
            loop_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            stats = statistics_from_pieces(
                [g_train[k][:n].reshape(n, -1) for k in names],
                [g_val[k][:m].reshape(m, -1) for k in names],
                dim=sum(g_train[k][0].numel() for k in names),
            )
            gram_s = time.perf_counter() - t0
            scorer_s = {}
            for name in GRADIENT_SCORERS:
                t0 = time.perf_counter()
                get_scorer(name).score({0: stats})
                scorer_s[name] = time.perf_counter() - t0
            from layermoe.scoring import datainf_influences
            from layermoe.scoring.scorers.influence import block_damping

            closed = datainf_influences(stats, block_damping(stats, 0, None, 0.1))
            rel = float((closed - loop.double()).abs().max() / loop.double().abs().max())
            out[f"{scope}_{label}"] = {
                "n": n,
                "m": m,
                "tensors": len(names),
                "dim": stats.dim,
                "loop_seconds": loop_s,
                "gram_seconds": gram_s,
                "scorer_seconds": scorer_s,
                "loop_vs_closed_form_max_rel_diff": rel,
            }
    return out


def child_main(args: argparse.Namespace) -> None:
    result = run_job(args.child, args)
    Path(args.json_out).write_text(json.dumps(result))


def run_children(args: argparse.Namespace) -> dict:
    results = {}
    forwarded = sys.argv[1:]
    for job in args.jobs:
        target = Path(args.workdir) / f"{job}.json"
        command = [sys.executable, __file__, *forwarded, "--child", job, "--json-out", str(target)]
        print(f"[{time.strftime('%H:%M:%S')}] {job} ...", flush=True)
        subprocess.run(command, check=True)
        results[job] = json.loads(target.read_text())
        print(json.dumps(results[job]), flush=True)
    return results


def fmt(seconds: float) -> str:
    return f"{seconds:.3g} s" if seconds >= 0.01 else f"{seconds * 1000:.3g} ms"


def report(results: dict, args: argparse.Namespace, command: str) -> str:
    lines = [
        "## Scoring engine (issue 12): speed and memory",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: 2-core AVX2 CPU shared with other jobs (load average > 6 during the run), torch "
        f"{__import__('torch').__version__}, {args.threads} intra-op thread(s), float32, {platform.python_version()}. "
        f"Model: {results.get('train', next(iter(results.values())))['source']}, MoE-LoRA E=4, r=8 on all 7 "
        "projections of all 30 blocks (345,628 adapter parameters per block incl. routers).",
        "",
    ]
    if "loops" in results:
        lines += [
            "### (a) scorers vs the LayerIF loop on identical captured gradients (one block)",
            "",
            f"Per-sample gradients of block {args.loop_block} captured once ({args.loop_seq_len}-token samples: the "
            "cost of both sides depends on n, m and the tensor sizes only). Loop = per validation sample, per "
            "training sample, per tensor (layermoe.scoring.layerif_loop_influences). Gram = forming the "
            "block's statistics from the same gradients; scorers then only touch n x n matrices.",
            "",
            "| scope | n | m | tensors | d_l | loop | Gram | layerif | fisher_influence | curvature_gain | grad_norm "
            "| loop / layerif | loop / (Gram + layerif) | max rel diff loop vs closed form |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for key, row in results["loops"].items():
            if not isinstance(row, dict) or "loop_seconds" not in row:
                continue
            sc = row["scorer_seconds"]
            lines.append(
                f"| {key.split('_')[0]} | {row['n']} | {row['m']} | {row['tensors']} | {row['dim']:,} | "
                f"{fmt(row['loop_seconds'])} | {fmt(row['gram_seconds'])} | "
                + " | ".join(fmt(sc[s]) for s in GRADIENT_SCORERS)
                + f" | {row['loop_seconds'] / sc['layerif']:.0f}x"
                f" | {row['loop_seconds'] / (row['gram_seconds'] + sc['layerif']):.1f}x"
                f" | {row['loop_vs_closed_form_max_rel_diff']:.1e} |"
            )
        lines.append("")
    if "train" in results:
        base = results["train"]["seconds"]
        lines += [
            f"### (b) whole scoring pass vs training, n={args.n}, m={args.m}, {args.seq_len} tokens, batch {args.batch_size}",
            "",
            "| job | wall | vs one fwd+bwd over the n+m samples | peak RSS | RSS after model load |",
            "|---|---|---|---|---|",
            f"| plain training fwd+bwd (train mode, batch {args.batch_size}) | {fmt(base)} | 1.00x | "
            f"{results['train']['peak_rss_mib']:.0f} MiB | {results['train']['rss_after_load_mib']:.0f} MiB |",
        ]
        for job in ("score_adapter_exact", "score_adapter_sketch", "score_base_sketch"):
            if job in results:
                r = results[job]
                label = {
                    "score_adapter_exact": "scoring, adapter scope, exact Grams",
                    "score_adapter_sketch": f"scoring, adapter scope, CountSketch k={args.projection_dim}",
                    "score_base_sketch": f"scoring, base scope (attention q/k/v/o), CountSketch k={args.projection_dim}",
                }[job]
                scorers = sum(r["scorer_seconds"].values())
                lines.append(
                    f"| {label} (capture {fmt(r['capture_seconds'])} + 4 scorers {fmt(scorers)}) | {fmt(r['seconds'])} | "
                    f"{r['seconds'] / base:.2f}x | {r['peak_rss_mib']:.0f} MiB | {r['rss_after_load_mib']:.0f} MiB |"
                )
        if "layerif_pipeline" in results and "loops" in results:
            pipe = results["layerif_pipeline"]
            small = results["loops"]["adapter_small"]["loop_seconds"]
            total = pipe["seconds"] + 30 * small
            lines.append(
                f"| LayerIF pipeline: {args.n + args.m} per-sample fwd+bwd (extrapolated from {pipe['samples_timed']}: "
                f"{fmt(pipe['per_sample_backward_seconds'])} each) + loop on 30 blocks (30 x {fmt(small)}, block "
                f"{args.loop_block} measured) | {fmt(total)} | {total / base:.2f}x | {pipe['peak_rss_mib']:.0f} MiB | |"
            )
            if "score_adapter_sketch" in results:
                lines += [
                    "",
                    f"Scoring pass (adapter, sketch) vs the LayerIF pipeline at this size: "
                    f"{total / results['score_adapter_sketch']['seconds']:.1f}x faster.",
                ]
            full = results["loops"].get("adapter_full")
            if full:
                samples = full["n"] + full["m"]
                full_total = samples * pipe["per_sample_backward_seconds"] + 30 * full["loop_seconds"]
                ours = results.get("score_adapter_sketch", results.get("score_adapter_exact"))
                if ours:
                    ours_full = ours["seconds"] * samples / (args.n + args.m)
                    lines += [
                        "",
                        f"Extrapolated to the issue's n={full['n']}, m={full['m']} (64 tokens): LayerIF pipeline "
                        f"{samples} x {fmt(pipe['per_sample_backward_seconds'])} + 30 x {fmt(full['loop_seconds'])} = "
                        f"{fmt(full_total)}; scoring pass (linear in samples) about {fmt(ours_full)}: "
                        f"{full_total / ours_full:.1f}x.",
                    ]
        lines.append("")
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=256, help="training samples")
    parser.add_argument("--m", type=int, default=64, help="validation samples")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16, help="training batch = scoring chunk size")
    parser.add_argument("--projection-dim", type=int, default=4096)
    parser.add_argument("--max-store-bytes", type=int, default=2 * 2**30)
    parser.add_argument("--loop-n", type=int, default=256, help="(a) training samples")
    parser.add_argument("--loop-m", type=int, default=64, help="(a) validation samples")
    parser.add_argument("--loop-seq-len", type=int, default=4, help="(a) tokens per sample")
    parser.add_argument("--loop-block", type=int, default=0)
    parser.add_argument("--pipeline-samples", type=int, default=6, help="per-sample backwards timed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--random-init", action="store_true")
    parser.add_argument("--jobs", nargs="+", default=list(JOBS), choices=JOBS)
    parser.add_argument("--workdir", default="/tmp/layermoe_scoring_bench")
    parser.add_argument("--out", default=None, help="write the markdown section here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json-out", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse()
    if args.child:
        child_main(args)
        return
    os.makedirs(args.workdir, exist_ok=True)
    command = "python benchmarks/scoring_speed.py " + " ".join(sys.argv[1:])
    results = run_children(args)
    Path(args.workdir, "results.json").write_text(json.dumps(results, indent=1))
    text = report(results, args, command)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
