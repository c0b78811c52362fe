"""Training helpers: parameter groups, the LR correction, norm recording."""
from ..norms.penalty import penalty
from .groups import param_groups
from .lr_correction import LRCorrection, NormRecorder

__all__ = ["penalty", "param_groups", "LRCorrection", "NormRecorder"]
