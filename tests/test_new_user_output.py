"""What a new user sees: the task loss on the progress bar with the router terms beside it, one bar over
the fit with its remaining time (lines off a terminal), the CSV and the console naming the same step,
and none of the dependencies' known harmless messages."""

from __future__ import annotations

import csv
import logging
import re
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from layermoe.data import TextDataModule
from layermoe.lightning_modules import MoELoRAFineTuner
from layermoe.lightning_modules.progress_bar import FitProgressBar
from layermoe.quiet import (
    BNB_CPU_LOGGER,
    BNB_KERNEL_MESSAGE,
    LIGHTNING_RANK_ZERO_LOGGERS,
    LIGHTNING_TIP_PREFIX,
)
from tests.conftest import tiny_llama_spec
from tests.fixtures import quiet_trainer
from tests.test_cli_quickstart import toy_data_override

REPO = Path(__file__).resolve().parents[1]


def _module(**kwargs) -> MoELoRAFineTuner:
    adapter = {"experts": 3, "rank": 2, "router_aux_loss_coef": 0.5, "router_z_loss_coef": 0.1}
    return MoELoRAFineTuner(
        model=tiny_llama_spec(), adapter=adapter, num_classes=2, print_layout=False, **kwargs
    )


def _data(toy_files) -> TextDataModule:
    return TextDataModule(
        train_file=str(toy_files["train"]),
        tokenizer="tiny",
        label_words=["no", "yes"],
        val_size=16,
        batch_size=8,
    )


def test_train_loss_is_the_task_loss_and_the_router_terms_are_shown_beside_it(toy_files, monkeypatch):
    from layermoe.adapters import collect_router_losses

    module = _module().train()
    dm = _data(toy_files)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    logged: dict[str, tuple[torch.Tensor, dict]] = {}
    monkeypatch.setattr(module, "log", lambda name, value, **k: logged.__setitem__(name, (value, k)))
    monkeypatch.setattr(
        module, "log_dict", lambda values, **k: logged.update({n: (v, k) for n, v in values.items()})
    )
    optimized = module.training_step(batch, 0)
    # an independent recomputation: the task loss of a second forward, and its router terms
    task = module.per_sample_loss(batch).mean()
    module._task_losses(batch)
    router = collect_router_losses(module.model)
    assert float(router.aux_loss) > 0 and float(router.z_loss) > 0
    torch.testing.assert_close(logged["train/loss"][0], task.detach())
    torch.testing.assert_close(logged["train/router_aux"][0], router.aux_loss)
    torch.testing.assert_close(logged["train/router_z"][0], router.z_loss)
    # the router terms reach the bar through FitProgressBar (no per-step host copy): see line_fit below
    assert logged["train/loss"][1]["prog_bar"]
    assert not any(logged[name][1]["prog_bar"] for name in ("train/router_aux", "train/router_z"))
    # what the optimizer minimizes is still the task loss plus the router terms
    torch.testing.assert_close(optimized, task + router.loss)


@pytest.fixture
def line_fit(toy_files, tmp_path, capsys):
    """A 6-step fit validating every 3 steps, its progress bar writing a line at every redraw."""
    module, dm = _module(), _data(toy_files)
    trainer = L.Trainer(
        max_steps=6,
        val_check_interval=3,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        enable_model_summary=False,
        callbacks=[
            FitProgressBar(interval=0),
            ModelCheckpoint(
                dirpath=tmp_path / "steps", filename="{step}", every_n_train_steps=1, save_top_k=-1
            ),
        ],
        logger=CSVLogger(tmp_path, name="logs"),
        default_root_dir=tmp_path,
    )
    trainer.fit(module, dm)
    return trainer, capsys.readouterr().out


def test_progress_lines_count_the_fit_in_steps_with_its_remaining_time(line_fit):
    trainer, out = line_fit
    lines = [line for line in out.splitlines() if line.startswith("Epoch")]
    assert lines, out
    assert not any("\r" in line for line in out.splitlines())  # whole lines, no redraws
    assert all(line.startswith("Epoch 0:") for line in lines)  # no Lightning "Epoch 0/-2"
    # one bar over the fit's 6 optimizer steps: counted 1..6 of 6, with elapsed<remaining
    counts = [int(re.search(r"\| *(\d+)/6 \[", line).group(1)) for line in lines]
    assert counts == sorted(counts) and counts[-1] == 6
    assert all("<" in line.split("[")[1] for line in lines)
    assert any("train/router_aux" in line and "train/loss" in line for line in lines)


