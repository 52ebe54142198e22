"""tf_psp: Parameterized Structured Pruning (PSP) for Keras 3.

Train one scale `alpha` per structure with weight decay, then physically
remove the structures whose alpha reached zero.
"""

from tf_psp import batchnorm, callbacks, regularizers, structures
from tf_psp.batchnorm import RecalibrateBatchNorm, recalibrate_batchnorm
from tf_psp.callbacks import PSPMonitor
from tf_psp.convert import parameterize
from tf_psp.layers import (
    PSPConv1D,
    PSPConv2D,
    PSPConv3D,
    PSPDense,
    PSPDepthwiseConv2D,
    PSPSeparableConv2D,
    is_psp_layer,
)
from tf_psp.profile import LayerProfile, ModelProfile, profile
from tf_psp.shrink import strip, strip_and_shrink

__version__ = "0.1.0"

__all__ = [
    "PSPConv1D",
    "PSPConv2D",
    "PSPConv3D",
    "PSPDense",
    "PSPDepthwiseConv2D",
    "PSPSeparableConv2D",
    "PSPMonitor",
    "RecalibrateBatchNorm",
    "LayerProfile",
    "ModelProfile",
    "batchnorm",
    "callbacks",
    "is_psp_layer",
    "parameterize",
    "profile",
    "recalibrate_batchnorm",
    "regularizers",
    "strip",
    "strip_and_shrink",
    "structures",
]
