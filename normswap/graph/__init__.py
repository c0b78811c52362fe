"""Tracing models, finding their normalization sites, and rewriting them."""
from .producers import ScaleInvariant, norm_producers, scale_invariant_params

__all__ = ["scale_invariant_params", "norm_producers", "ScaleInvariant"]
