"""tf_psp: Parameterized Structured Pruning (PSP) for Keras 3.

Train one scale `alpha` per structure with weight decay, then physically
remove the structures whose alpha reached zero.
"""

from tf_psp import (
    balance,
    batchnorm,
    bench,
    budget,
    callbacks,
    coupling,
    export,
    handlers,
    latency,
    pipeline,
    plan,
    regularizers,
    sparse_training,
    structures,
)
from tf_psp.balance import balance_alphas
from tf_psp.batchnorm import RecalibrateBatchNorm, fold_batchnorm, recalibrate_batchnorm
from tf_psp.budget import BudgetReport, prune_to_budget
from tf_psp.callbacks import PruneToBudget, PSPMonitor
from tf_psp.convert import parameterize
from tf_psp.group_alphas import PSPGroupAlphas
from tf_psp.latency import LatencyTable, latency_table
from tf_psp.layers import (
    PSPConv1D,
    PSPConv2D,
    PSPConv2DTranspose,
    PSPConv3D,
    PSPDense,
    PSPDepthwiseConv2D,
    PSPSeparableConv2D,
    is_psp_layer,
)
from tf_psp.pipeline import PruneReport, prune
from tf_psp.plan import PruningPlan, Unit, pruning_plan
from tf_psp.profiling import (
    LayerProfile,
    ModelProfile,
    Removability,
    profile,
    removability,
)
from tf_psp.registry import register_layer, unregister_layer
from tf_psp.shrink import strip, strip_and_shrink

__version__ = "0.1.0"

__all__ = [
    "PSPConv1D",
    "PSPConv2D",
    "PSPConv3D",
    "PSPConv2DTranspose",
    "PSPDense",
    "PSPGroupAlphas",
    "PSPDepthwiseConv2D",
    "PSPSeparableConv2D",
    "PSPMonitor",
    "PruneReport",
    "PruneToBudget",
    "PruningPlan",
    "BudgetReport",
    "Unit",
    "LatencyTable",
    "latency",
    "latency_table",
    "budget",
    "pipeline",
    "plan",
    "prune",
    "register_layer",
    "unregister_layer",
    "handlers",
    "prune_to_budget",
    "pruning_plan",
    "sparse_training",
    "RecalibrateBatchNorm",
    "LayerProfile",
    "ModelProfile",
    "Removability",
    "balance",
    "balance_alphas",
    "batchnorm",
    "bench",
    "callbacks",
    "fold_batchnorm",
    "coupling",
    "export",
    "is_psp_layer",
    "parameterize",
    "profile",
    "recalibrate_batchnorm",
    "regularizers",
    "removability",
    "strip",
    "strip_and_shrink",
    "structures",
]
