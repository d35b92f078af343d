"""gpu_check's markdown: one table of the phases (status, seconds, the key numbers) and one of step times."""

from __future__ import annotations

from typing import Any


def _fmt(value: Any) -> str:
    return "-" if value is None else str(value)


def markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    packages = ", ".join(f"{k} {v}" for k, v in machine["packages"].items() if v)
    lines = [
        f"# gpu_check ({report['mode']}): {machine['device']}"
        + (f", {machine['gpu_memory_gib']} GiB" if machine["gpu_memory_gib"] else ""),
        "",
        f"Python {machine['python']}, torch {machine['torch']} (CUDA {_fmt(machine['cuda'])}), {packages}; "
        f"total {report['total_s']} s.",
        "",
        "| phase | status | s | result |",
        "|---|---|---|---|",
    ]
    for name, record in report["phases"].items():
        summary = record["error"] if record["status"] != "ok" else _summary(name, record["results"])
        lines.append(f"| {name} | {record['status']} | {_fmt(record['seconds'])} | {summary} |")
    steps = report["phases"].get("step_moe_vs_peft", {}).get("results") or {}
    if steps:
        lines += [
            "",
            "| model | adapter | step ms | peak GiB | peak over weights GiB | trainable params |",
            "|---|---|---|---|---|---|",
        ]
        for model, result in steps.items():
            for adapter, values in result.items():
                if isinstance(values, dict):
                    lines.append(
                        f"| {model} | {adapter} | {values['step_ms']} | {_fmt(values['peak_gib'])} | "
                        f"{_fmt(values['peak_over_resident_gib'])} | {values['trainable_params']:,} |"
                    )
    return "\n".join(lines) + "\n"


def _count(n: int) -> str:
    return next(
        f"{n / scale:.3g}{unit}"
        for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k"), (1, ""))
        if n >= scale
    )


def _summary(name: str, results: dict[str, Any]) -> str:
    if name == "build_models":
        return "; ".join(f"{k}: {_count(v['params'])} params, {v['build_s']} s" for k, v in results.items())
    if name == "step_moe_vs_peft":
        return "; ".join(
            f"{k}: step MoE/peft {v['step_time_moe_over_peft']}x"
            + (
                f", extra memory {v['extra_memory_moe_over_peft']}x"
                if "extra_memory_moe_over_peft" in v
                else ""
            )
            for k, v in results.items()
        )
    if name == "scoring_vs_step":
        scoring, step = results["scoring"], results["training_step"]
        return (
            f"{results['model']}: capture {scoring['capture_s']} s = {results['capture_over_step_time']} steps "
            f"of {step['step_ms']} ms; peak {_fmt(scoring['peak_gib'])} GiB vs step {_fmt(step['peak_gib'])} GiB; "
            f"k={_fmt(results['projected_dim'])}"
        )
    if name == "rewire_surgery":
        return f"{results['model']}: {results['layers_resized']} layers, apply_layout {results['apply_layout_s']} s"
    if name in ("fit_resume", "fit_growth_resume"):
        rounds = (
            f"; rounds after steps {results['round_steps']}, max disturbance {_fmt(results['max_round_disturbance'])}"
            if "round_steps" in results
            else ""
        )
        return (
            "; ".join(
                f"resume from step {r['from_step']}: identical {r['identical']}, max abs diff {r['max_abs_diff']:.3g}"
                for r in results["resumes"]
            )
            + f"; rewires {results['rewires_done']}, layout changed {results['layout_changed']}"
            + rounds
        )
    if name == "quantized_4bit":
        return f"{results['model']} {results['base_layer']}: step {results['step_ms']} ms, peak {_fmt(results['peak_gib'])} GiB"
    if name == "gpu_tests":
        return ", ".join(
            f"{k} {results[k]}" for k in ("tests", "failures", "errors", "skipped") if k in results
        )
    return ""
