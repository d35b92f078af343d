"""Issue 23: the callback in projects that are not MoELoRAFineTuner: tuple batches with the project's own
``per_sample_loss``, and a BERT sequence classifier whose head trains next to the adapters.

References: an uninterrupted fit (resumed fits must end with the same trainable tensors), the layout read
back from the model, the head's weights at initialization, and peft's own ``PeftModel`` outputs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from layermoe.adapters import MoELoRAConfig, inject, layout, load_peft, modules_to_save, moe_layers
from layermoe.callbacks.scoring_pass import resolve_per_sample_loss
from layermoe.checkpointing import load_adapters, save_adapters
from layermoe.scoring import sequence_classification_per_sample_loss
from tests.scripts.plugin_projects import (
    BertClassifierProject,
    ClassificationDataset,
    TupleProject,
    fit_project,
    tiny_bert_classifier,
    trainable_state,
)

BERT_REWIRE = {
    "allocator_options": {"rank_policy": "scores", "experts_bounds": [1, 1], "rank_bounds": [1, 8]},
    "scorer": "test_fixed_scores",
    "scorer_options": {"scores": {0: 0.2, 1: 5.0, 2: 1.0}},
}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].shape == b[name].shape, name
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=0), name


def _resume_runs(module_cls: type, tmp_path: Path, options: dict | None = None) -> None:
    """An uninterrupted fit, then fits resumed before and after its rewire end at the same tensors."""
    full, influence = fit_project(module_cls, tmp_path / "full", influence_options=options)
    assert influence.state.rewires_done == 1
    entry = influence.history[0]
    assert entry["layout_after"] != entry["layout_before"] and entry["layout_after"] == layout(full)
    expected = trainable_state(full)
    checkpoints = tmp_path / "full" / "checkpoints"
    saved = torch.load(checkpoints / "step=8.ckpt", weights_only=True)
    assert saved["layermoe_layout"] == layout(full)  # written by the callback for any module
    for step in (2, 6):  # before and after the rewire (after step 4)
        resumed, again = fit_project(
            module_cls,
            tmp_path / f"from{step}",
            ckpt_path=str(checkpoints / f"step={step}.ckpt"),
            influence_options=options,
        )
        assert layout(resumed) == layout(full)
        assert again.state.rewires_done == 1
        _assert_same(trainable_state(resumed), expected)


def test_tuple_batches_with_per_sample_loss_rewire_and_resume_exactly(tmp_path: Path) -> None:
    _resume_runs(TupleProject, tmp_path)


def test_bert_classifier_with_modules_to_save_rewires_resumes_and_exports(tmp_path: Path) -> None:
    from peft import PeftModel

    _resume_runs(BertClassifierProject, tmp_path, BERT_REWIRE)
    module, _ = fit_project(
        BertClassifierProject,
        tmp_path / "again",
        ckpt_path=str(tmp_path / "full" / "checkpoints" / "step=8.ckpt"),
        influence_options=BERT_REWIRE,
    )
    model = module.model.eval()
    ranks = {spec["rank"] for spec in layout(model).values()}
    assert len(ranks) > 1 and {spec["experts"] for spec in layout(model).values()} == {1}
    # the head trained: not its initial weights, and it is what resolve_per_sample_loss scores with
    initial = tiny_bert_classifier().classifier.weight
    assert list(modules_to_save(model)) == ["classifier"]
    assert model.classifier.weight.requires_grad and not torch.equal(model.classifier.weight, initial)
    batch = {
        k: torch.stack([ClassificationDataset(8, 1)[i][k] for i in range(8)])
        for k in ("input_ids", "attention_mask", "labels")
    }
    with torch.no_grad():
        ours = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        scored = resolve_per_sample_loss(module, None)(module, batch)
        assert torch.allclose(scored, sequence_classification_per_sample_loss(model, batch))

    save_adapters(model, tmp_path / "artifact", peft=True)
    peft_model = PeftModel.from_pretrained(tiny_bert_classifier().eval(), str(tmp_path / "artifact" / "peft"))
    peft_model.eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), (ours - theirs).abs().max()

    imported = tiny_bert_classifier().eval()  # and back through our peft importer, head included
    inject(imported, MoELoRAConfig(experts=1, rank=2))
    load_peft(imported, tmp_path / "artifact" / "peft")
    assert layout(imported) == layout(model) and list(modules_to_save(imported)) == ["classifier"]
    with torch.no_grad():
        back = imported(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(ours, back, atol=1e-5, rtol=0)

    fresh = tiny_bert_classifier().eval()
    assert load_adapters(fresh, tmp_path / "artifact") == layout(model)
    assert list(modules_to_save(fresh)) == ["classifier"] and fresh.classifier.weight.requires_grad
    with torch.no_grad():
        reloaded = fresh(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(ours, reloaded, atol=1e-6, rtol=0)
    assert moe_layers(fresh).keys() == moe_layers(model).keys()


def test_modules_to_save_misuse_is_named() -> None:
    with pytest.raises(ValueError, match="'classifer' matches no module"):
        inject(tiny_bert_classifier(), MoELoRAConfig(modules_to_save=["classifer"]))
    with pytest.raises(ValueError, match="overlaps the adapted layer"):
        inject(tiny_bert_classifier(), MoELoRAConfig(modules_to_save=["attention"]))
    with pytest.raises(ValueError, match="list of module names"):
        MoELoRAConfig(modules_to_save="classifier")
    model = tiny_bert_classifier()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError):
        inject(model, MoELoRAConfig(modules_to_save=["classifier", "nothing"]))
    assert not moe_layers(model) and before == {n: p.requires_grad for n, p in model.named_parameters()}


def test_finetuner_checkpoints_carry_modules_to_save(tiny_spec: dict) -> None:
    from layermoe.lightning_modules import MoELoRAFineTuner

    adapter = {"experts": 2, "rank": 2, "modules_to_save": ["lm_head"]}
    module = MoELoRAFineTuner(model=tiny_spec, adapter=adapter, num_classes=2, print_layout=False)
    assert module.model.lm_head.weight.requires_grad
    with torch.no_grad():
        module.model.lm_head.weight.add_(1.0)  # "trained": differs from the rebuilt base
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert "model.lm_head.weight" in checkpoint["state_dict"]
    assert not any("embed_tokens" in k for k in checkpoint["state_dict"])  # the frozen base stays out
    fresh = MoELoRAFineTuner(model=tiny_spec, adapter=adapter, num_classes=2, print_layout=False)
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])
    assert torch.equal(fresh.model.lm_head.weight, module.model.lm_head.weight)
    assert fresh.hparams["adapter"]["modules_to_save"] == ["lm_head"]
