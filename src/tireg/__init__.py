"""tireg: parametric image registration in PyTorch, with exact analytic and autograd gradients.

Conventions (see ``docs/conventions.md``): images ``(B, C, H, W)``; points
``(x, y)`` = (column, row) with pixel centres at integers; a transform is a
``3 x 3`` pixel matrix mapping fixed-image points to moving-image points,
``warped(x) = M(A x)``.
"""

from . import analytic, losses, mappings, models, sampling, transforms
from .losses import (
    CauchyLoss,
    CharbonnierLoss,
    GemanMcClureLoss,
    HuberLoss,
    L1Loss,
    L2Loss,
    PerPixelLoss,
)
from .mappings import ExpMapping, IdentityMapping, Mapping, SigmoidMapping
from .models import (
    AffineModel,
    AffineModelAnalytic,
    AnisotropicSimilarityModel,
    AnisotropicSimilarityModelAnalytic,
    FullAffineModel,
    FullAffineModelAnalytic,
    RigidModel,
    RigidModelAnalytic,
    SimilarityModel,
    SimilarityModelAnalytic,
    TransformModel,
    TranslationModel,
    TranslationModelAnalytic,
    create_model,
)
from .sampling import image_gradient, warp
from .transforms import TRANSFORMS, image_center

__version__ = "0.1.0"
