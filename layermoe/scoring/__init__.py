"""Per-block scoring engine: gradient capture to Gram statistics, and scorers (pure torch).

stats = capture_statistics(model, train_batches, val_batches, loss_fn)
scores = get_scorer("layerif").score(stats)          # {block: float}, higher = more capacity
scores = get_scorer("alpha_hill").score(model)       # model-only scorers take the model
"""

from .api import score_blocks
from .batches import batch_size, map_tensors, slice_batch
from .capture import SCOPES, capture_per_sample_gradients, capture_plan, capture_statistics
from .distributed import gather_rows, torch_distributed_gather
from .errors import ScoringError
from .losses import (
    UnsupportedBatchError,
    causal_lm_per_sample_loss,
    default_per_sample_loss,
    masked_lm_per_sample_loss,
    sequence_classification_per_sample_loss,
)
from .modules import base_weight, scored_layers
from .plan import (
    BlockPlan,
    CapturePlan,
    adapter_block_dim,
    base_block_dim,
    plan_capture,
    projection_error_bound,
    training_store_bytes,
)
from .projection import CountSketch
from .reference import layerif_loop_influence_matrix, layerif_loop_influences
from .scorers import (
    AGGREGATIONS,
    SCORERS,
    AlphaHillScorer,
    CurvatureGainScorer,
    FisherInfluenceScorer,
    GradNormScorer,
    LayerIFScorer,
    Scorer,
    UniformScorer,
    aggregate_influence,
    datainf_influences,
    fisher_influences,
    get_scorer,
    hill_alpha_xmin_peak,
    register_scorer,
)
from .statistics import (
    BlockStatistics,
    statistics_from_pieces,
    statistics_from_rows,
    statistics_with_exact_mean,
)
from .uncertainty import jackknife_errors

__all__ = [
    "AGGREGATIONS",
    "SCOPES",
    "SCORERS",
    "AlphaHillScorer",
    "BlockPlan",
    "CapturePlan",
    "BlockStatistics",
    "CountSketch",
    "CurvatureGainScorer",
    "FisherInfluenceScorer",
    "GradNormScorer",
    "LayerIFScorer",
    "Scorer",
    "ScoringError",
    "UniformScorer",
    "adapter_block_dim",
    "UnsupportedBatchError",
    "aggregate_influence",
    "base_block_dim",
    "base_weight",
    "batch_size",
    "capture_per_sample_gradients",
    "capture_plan",
    "capture_statistics",
    "causal_lm_per_sample_loss",
    "datainf_influences",
    "default_per_sample_loss",
    "fisher_influences",
    "gather_rows",
    "jackknife_errors",
    "get_scorer",
    "hill_alpha_xmin_peak",
    "layerif_loop_influence_matrix",
    "layerif_loop_influences",
    "plan_capture",
    "projection_error_bound",
    "map_tensors",
    "masked_lm_per_sample_loss",
    "register_scorer",
    "score_blocks",
    "scored_layers",
    "sequence_classification_per_sample_loss",
    "slice_batch",
    "statistics_from_pieces",
    "statistics_from_rows",
    "statistics_with_exact_mean",
    "torch_distributed_gather",
    "training_store_bytes",
]
