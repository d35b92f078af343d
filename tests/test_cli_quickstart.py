"""configs/quickstart.yaml end to end through train.py's CLI, on a tiny random Llama and toy data.

The real config is used as is, with only the model, tokenizer, data files and run length overridden by
a second config, so the test exercises the same adapter, template and checkpoint settings users run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from layermoe.adapters import layout
from layermoe.allocation import allocate
from layermoe.callbacks import LayerInfluenceCallback
from layermoe.callbacks.rewiring import block_dims
from layermoe.cli import main
from layermoe.lightning_modules import MoELoRAFineTuner

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"


def toy_data_override(files: dict[str, Path]) -> dict[str, Any]:
    """The config's ``data`` section for the toy files: the tiny tokenizer, every row, 16 held out."""
    return {
        "tokenizer": "tiny",
        "train_file": str(files["train"]),
        "test_file": str(files["test"]),
        "val_size": 16,
        "limit_train_rows": None,
        "limit_eval_rows": None,
    }


def _override(tmp_path: Path, spec: dict, files: dict[str, Path], max_steps: int = 6) -> Path:
    config = {
        "trainer": {"max_steps": max_steps, "val_check_interval": 3, "enable_progress_bar": False},
        "model": {"model": spec, "warmup_steps": 2},
        "data": toy_data_override(files),
    }
    path = tmp_path / "override.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # the quickstart writes to runs/quickstart relative to the working directory
    monkeypatch.setattr("sys.argv", ["train.py"])  # LightningCLI(args=...) warns about pytest's own argv
    return tmp_path


def test_quickstart_fit_writes_checkpoint_and_prints_layout_and_metrics(
    run_dir, tiny_spec, toy_files, capsys, caplog
):
    override = _override(run_dir, tiny_spec, toy_files)
    cli = main(["fit", "--config", str(QUICKSTART), "--config", str(override)])
    out = capsys.readouterr().out
    assert cli.trainer.global_step == 6
    assert "MoE-LoRA layout at fit start:" in out
    # one table row per block, with the quickstart's 4 experts x rank 4 on 7 projections
    for block in range(tiny_spec["num_hidden_layers"]):
        assert any(line.split()[:4] == [str(block), "4", "4", "7"] for line in out.splitlines())
    assert out.count("val/acc=") == 2  # validation at step 3 and at step 6
    assert "precision auto -> 32-true" in caplog.text or "precision auto -> bf16-mixed" in caplog.text
    ckpt_dir = run_dir / "runs" / "quickstart" / "checkpoints"
    assert (ckpt_dir / "last.ckpt").is_file()
    checkpoint = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 6
    # the quickstart's LayerInfluenceCallback rewired at 30% of the run: the checkpoint holds the layout the
    # rewire chose (the allocator's on the recorded scores and standard errors, shrunk by the default one
    # error), which is the trained model's layout
    rewired = checkpoint["layermoe_layout"]
    assert rewired == layout(cli.model.model)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, LayerInfluenceCallback)]
    (entry,) = callback.history
    assert callback.allocator_options["error_shrinkage"] == 1.0
    chosen = allocate(
        entry["scores"],
        "power_law",
        callback.state.resolved_budget,
        entry["layout_before"],
        block_dims(cli.model),
        score_errors=entry["score_errors"],
        error_shrinkage=1.0,
    )
    assert rewired == entry["layout_after"] == chosen
    assert "LayerInfluenceCallback: rewire 0 at step" in out + caplog.text
    assert checkpoint["hyper_parameters"]["model"] == tiny_spec
    # adapter-only checkpoint: every stored tensor is an adapter tensor
    assert all(k.rsplit(".", 1)[-1].startswith("lora_") for k in checkpoint["state_dict"])
    # the checkpoint's adapters are the trained module's adapters
    trained = {k: v for k, v in cli.model.state_dict().items() if k in checkpoint["state_dict"]}
    assert trained.keys() == checkpoint["state_dict"].keys()
    for key, value in checkpoint["state_dict"].items():
        torch.testing.assert_close(value, trained[key], rtol=0, atol=0)


