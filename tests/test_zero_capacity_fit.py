"""Zero-capacity blocks through the callback in a fit (issue 22, part 1): a rewire empties block 0, a
later one gives it adapters back; an exact resume between the two ends with the same weights as the
uninterrupted run, and `load_adapted_checkpoint` rebuilds the emptied layout."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import seed_everything

from layermoe.adapters import layout, moe_layers
from layermoe.callbacks import LayerInfluenceCallback, load_adapted_checkpoint
from layermoe.callbacks.report import console_table
from tests.fixtures import quiet_influence
from tests.scripts.callback_fixtures import TinyLlamaModule, fit_counting_task

MAX_STEPS = 8


def _fit(
    tmp_path: Path, run: str, ckpt: Path | None = None
) -> tuple[TinyLlamaModule, LayerInfluenceCallback]:
    seed_everything(0)
    module = TinyLlamaModule(adapt=False, lr=1e-2)
    cb = quiet_influence(
        "test_empty_toggle",
        allocator_options={"experts_bounds": {0: (0, None)}},
        schedule={"warmup": 2, "every": 3, "max_rewires": 2},
        inject={"experts": 2, "rank": 4, "lora_alpha": 8.0, "lora_dropout": 0.1},
    )
    fit_counting_task(module, cb, tmp_path, run, ckpt, max_steps=MAX_STEPS, val_check_interval=4)
    return module, cb


def _adapter_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters() if "lora_" in k}


def test_rewire_empties_a_block_then_regrows_it_and_resumes_exactly(tmp_path: Path) -> None:
    full, cb = _fit(tmp_path, "a")
    assert [e["step"] for e in cb.history] == [2, 5]
    emptied, regrown = cb.history
    assert emptied["layout_before"][0]["experts"] == 2 and emptied["layout_after"][0]["experts"] == 0
    assert regrown["layout_after"][0]["experts"] > 0
    assert emptied["params_after"] <= emptied["budget"] and regrown["params_after"] <= regrown["budget"]
    # regrowth adds fresh experts (B = 0): exact, with fresh optimizer state
    block0 = [r for r in cb.last_reports if ".layers.0." in f".{r.module}"]
    assert block0 and all(r.exact and r.old_experts == 0 for r in block0)
    assert "2x4 -> 0x4" in console_table(emptied) and "0x4 -> " in console_table(regrown)
    assert layout(full) == regrown["layout_after"]
    # every block-0 adapter tensor was trained after regrowth (not left at B = 0)
    assert all(float(layer.lora_B.detach().abs().sum()) > 0 for layer in moe_layers(full)[0].values())

    middle = tmp_path / "a" / "step=4.ckpt"  # block 0 empty, second rewire still ahead
    reloaded = load_adapted_checkpoint(TinyLlamaModule, middle, adapt=False)
    assert layout(reloaded) == emptied["layout_after"]
    assert not [n for n, _ in reloaded.named_parameters() if "layers.0." in n and "lora_" in n]

    resumed, resumed_cb = _fit(tmp_path, "b", ckpt=middle)
    assert [e["step"] for e in resumed_cb.history] == [2, 5]
    assert resumed_cb.history[1]["layout_after"] == regrown["layout_after"]
    expected = _adapter_tensors(full)
    got = _adapter_tensors(resumed)
    assert got.keys() == expected.keys()
    for name, value in got.items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6)
