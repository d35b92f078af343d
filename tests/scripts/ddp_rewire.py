"""Standalone DDP rewire job (2 CPU processes, gloo), run by tests/test_callback_ddp.py in a subprocess.

Usage: python tests/scripts/ddp_rewire.py OUT_DIR [planted|zero|grow|fade] [scoring|probe|gradients|rotation
raise|skip].
Lightning's DDP launcher re-executes this script for rank 1; each rank writes OUT_DIR/rank{r}.pt with its
layout, adapter weights, callback history and failures, the optimizer coverage it saw and the error the
fit raised (or None), and prints "RANK r OK" at the end. ``zero``: two rewires that empty block 0 and then
give it adapters back (issue 22). ``grow``: growth mode, two rounds with gradient init (issue 34).
``scoring``/``probe``/``gradients``: the scoring loss raises on rank 1 only, during the scoring pass, the
probe loss before the rewire or (growth) the weight gradients of ``init="gradient"``, with the given
``on_error``. ``fade``: a rank move with ``rank_fade_steps`` (the shrinking blocks' factors rotated into
their singular basis); ``rotation``: that rotation fails on rank 1 only.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from lightning.pytorch import Callback, seed_everything  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from layermoe.adapters import layout  # noqa: E402
from layermoe.callbacks import LayerInfluenceCallback, RewireError  # noqa: E402
from layermoe.callbacks import growing as growing_module  # noqa: E402
from layermoe.callbacks import rewiring as rewiring_module  # noqa: E402
from layermoe.callbacks.growing import Growing  # noqa: E402
from layermoe.scoring import causal_lm_per_sample_loss  # noqa: E402
from tests.fixtures import cpu_trainer, quiet_influence  # noqa: E402
from tests.scripts.callback_fixtures import TinyLlamaModule, loaders, plant_grad_norm_winner  # noqa: E402


class WrapperCheck(Callback):
    """Right after the rewire: the DDP wrapper is a new one around the resized module."""

    def __init__(self, cb: LayerInfluenceCallback) -> None:
        self.cb, self.ok = cb, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if self.cb.history and self.ok is None:
            wrapper = trainer.strategy.model
            self.ok = (
                isinstance(wrapper, DistributedDataParallel)
                and wrapper.module is pl_module
                and {id(p) for p in wrapper.parameters()} == {id(p) for p in pl_module.parameters()}
            )


class PlantedLoss:
    """The per-sample loss the callback scores with; raises on rank 1 only while ``armed``."""

    def __init__(self) -> None:
        self.armed = False

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.armed and dist.get_rank() == 1:
            raise ValueError("planted loss failure on rank 1")
        return causal_lm_per_sample_loss(model, batch)


def arm_during(loss: PlantedLoss, owner: type, name: str) -> None:
    """``owner.name`` runs with ``loss`` armed."""
    original = getattr(owner, name)

    def armed(*args, **kwargs):  # type: ignore[no-untyped-def]
        loss.armed = True
        try:
            return original(*args, **kwargs)
        finally:
            loss.armed = False

    setattr(owner, name, armed)


def plant_failure(stage: str) -> PlantedLoss:
    """A loss that fails on rank 1 during the scoring pass, the probe loss before the rewire or the weight
    gradients of a growth round."""
    loss = PlantedLoss()
    if stage == "scoring":
        arm_during(loss, rewiring_module.Rewiring, "score")
    elif stage == "gradients":
        arm_during(loss, Growing, "_gradients")
    else:
        # the probe then runs a forward of its own instead of reusing the scoring forward's losses
        rewiring_module.probe_forward_is_scoring_forward = lambda model: False
        arm_during(loss, rewiring_module.Rewiring, "_loss_before")
    return loss


def fail_rotation_on_rank_1() -> None:
    """``fade_rotations`` (the rewire's, looked up at call time) raises on rank 1 only."""
    original = rewiring_module.fade_rotations

    def failing(*args, **kwargs):  # type: ignore[no-untyped-def]
        if dist.is_initialized() and dist.get_rank() == 1:
            raise torch.linalg.LinAlgError("planted SVD failure on rank 1")
        return original(*args, **kwargs)

    rewiring_module.fade_rotations = failing


def record_gradients() -> dict[str, list]:
    """Each growth round's weight gradients as this rank computed them ("local") and as the round used
    them ("used": after the sum over ranks)."""
    seen: dict[str, list] = {"local": [], "used": []}
    local, used = growing_module.weight_gradients, Growing._gradients

    def local_(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = local(*args, **kwargs)
        seen["local"].append({k: v.detach().clone() for k, v in out.items()})
        return out

    def used_(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = used(*args, **kwargs)
        seen["used"].append({k: v.detach().clone() for k, v in out.items()})
        return out

    growing_module.weight_gradients, Growing._gradients = local_, used_
    return seen


def main(out_dir: Path, mode: str = "planted", fail: str | None = None, on_error: str = "raise") -> None:
    torch.set_num_threads(1)
    seed_everything(0)
    module = TinyLlamaModule(experts=2, rank=4, lr=0.05, optimizer="sgd")
    plant_grad_norm_winner(module, keep_block=1)
    start_layout = layout(module)
    train, val = loaders(batch_size=4)
    failing = {} if fail in (None, "rotation") else {"loss_fn": plant_failure(fail), "on_error": on_error}
    if fail == "rotation":
        fail_rotation_on_rank_1()
    cb = quiet_influence("grad_norm", schedule={"warmup": 2}, **failing)
    if mode == "zero":  # block 0 loses its adapters at step 2 and gets them back at step 4
        cb = quiet_influence(
            "test_empty_toggle",
            allocator_options={"experts_bounds": {0: (0, None)}},
            schedule={"warmup": 2, "every": 2, "max_rewires": 2},
        )
    if mode == "grow":  # rounds after steps 2 and 4; new experts split gates by the mass shared over ranks
        cb = quiet_influence(
            "grad_norm",
            growth={"rounds": 2, "init": "gradient"},
            schedule={"warmup": 2, "every": 2},
            **failing,
        )
    if mode == "fade":  # experts fixed, ranks move by the planted scores; the shrink fades over 2 steps
        cb = quiet_influence(
            "test_fixed_scores",
            scorer_options={"scores": {0: 1.0, 1: 5.0, 2: 1.0}},
            allocator_options={"rank_policy": "scores", "experts_bounds": [2, 2], "error_shrinkage": 0},
            rank_fade_steps=2,
            schedule={"warmup": 2},
        )
    gradients = record_gradients() if mode == "grow" else None
    check = WrapperCheck(cb)
    trainer = cpu_trainer(
        [cb, check],
        devices=2,
        strategy="ddp",
        max_steps=6,
        limit_val_batches=0,
        default_root_dir=str(out_dir),
    )
    error = None
    try:
        trainer.fit(module, train, val)
    except RewireError as exc:  # on_error="raise": every rank must stop here, none left waiting
        error = f"{type(exc).__name__}: {exc}"
    listed = [p for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]]
    trainable = [p for p in module.parameters() if p.requires_grad]
    rank = trainer.global_rank
    torch.save(
        {
            "start_layout": start_layout,
            "layout": layout(module),
            "weights": {k: v.detach().clone() for k, v in module.named_parameters() if "lora_" in k},
            "history": cb.history,
            "failures": cb.state.failures,
            "error": error,
            "growth_start_layout": None if cb.growing is None else cb.state.growth["plan"]["initial"],
            "optimizer_matches_trainable": {id(p) for p in listed} == {id(p) for p in trainable}
            and len(listed) == len(trainable),
            "wrapped_module_is_resized": bool(check.ok),
            "gradients": gradients,
        },
        out_dir / f"rank{rank}.pt",
    )
    print(f"RANK {rank} OK", flush=True)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:5])
