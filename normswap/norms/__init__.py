"""The normalizers normswap converts models into (formulas in each class docstring)."""
from .base import NORMSWAP_LEAF_MODULES, NormalizerBase, register_normalizer
from .batch import (BatchNormStar1d, BatchNormStar2d, BatchNormStar3d, BatchStatNorm,
                    L1BatchNorm1d, L1BatchNorm2d, L1BatchNorm3d, MeanOnlyBatchNorm1d,
                    MeanOnlyBatchNorm2d, MeanOnlyBatchNorm3d, TopKBatchNorm1d, TopKBatchNorm2d,
                    TopKBatchNorm3d, convert_sync)
from .bwn import (BoundedWeightNorm, bounded_weight_norm, is_bounded_weight_norm,
                  remove_bounded_weight_norm)
from .divisive import DivisiveNorm1d, DivisiveNorm2d
from .functional import C_L1, batch_stat_norm, c_inf
from .layer import LayerNormStar, LayerNormStar2d
from .penalty import penalty

__all__ = [
    "NormalizerBase", "BatchStatNorm", "register_normalizer", "NORMSWAP_LEAF_MODULES",
    "L1BatchNorm1d", "L1BatchNorm2d", "L1BatchNorm3d",
    "TopKBatchNorm1d", "TopKBatchNorm2d", "TopKBatchNorm3d",
    "BatchNormStar1d", "BatchNormStar2d", "BatchNormStar3d",
    "MeanOnlyBatchNorm1d", "MeanOnlyBatchNorm2d", "MeanOnlyBatchNorm3d",
    "LayerNormStar", "LayerNormStar2d", "DivisiveNorm1d", "DivisiveNorm2d",
    "BoundedWeightNorm", "bounded_weight_norm", "remove_bounded_weight_norm", "is_bounded_weight_norm",
    "convert_sync", "penalty", "batch_stat_norm", "c_inf", "C_L1",
]
