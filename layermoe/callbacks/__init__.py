"""Lightning callbacks of layermoe: ``LayerInfluenceCallback`` rewires MoE-LoRA capacity during fit."""

from layermoe.callbacks.errors import CallbackConfigError, RewireError
from layermoe.callbacks.growth_options import GrowthOptions
from layermoe.callbacks.layer_influence import LayerInfluenceCallback
from layermoe.callbacks.loading import load_adapted_checkpoint
from layermoe.callbacks.schedule import RewireSchedule

__all__ = [
    "CallbackConfigError",
    "GrowthOptions",
    "LayerInfluenceCallback",
    "RewireError",
    "RewireSchedule",
    "load_adapted_checkpoint",
]
