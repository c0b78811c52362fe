"""normswap: swap the normalizations of an existing PyTorch model for the variants of
Ren et al. 2017 (BN*, LN*, DN*), Hoffer et al. 2018 (L1 / top-k batch norm, bounded
weight norm) and train the result."""
__version__ = "0.1.0"

from . import norms
from .norms import convert_sync, penalty
from .report import Report, SiteRecord
from .spec import Spec, SpecError, presets
from .variants import Built, Preset, Variant, register_preset, register_variant
from .graph.sites import register_site_type
from .transform import TransformError, plan, report, transform
from .train import LRCorrection, NormRecorder, param_groups
from .graph.producers import scale_invariant_params
from .io import CheckpointError, export, load, save

__all__ = ["norms", "penalty", "convert_sync", "transform", "plan", "report", "presets",
           "Spec", "SpecError", "TransformError", "Variant", "Preset", "Built", "register_variant",
           "register_preset", "register_site_type", "Report", "SiteRecord", "LRCorrection",
           "NormRecorder", "param_groups", "scale_invariant_params", "save", "load", "export",
           "CheckpointError", "__version__"]
