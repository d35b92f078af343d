"""Built-in scorers (importing this package registers them) and the registry."""

from .base import SCORERS, Scorer, get_scorer, register_scorer
from .baselines import GradNormScorer, UniformScorer
from .controls import InverseScorer, PatternScorer, PlaceboScorer, RandomScorer
from .influence import (
    AGGREGATIONS,
    CurvatureGainScorer,
    FisherInfluenceScorer,
    LayerIFScorer,
    aggregate_influence,
    block_damping,
    datainf_influences,
    fisher_influences,
)
from .spectral import AlphaHillScorer, hill_alpha_xmin_peak

__all__ = [
    "AGGREGATIONS",
    "SCORERS",
    "AlphaHillScorer",
    "CurvatureGainScorer",
    "FisherInfluenceScorer",
    "GradNormScorer",
    "InverseScorer",
    "LayerIFScorer",
    "PatternScorer",
    "PlaceboScorer",
    "RandomScorer",
    "Scorer",
    "UniformScorer",
    "aggregate_influence",
    "block_damping",
    "datainf_influences",
    "fisher_influences",
    "get_scorer",
    "hill_alpha_xmin_peak",
    "register_scorer",
]