def test_epoch_description_names_the_last_epoch_only_when_max_epochs_is_set():
    class Stub:
        current_epoch = 1
        max_epochs = 3

    assert FitProgressBar.epoch_description(Stub()) == "Epoch 1/2"
    Stub.max_epochs = -1  # what Lightning sets for a run bounded by max_steps only
    assert FitProgressBar.epoch_description(Stub()) == "Epoch 1"


def test_validation_is_logged_at_the_step_the_console_prints(line_fit):
    trainer, out = line_fit
    printed = [
        int(line.split("]")[0].removeprefix("[step "))
        for line in out.splitlines()
        if line.startswith("[step ")
    ]
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    logged = [int(row["step"]) for row in rows if row.get("val/acc")]
    assert printed == logged == [3, 6]
    # the logged step does not outlive its validation: checkpoints after it are named by their own step
    names = sorted(path.name for path in (Path(trainer.default_root_dir) / "steps").glob("*.ckpt"))
    assert names == sorted(f"step={k}.ckpt" for k in range(1, 7))


KNOWN_NOISE = (
    "LeafSpec",
    "litlogger",
    "litmodels",
    "not supported by the model summary",
    "kernels-community",
)


def test_a_cli_fit_prints_none_of_the_known_harmless_messages(toy_files, tmp_path):
    # bf16-mixed brings the model-summary warning; the loaders bring Lightning's LeafSpec use
    override = {
        "trainer": {
            "max_steps": 2,
            "val_check_interval": 2,
            "precision": "bf16-mixed",
            "enable_progress_bar": False,
        },
        "model": {"model": tiny_llama_spec(), "warmup_steps": 1},
        "data": toy_data_override(toy_files),
    }
    config = tmp_path / "override.yaml"
    config.write_text(yaml.safe_dump(override))
    command = [
        sys.executable,
        str(REPO / "train.py"),
        "fit",
        "--config",
        str(REPO / "configs" / "quickstart.yaml"),
    ]
    result = subprocess.run(
        [*command, "--config", str(config)], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "val/acc=" in output  # the run did validate
    assert [noise for noise in KNOWN_NOISE if noise in output] == []


def test_the_filters_drop_only_the_known_messages(caplog):
    import layermoe  # noqa: F401  (installs the import-time filters)
    from layermoe.quiet import silence_trainer_noise

    silence_trainer_noise()
    caplog.set_level(logging.INFO)
    bnb = logging.getLogger(BNB_CPU_LOGGER)
    bnb.propagate = True
    # bitsandbytes' own call (backends/cpu/ops.py), which only CPUs with AVX512-BF16 reach at import
    bnb.warning(BNB_KERNEL_MESSAGE + ": %s. Please make sure you already `pip install kernels`", "offline")
    bnb.warning("another bitsandbytes warning")
    for name in LIGHTNING_RANK_ZERO_LOGGERS:
        logging.getLogger(name).info(LIGHTNING_TIP_PREFIX + " logging, try installing [litlogger]")
        logging.getLogger(name).info("GPU available: False")
    assert "kernels-community" not in caplog.text and "Tip" not in caplog.text
    assert "another bitsandbytes warning" in caplog.text and caplog.text.count("GPU available") == 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        import layermoe.quiet as quiet

        quiet.silence_import_noise()
        quiet.silence_trainer_noise()
        _summarize_under_bf16_mixed()  # Lightning's own warning, from its model_summary module
        # the same words from anywhere else are not Lightning's summary: they stay
        warnings.warn(
            "Precision bf16-mixed is not supported by the model summary.", UserWarning, stacklevel=1
        )
        warnings.warn("an unrelated user warning", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == [
        "Precision bf16-mixed is not supported by the model summary.",
        "an unrelated user warning",
    ]


def _summarize_under_bf16_mixed() -> None:
    from lightning.pytorch.utilities.model_summary.model_summary import ModelSummary

    module = L.LightningModule()
    module.layer = torch.nn.Linear(2, 2)
    module._trainer = quiet_trainer(precision="bf16-mixed", accelerator="cpu", enable_checkpointing=False)
    ModelSummary(module)


def test_line_progress_is_silent_for_short_phases_and_writes_whole_lines_for_long_ones(monkeypatch):
    import io

    from layermoe import progress

    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    quick = io.StringIO()
    with progress.progress_bar(file=quick, total=3, desc="scoring", interval=20, mininterval=0) as bar:
        for _ in range(3):
            clock[0] += 1
            bar.update(1)
    assert quick.getvalue() == ""  # 3 s: shorter than one interval
    slow = io.StringIO()
    with progress.progress_bar(file=slow, total=3, desc="scoring", interval=20, mininterval=0) as bar:
        for _ in range(3):
            clock[0] += 15
            bar.update(1)
    lines = slow.getvalue().splitlines(keepends=True)
    # one line at 30 s (the first redraw past 20 s), none at 45 s (15 s later), the final state at close
    assert [line.split("|")[-1].split("[")[0].strip() for line in lines] == ["2/3", "3/3"]
    assert all(line.startswith("scoring:") and line.endswith("\n") and "\r" not in line for line in lines)


def test_heartbeat_prints_while_a_silent_call_runs():
    import io
    import time

    from layermoe.progress import heartbeat

    out = io.StringIO()
    with heartbeat("prepare smollm2", interval=0.05, file=out):
        time.sleep(0.3)
    lines = out.getvalue().splitlines()
    assert len(lines) >= 3 and all(line.startswith("prepare smollm2: still running (") for line in lines)


class ReadmeModule(L.LightningModule):
    """The README's plug-in example: the model comes in as an object, so it is not a hyperparameter."""

    def __init__(self, hf_model, train_set=None, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["hf_model", "train_set"])
        self.model, self.train_set = hf_model, train_set
        from layermoe.adapters import MoELoRAConfig, inject

        inject(self.model, MoELoRAConfig(experts=2, rank=4))

    def training_step(self, batch, batch_idx):
        from layermoe.adapters import collect_router_losses

        input_ids, labels = batch
        return self.model(input_ids=input_ids, labels=labels).loss + collect_router_losses(self.model).loss

    def train_dataloader(self):
        from layermoe.checkpointing import resumable_train_loader

        return resumable_train_loader(self.train_set, batch_size=4, seed=0)

    def configure_optimizers(self):
        params = [p for _, p in sorted(self.named_parameters()) if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.lr)


def test_the_readme_module_reloads_with_load_from_checkpoint_given_its_model(tmp_path):
    from torch.utils.data import TensorDataset

    from tests.tiny_models import random_tokens, tiny_llama

    ids = random_tokens()
    module = ReadmeModule(tiny_llama(), TensorDataset(ids, ids.clone()), lr=5e-2)
    trainer = quiet_trainer(max_steps=3, default_root_dir=tmp_path)
    trainer.fit(module)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    restored = ReadmeModule.load_from_checkpoint(path, hf_model=tiny_llama())
    assert restored.hparams.lr == 5e-2  # saved hyperparameters come back; the objects are passed again
    with torch.no_grad():
        expected = module.model.eval()(ids).logits
        assert not torch.allclose(tiny_llama()(ids).logits, expected)  # training moved the adapters
        torch.testing.assert_close(restored.model.eval()(ids).logits, expected)


@pytest.mark.parametrize(
    ("limit", "expected"), [(10, "on 10 of 24 rows (data.limit_eval_rows: 10;"), (None, "on all 24 rows")]
)
def test_test_setup_says_how_many_rows_it_evaluates(toy_files, caplog, limit, expected):
    dm = TextDataModule(
        train_file=str(toy_files["train"]),
        test_file=str(toy_files["test"]),  # 24 rows
        tokenizer="tiny",
        label_words=["no", "yes"],
        limit_eval_rows=limit,
    )
    caplog.set_level(logging.INFO)
    dm.setup("test")
    assert len(dm.datasets["test"]) == (limit or 24)
    assert f"data: test {expected}" in caplog.text