def test_print_config_lists_resolvable_settings(run_dir, tiny_spec, toy_files, capsys):
    override = _override(run_dir, tiny_spec, toy_files)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(QUICKSTART), "--config", str(override), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["precision"] == "auto"
    assert printed["model"]["model"] == tiny_spec
    assert printed["model"]["adapter"]["experts"] == 4
    assert printed["data"]["label_words"] == ["no", "yes"]


def test_resume_validate_and_test_from_checkpoint(run_dir, tiny_spec, toy_files, capsys):
    override = _override(run_dir, tiny_spec, toy_files, max_steps=3)
    first = main(["fit", "--config", str(QUICKSTART), "--config", str(override)])
    ckpt = run_dir / "runs" / "quickstart" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    assert saved["global_step"] == 3
    capsys.readouterr()

    # fit --ckpt_path continues from step 3 to step 6 with the restored optimizer and scheduler
    resumed = main(
        [
            "fit",
            "--config",
            str(QUICKSTART),
            "--config",
            str(override),
            "--trainer.max_steps",
            "6",
            "--ckpt_path",
            str(ckpt),
        ]
    )
    assert resumed.trainer.global_step == 6
    sched = resumed.trainer.lr_scheduler_configs[0].scheduler
    assert sched.last_epoch == 6  # 3 restored steps + 3 new ones
    assert first.trainer.global_step == 3

    # validate / test reload the checkpoint into a fresh module and report metrics
    final = run_dir / "runs" / "quickstart" / "checkpoints" / "last.ckpt"
    for command, key in (("validate", "val/acc"), ("test", "test/acc")):
        cli = main(
            [command, "--config", str(QUICKSTART), "--config", str(override), "--ckpt_path", str(final)]
        )
        metrics = cli.trainer.callback_metrics
        assert key in metrics and 0.0 <= float(metrics[key]) <= 1.0
        expected = torch.load(final, weights_only=True)["state_dict"]
        current = cli.model.state_dict()
        for name, value in expected.items():
            torch.testing.assert_close(current[name], value, rtol=0, atol=0)


def test_checkpoint_loads_weights_only_into_fresh_module(run_dir, tiny_spec, toy_files):
    override = _override(run_dir, tiny_spec, toy_files, max_steps=3)
    cli = main(["fit", "--config", str(QUICKSTART), "--config", str(override)])
    ckpt = run_dir / "runs" / "quickstart" / "checkpoints" / "last.ckpt"
    restored = MoELoRAFineTuner.load_from_checkpoint(ckpt, weights_only=True)
    assert layout(restored.model) == layout(cli.model.model)
    reference = cli.model.state_dict()
    for name, value in restored.state_dict().items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=0)


@pytest.mark.slow
def test_real_quickstart_trains_smollm2(tmp_path, smollm2_folder):
    """The README's quickstart as is (SmolLM2, sarcasm data, 60 steps): checkpoint, table, better than chance."""
    import subprocess
    import sys
    from collections import Counter

    from layermoe.data import TextDataModule
    from layermoe.paths import quickstart_data_dir

    if not (quickstart_data_dir() / "train.jsonl").is_file():
        pytest.skip("quickstart data missing; run `python -m layermoe.data fetch-quickstart`")
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            "fit",
            "--config",
            str(QUICKSTART),
            "--trainer.enable_progress_bar",
            "false",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "precision auto ->" in result.stderr + result.stdout
    table = [line.split() for line in result.stdout.splitlines()]
    assert sum(1 for row in table if row[:4] in ([str(b), "4", "4", "7"] for b in range(30))) == 30
    accuracies = [
        float(line.split("val/acc=")[1].split(",")[0])
        for line in result.stdout.splitlines()
        if "val/acc=" in line
    ]
    assert len(accuracies) == 2
    # the validation slice's majority-class rate, computed from the same data module settings
    config = yaml.safe_load(QUICKSTART.read_text())["data"]
    dm = TextDataModule(**{**config, "tokenizer": str(smollm2_folder)})
    dm.setup("validate")
    counts = Counter(e["class_label"] for e in dm.datasets["val"].examples)
    majority = max(counts.values()) / sum(counts.values())
    assert accuracies[-1] > majority
    last = torch.load(tmp_path / "runs" / "quickstart" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 60 and len(last["layermoe_layout"]) == 30
