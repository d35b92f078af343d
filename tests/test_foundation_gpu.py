"""The GPU path: SmolLM2 with a 4-bit NF4 base, bf16 autocast, a few training steps (skips without CUDA)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_smollm2_4bit_trains_on_gpu(tmp_path, smollm2_folder, toy_files, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from layermoe.cli import Trainer
    from layermoe.data import TextDataModule
    from layermoe.lightning_modules import MoELoRAFineTuner

    module = MoELoRAFineTuner(
        model=str(smollm2_folder),
        adapter={"experts": 4, "rank": 4, "target_modules": ["q_proj", "v_proj"]},
        quantization="4bit",
        dtype="bfloat16",
        lr=1e-3,
    )
    assert type(module.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    data = TextDataModule(
        train_file=str(toy_files["train"]),
        tokenizer=str(smollm2_folder),
        label_words=["no", "yes"],
        val_size=16,
        batch_size=8,
    )
    trainer = Trainer(
        precision="auto", accelerator="gpu", devices=1, max_steps=6, logger=False, enable_checkpointing=False
    )
    assert trainer.precision in ("bf16-mixed", "16-mixed")
    before = {n: p.detach().clone() for n, p in module.trainable_parameters()}
    trainer.fit(module, data)
    changed = [n for n, p in module.trainable_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed, "no adapter parameter changed after 6 optimizer steps"
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
