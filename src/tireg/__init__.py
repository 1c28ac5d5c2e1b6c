"""tireg: parametric image registration in PyTorch, with exact analytic and autograd gradients.

Conventions (see ``docs/design.md``): images ``(B, C, H, W)``; points
``(x, y)`` = (column, row) with pixel centres at integers; a transform is a
``3 x 3`` pixel matrix mapping fixed-image points to moving-image points,
``warped(x) = M(A x)``.
"""

from . import analytic, initialize, losses, mappings, models, sampling, transform_io, transforms
from .register import STOP_REASONS, IterationState, Pyramid, RegistrationResult, register
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

__all__ = [
    "register",
    "RegistrationResult",
    "IterationState",
    "STOP_REASONS",
    "Pyramid",
    "warp",
    "image_gradient",
    "image_center",
    "TRANSFORMS",
    "create_model",
    "AffineModel",
    "AffineModelAnalytic",
    "TransformModel",
    "TranslationModel",
    "TranslationModelAnalytic",
    "RigidModel",
    "RigidModelAnalytic",
    "SimilarityModel",
    "SimilarityModelAnalytic",
    "AnisotropicSimilarityModel",
    "AnisotropicSimilarityModelAnalytic",
    "FullAffineModel",
    "FullAffineModelAnalytic",
    "PerPixelLoss",
    "L2Loss",
    "CauchyLoss",
    "L1Loss",
    "CharbonnierLoss",
    "HuberLoss",
    "GemanMcClureLoss",
    "Mapping",
    "IdentityMapping",
    "SigmoidMapping",
    "ExpMapping",
    "analytic",
    "initialize",
    "losses",
    "mappings",
    "models",
    "sampling",
    "transforms",
    "transform_io",
]
