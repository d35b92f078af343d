"""MoELoRAFineTuner against independent references: losses, metrics, LR schedule, optimizer order,
checkpoints (weights_only, adapter-only, resized layouts) and the layout table."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from layermoe.adapters import apply_layout, layout, moe_layers
from layermoe.checkpointing import CheckpointLayoutError
from layermoe.lightning_modules import (
    MoELoRAFineTuner,
    candidate_logits,
    format_layout_table,
    layout_rows,
    per_sample_loss_from_logits,
)
from layermoe.lightning_modules.schedule import lr_multiplier
from tests.conftest import tiny_llama_spec

ADAPTER = {"experts": 2, "rank": 3, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def _module(**kwargs) -> MoELoRAFineTuner:
    defaults = {"model": tiny_llama_spec(), "adapter": ADAPTER, "num_classes": 2}
    defaults.update(kwargs)
    return MoELoRAFineTuner(**defaults)


def _batch(seed: int = 0, batch: int = 3, length: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 300, (batch, length), generator=g)
    labels = torch.full_like(ids, -100)
    positions = torch.randint(1, length, (batch,), generator=g)
    candidates = torch.tensor([[10, 20]] * batch)
    classes = torch.randint(0, 2, (batch,), generator=g)
    for row in range(batch):
        ids[row, positions[row]] = candidates[row, classes[row]]
        labels[row, positions[row]] = ids[row, positions[row]]
    mask = torch.ones_like(ids)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "class_label": classes,
        "candidate_token_ids": candidates,
    }


def test_per_sample_loss_matches_a_naive_loop():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, 11, generator=g)
    labels = torch.randint(0, 11, (3, 6), generator=g)
    labels[0, :3] = -100
    labels[2, :] = -100  # no supervised token -> 0
    expected = []
    for b in range(3):
        terms = [
            -torch.log_softmax(logits[b, t - 1], dim=-1)[labels[b, t]]
            for t in range(1, 6)
            if labels[b, t] != -100
        ]
        expected.append(torch.stack(terms).mean() if terms else torch.tensor(0.0))
    torch.testing.assert_close(per_sample_loss_from_logits(logits, labels), torch.stack(expected))


def test_module_loss_agrees_with_the_scoring_contract():
    scoring = pytest.importorskip("layermoe.scoring")
    module = _module().train()
    batch = _batch()
    with torch.no_grad():
        ours = module.per_sample_loss(batch)
        theirs = scoring.causal_lm_per_sample_loss(module.model, batch)
    torch.testing.assert_close(ours, theirs)


def test_label_logits_equal_the_full_logits_at_the_predicting_position(monkeypatch):
    module = _module().train()
    batch = _batch(seed=3, batch=4, length=9)
    batch["attention_mask"][1, -2:] = 0  # right padding after the label must not matter
    position = (batch["labels"] != -100).int().argmax(dim=1) - 1
    rows = torch.arange(4)
    full = module(batch)[rows, position]
    fast = module.label_logits(batch)  # only the needed positions go through the LM head
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    # the same parameter gradients as the loss on the whole-sequence logits
    loss_fast = module.per_sample_loss(batch).sum()
    grads_fast = torch.autograd.grad(loss_fast, [p for _, p in module.trainable_parameters()])
    loss_full = per_sample_loss_from_logits(module(batch), batch["labels"]).sum()
    grads_full = torch.autograd.grad(loss_full, [p for _, p in module.trainable_parameters()])
    torch.testing.assert_close(loss_fast, loss_full, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_fast, grads_full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # transformers without per-row logits_to_keep (the GPU machine's 5.17) takes the whole-sequence path
    from layermoe.lightning_modules import finetuner

    monkeypatch.setattr(finetuner, "PER_ROW_LOGITS_TO_KEEP", False)
    torch.testing.assert_close(module.label_logits(batch), full, rtol=1e-5, atol=1e-5)
    monkeypatch.undo()
    # a model whose forward has no logits_to_keep takes the whole-sequence path
    plain_forward = module.model.forward

    def forward_without_keep(input_ids=None, attention_mask=None, use_cache=None):
        return plain_forward(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)

    monkeypatch.setattr(module.model, "forward", forward_without_keep)
    torch.testing.assert_close(module.label_logits(batch), full, rtol=1e-5, atol=1e-5)


def test_candidate_logits_pick_the_position_before_the_label():
    batch = _batch(seed=2)
    logits = torch.randn(3, 7, 300)
    scores = candidate_logits(logits, batch["labels"], batch["candidate_token_ids"])
    for row in range(3):
        pos = int((batch["labels"][row] != -100).nonzero())
        assert torch.equal(scores[row], logits[row, pos - 1, batch["candidate_token_ids"][row]])
    bad = batch["labels"].clone()
    bad[0, -1] = 5
    bad[0, 0] = 5
    with pytest.raises(ValueError, match="exactly one label token"):
        candidate_logits(logits, bad, batch["candidate_token_ids"])


def test_training_loss_is_mean_per_sample_loss_plus_router_losses(monkeypatch):
    from layermoe.adapters import collect_router_losses

    module = _module().train()
    with torch.no_grad():  # non-zero router weights so the routing is not uniform
        for name, p in module.named_parameters():
            if "router_weight" in name:
                p.normal_(0, 0.5)
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    monkeypatch.setattr(module, "log_dict", lambda *a, **k: None)
    batch = _batch()
    loss = module.training_step(batch, 0)
    # an independent recomputation from a second, identical forward
    logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    router = collect_router_losses(module.model)
    log_probs = torch.log_softmax(logits, dim=-1)
    per_sample = []
    for row in range(logits.shape[0]):
        pos = int((batch["labels"][row] != -100).nonzero())
        per_sample.append(-log_probs[row, pos - 1, batch["labels"][row, pos]])
    assert float(router.loss.detach()) > 0
    torch.testing.assert_close(loss, torch.stack(per_sample).mean() + router.loss)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_lr_schedule_closed_form(kind):
    warmup, total, floor = 4, 20, 0.1
    f = lr_multiplier(kind, warmup, total, floor)
    for step in range(total + 3):
        if step < warmup:
            expected = (step + 1) / warmup
        elif kind == "constant":
            expected = 1.0
        else:
            p = min(1.0, (step - warmup) / (total - warmup))
            shape = 0.5 * (1 + math.cos(math.pi * p)) if kind == "cosine" else 1 - p
            expected = floor + (1 - floor) * shape
        assert f(step) == pytest.approx(expected)


def test_configure_optimizers_is_name_sorted_and_steps_per_batch():
    module = _module(lr=0.01, warmup_steps=2, scheduler="linear")

    class FakeTrainer:
        estimated_stepping_batches = 10

    module._trainer = FakeTrainer()  # configure_optimizers only reads estimated_stepping_batches
    config = module.configure_optimizers()
    optimizer = config["optimizer"]
    names = [n for n, _ in module.trainable_parameters()]
    assert names == sorted(names) and len(names) == len([p for p in module.parameters() if p.requires_grad])
    ordered = [p for _, p in module.trainable_parameters()]
    assert all(a is b for a, b in zip(optimizer.param_groups[0]["params"], ordered, strict=True))
    assert config["lr_scheduler"]["interval"] == "step"
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 1 / 2)


def test_only_adapters_are_trainable():
    module = _module()
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all(n.rsplit(".", 1)[-1].startswith("lora_") for n in trainable)
    assert not any("embed" in n or "lm_head" in n for n in trainable)


def test_layout_table_counts_match_the_parameters():
    module = _module()
    rows = layout_rows(module.model)
    for row in rows:
        layers = moe_layers(module.model)[row["block"]]
        d = {name: (layer.in_features, layer.out_features) for name, layer in layers.items()}
        e, r = ADAPTER["experts"], ADAPTER["rank"]
        # closed form: A (E r x d_in) + B (d_out x E r) + router (E x d_in + E) per module
        expected = sum(e * r * din + dout * e * r + e * din + e for din, dout in d.values())
        assert row == {"block": row["block"], "experts": e, "rank": r, "modules": 3, "trainable": expected}
    table = format_layout_table(module.model)
    assert f"{sum(r['trainable'] for r in rows):,}" in table.splitlines()[-1]


def _save(module: MoELoRAFineTuner, path, **extra) -> None:
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), **extra}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)


def test_adapter_only_checkpoint_round_trip_weights_only(tmp_path):
    module = _module()
    with torch.no_grad():
        for _, p in module.trainable_parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path / "m.ckpt"
    _save(module, path, **{"pytorch-lightning_version": "2.6.6"})
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["layermoe_adapter_only"] is True
    assert all(k.rsplit(".", 1)[-1].startswith("lora_") for k in checkpoint["state_dict"])
    restored = MoELoRAFineTuner.load_from_checkpoint(path, weights_only=True)
    batch = _batch()
    module.eval()
    restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(batch), module(batch), rtol=0, atol=0)


def test_resized_checkpoint_loads_into_a_fresh_module(tmp_path):
    module = _module()
    apply_layout(module.model, {0: {"experts": 3, "rank": 2}, 1: {"experts": 1, "rank": 5}})
    with torch.no_grad():
        for _, p in module.trainable_parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path / "resized.ckpt"
    _save(module, path, **{"pytorch-lightning_version": "2.6.6"})
    assert torch.load(path, weights_only=True)["layermoe_layout"] == layout(module.model)
    restored = MoELoRAFineTuner.load_from_checkpoint(path, weights_only=True)
    assert layout(restored.model) == {0: {"experts": 3, "rank": 2}, 1: {"experts": 1, "rank": 5}}
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(restored.eval()(batch), module.eval()(batch), rtol=0, atol=0)


def test_adapter_only_load_rejects_mismatched_adapters(tmp_path):
    module = _module()
    path = tmp_path / "m.ckpt"
    _save(module, path, **{"pytorch-lightning_version": "2.6.6"})
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["state_dict"][next(k for k in checkpoint["state_dict"] if k.endswith("lora_A"))]
    other = _module()
    # the layer's lora_shape says it has experts, so the layout check names the missing tensor before
    # any weight loads (it finds layers by lora_shape too, since a layer with 0 experts has no lora_A)
    with pytest.raises(
        CheckpointLayoutError,
        match=r"layers\.0\.self_attn\.q_proj\.lora_shape says \[\d+, \d+\] but lora_A has shape None",
    ):
        other.on_load_checkpoint(checkpoint)


def test_full_checkpoint_option_keeps_base_weights(tmp_path):
    module = _module(save_base_weights=True)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert "layermoe_adapter_only" not in checkpoint
    assert any("embed_tokens" in k for k in checkpoint["state_dict"])


def test_hyperparameters_are_plain_data():
    module = _module(betas=(0.8, 0.95))
    allowed = (dict, list, str, int, float, bool, type(None))

    def check(value):
        assert isinstance(value, allowed), type(value)
        if isinstance(value, dict):
            for k, v in value.items():
                assert isinstance(k, (str, int))
                check(v)
        elif isinstance(value, list):
            for v in value:
                check(v)

    check(dict(module.hparams))
    assert module.hparams["betas"] == [0.8, 0.95]
    assert module.hparams["adapter"]["experts"] == 2


def test_constructor_errors_name_the_field():
    with pytest.raises(ValueError, match="task"):
        _module(task="regression")
    with pytest.raises(ValueError, match="scheduler"):
        _module(scheduler="step")
    with pytest.raises(ValueError, match="quantization"):
        _module(quantization="3bit")
    with pytest.raises(ValueError, match="needs a model folder"):
        _module(quantization="4bit")
    with pytest.raises(ValueError, match="'type'"):
        _module(model={"hidden_size": 8})
    with pytest.raises(FileNotFoundError, match="config.json"):
        _module(model="/nonexistent/model")
    with pytest.raises(ValueError, match="MoELoRAConfig"):
        _module(adapter={"experts": -1})


def test_quantized_4bit_base_trains_adapters_on_cpu(tmp_path):
    pytest.importorskip("bitsandbytes")
    from layermoe.lightning_modules.model_factory import build_model
    from tests.conftest import tiny_llama_spec as spec

    folder = tmp_path / "tiny"
    build_model(spec()).save_pretrained(folder)
    module = _module(model=str(folder), quantization="4bit").train()
    assert type(module.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    batch = _batch()
    loss = module.per_sample_loss(batch).mean()
    loss.backward()
    grads = [p.grad for _, p in module.trainable_parameters()]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)
    # the 4-bit model stays close to the fp32 one it was quantized from
    reference = _module(model=str(folder)).eval()
    module.eval()
    with torch.no_grad():
        a, b = F.log_softmax(module(batch), -1), F.log_softmax(reference(batch), -1)
    assert float((a - b).abs().mean()) < 0.5


def test_num_classes_must_agree_with_the_data_module(toy_files):
    import lightning.pytorch as pl

    from layermoe.data import TextDataModule

    module = _module(num_classes=3)
    data = TextDataModule(train_file=str(toy_files["train"]), label_words=["no", "yes"], val_size=8)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="num_classes=3 but the data module has 2"):
        trainer.fit(module, data)
