"""Observability: metrics through the trainer's logger, a PNG per rewire (also in TensorBoard), console table."""

from __future__ import annotations

import logging

import pytest
from lightning.pytorch import seed_everything
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from layermoe.callbacks import LayerInfluenceCallback
from tests.fixtures import cpu_trainer
from tests.scripts.callback_fixtures import TinyLlamaModule, loaders


def test_rewire_is_logged_plotted_and_printed(tmp_path, caplog) -> None:
    pytest.importorskip("matplotlib")
    tb_reader = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    seed_everything(0)
    module = TinyLlamaModule(experts=2, rank=4)
    cb = LayerInfluenceCallback(
        scorer="test_fixed_scores",
        scorer_options={"scores": {0: 0.5, 1: 0.5, 2: 2.0}},
        schedule={"warmup": 2},
        num_train_samples=4,
        num_val_samples=4,
    )
    tb = TensorBoardLogger(tmp_path, name="tb")
    csv = CSVLogger(tmp_path, name="csv")
    trainer = cpu_trainer([cb], max_steps=3, logger=[tb, csv], limit_val_batches=0)
    with caplog.at_level(logging.INFO):
        trainer.fit(module, *loaders())
    entry = cb.history[0]

    # figure: under the first logger's log_dir, a valid PNG
    png = list((tmp_path / "tb").rglob("layermoe/rewire_00_step2.png"))
    assert len(png) == 1 and png[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # TensorBoard: scalars with the logged values and the figure as an image
    acc = tb_reader.EventAccumulator(tb.log_dir, size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert "layermoe/rewire" in acc.Tags()["images"]
    scalars = acc.Tags()["scalars"]
    for b in (0, 1, 2):
        assert acc.Scalars(f"layermoe/experts/block_{b}")[0].value == entry["layout_after"][b]["experts"]
        assert acc.Scalars(f"layermoe/rank/block_{b}")[0].value == entry["layout_after"][b]["rank"]
        assert (
            acc.Scalars(f"layermoe/experts_before/block_{b}")[0].value == entry["layout_before"][b]["experts"]
        )
        assert acc.Scalars(f"layermoe/score/block_{b}")[0].value == pytest.approx(entry["scores"][b])
    for key in ("params_before", "params_after", "time_scoring_s", "time_rewire_s", "time_surgery_s"):
        assert f"layermoe/{key}" in scalars
    assert acc.Scalars("layermoe/val_loss_after")[0].value == pytest.approx(entry["val_loss_after"], rel=1e-6)
    assert acc.Scalars("layermoe/params_after")[0].step == 2

    # CSV: the same metrics in metrics.csv
    csv_text = (tmp_path / "csv").rglob("metrics.csv").__next__().read_text()
    assert "layermoe/disturbance" in csv_text and "layermoe/rank/block_2" in csv_text

    # console table (rank zero): every block with before -> after
    text = caplog.text
    assert "rewire 0 at step 2" in text
    for b in (0, 1, 2):
        before, after = entry["layout_before"][b], entry["layout_after"][b]
        assert f"{before['experts']}x{before['rank']} -> {after['experts']}x{after['rank']}" in text
