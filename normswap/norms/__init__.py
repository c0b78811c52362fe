"""The normalizers normswap converts models into (formulas in each class docstring).

Every standardizing normalizer is one :class:`AreaNorm` configured by three typed
choices, an :class:`Area` (batch, layer, channels, group, instance), an
:class:`Operation` (l2 with sigma, l1, topk, mean) and a :class:`Recovery`; the named
classes below are thin configurations of it. IterNorm is the whitening operation on
the batch area; DivisiveNorm the local-window area.
"""
from .areas import AREAS, Area, BatchArea, ChannelsArea, GroupArea, InstanceArea, LayerArea
from .base import NORMSWAP_LEAF_MODULES, NormalizerBase, register_normalizer
from .batch import (BatchNormStar1d, BatchNormStar2d, BatchNormStar3d, BatchStatNorm,
                    L1BatchNorm1d, L1BatchNorm2d, L1BatchNorm3d, MeanOnlyBatchNorm1d,
                    MeanOnlyBatchNorm2d, MeanOnlyBatchNorm3d, TopKBatchNorm1d, TopKBatchNorm2d,
                    TopKBatchNorm3d, convert_sync)
from .bwn import (BoundedWeightNorm, bounded_weight_norm, is_bounded_weight_norm,
                  remove_bounded_weight_norm)
from .core import (AFFINE, BIAS_ONLY, NO_RECOVERY, SCALE_ONLY, STAT_BUFFERS, AreaNorm, Operation,
                   Recovery, supports_sync)
from .divisive import DivisiveNorm1d, DivisiveNorm2d
from .functional import C_L1, batch_stat_norm, c_inf, stat_norm
from .group import GroupNormStar, L1GroupNorm, TopKGroupNorm
from .instance import (InstanceNormStar1d, InstanceNormStar2d, InstanceNormStar3d, L1InstanceNorm1d,
                       L1InstanceNorm2d, L1InstanceNorm3d, TopKInstanceNorm1d, TopKInstanceNorm2d,
                       TopKInstanceNorm3d)
from .layer import (L1LayerNorm, L1LayerNorm2d, LayerNormStar, LayerNormStar2d, TopKLayerNorm,
                    TopKLayerNorm2d)
from .penalty import penalty
from .whitening import IterNorm1d, IterNorm2d, IterNorm3d, Whitening

__all__ = [
    "NormalizerBase", "BatchStatNorm", "AreaNorm", "register_normalizer", "NORMSWAP_LEAF_MODULES",
    "Area", "BatchArea", "LayerArea", "ChannelsArea", "GroupArea", "InstanceArea", "AREAS",
    "Operation", "Recovery", "AFFINE", "BIAS_ONLY", "SCALE_ONLY", "NO_RECOVERY", "STAT_BUFFERS",
    "Whitening", "supports_sync",
    "L1BatchNorm1d", "L1BatchNorm2d", "L1BatchNorm3d",
    "TopKBatchNorm1d", "TopKBatchNorm2d", "TopKBatchNorm3d",
    "BatchNormStar1d", "BatchNormStar2d", "BatchNormStar3d",
    "MeanOnlyBatchNorm1d", "MeanOnlyBatchNorm2d", "MeanOnlyBatchNorm3d",
    "LayerNormStar", "LayerNormStar2d", "L1LayerNorm", "L1LayerNorm2d", "TopKLayerNorm", "TopKLayerNorm2d",
    "GroupNormStar", "L1GroupNorm", "TopKGroupNorm",
    "InstanceNormStar1d", "InstanceNormStar2d", "InstanceNormStar3d",
    "L1InstanceNorm1d", "L1InstanceNorm2d", "L1InstanceNorm3d",
    "TopKInstanceNorm1d", "TopKInstanceNorm2d", "TopKInstanceNorm3d",
    "IterNorm1d", "IterNorm2d", "IterNorm3d",
    "DivisiveNorm1d", "DivisiveNorm2d",
    "BoundedWeightNorm", "bounded_weight_norm", "remove_bounded_weight_norm", "is_bounded_weight_norm",
    "convert_sync", "penalty", "batch_stat_norm", "stat_norm", "c_inf", "C_L1",
]
