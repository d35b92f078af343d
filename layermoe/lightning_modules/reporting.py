"""The per-block layout table printed at fit start (and reused by the influence callback)."""

from __future__ import annotations

from torch import nn

from layermoe.adapters import moe_layers


def layout_rows(model: nn.Module) -> list[dict[str, int]]:
    """One row per adapted block: block, experts, rank, modules and trainable adapter parameters."""
    rows = []
    for block, layers in moe_layers(model).items():
        trainable = sum(p.numel() for layer in layers.values() for p in layer.parameters() if p.requires_grad)
        first = next(iter(layers.values()))
        rows.append(
            {
                "block": block,
                "experts": int(first.experts),
                "rank": int(first.rank),
                "modules": len(layers),
                "trainable": int(trainable),
            }
        )
    return rows


def block_alphas(model: nn.Module) -> dict[int, str]:
    """Each adapted block's lora_alpha ("a/b" when its modules differ): the config's, unless a rank
    change kept the block's scaling or a peft import set the LoRA's."""
    return {
        block: "/".join(f"{alpha:g}" for alpha in sorted({layer.lora_alpha for layer in layers.values()}))
        for block, layers in moe_layers(model).items()
    }


def format_layout_table(model: nn.Module, title: str | None = None) -> str:
    """A fixed-width table of :func:`layout_rows` and each block's alpha, with a total line; ``title`` is
    printed above it."""
    rows = layout_rows(model)
    alphas = block_alphas(model)
    # alpha last: the first columns keep their places for readers of earlier tables
    header = (
        f"{'block':>5}  {'experts':>7}  {'rank':>4}  {'modules':>7}  {'trainable params':>16}  {'alpha':>7}"
    )
    lines = [title] if title else []
    lines += [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['block']:>5}  {row['experts']:>7}  {row['rank']:>4}  {row['modules']:>7}  "
            f"{row['trainable']:>16,}  {alphas[row['block']]:>7}"
        )
    total = sum(row["trainable"] for row in rows)
    lines += ["-" * len(header), f"{'total':>5}  {'':>7}  {'':>4}  {'':>7}  {total:>16,}"]
    return "\n".join(lines)
