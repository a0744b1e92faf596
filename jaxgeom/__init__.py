"""jaxgeom: the geometry of neural networks in JAX.

Fisher information and Gauss-Newton matrices, gradient second moments, Hessians and
neural tangent kernels, stored in the representation that fits the model, with one API
for products, solves, inverses, powers, traces and norms.
"""

from jaxgeom import estimators as estimators
from jaxgeom import optim as optim
from jaxgeom._host_calls import no_host_callbacks as no_host_callbacks
from jaxgeom._progress import progress as progress
from jaxgeom.ewc import ewc_penalty as ewc_penalty
from jaxgeom.fspace import FMatDense as FMatDense
from jaxgeom.fspace import FVector as FVector
from jaxgeom.hessian import Hessian as Hessian
from jaxgeom.layers import Layer as Layer
from jaxgeom.layers import LayerCollection as LayerCollection
from jaxgeom.metrics import FIM as FIM
from jaxgeom.metrics import FIM_MonteCarlo as FIM_MonteCarlo
from jaxgeom.metrics import SecondMoment as SecondMoment
from jaxgeom.pfmap import CrossGramMatrix as CrossGramMatrix
from jaxgeom.pfmap import GramMatrix as GramMatrix
from jaxgeom.pfmap import Jacobian as Jacobian
from jaxgeom.pfmap import PFMapDense as PFMapDense
from jaxgeom.pfmap import PFMapImplicit as PFMapImplicit
from jaxgeom.pmat import PMatAbstract as PMatAbstract
from jaxgeom.pmat import PMatBlockDiag as PMatBlockDiag
from jaxgeom.pmat import PMatDense as PMatDense
from jaxgeom.pmat import PMatDiag as PMatDiag
from jaxgeom.pmat import PMatEKFAC as PMatEKFAC
from jaxgeom.pmat import PMatEKFACBlockDiag as PMatEKFACBlockDiag
from jaxgeom.pmat import PMatEye as PMatEye
from jaxgeom.pmat import PMatImplicit as PMatImplicit
from jaxgeom.pmat import PMatKFAC as PMatKFAC
from jaxgeom.pmat import PMatKFOC as PMatKFOC
from jaxgeom.pmat import PMatLowRank as PMatLowRank
from jaxgeom.pmat import PMatMixed as PMatMixed
from jaxgeom.pmat import PMatQuasiDiag as PMatQuasiDiag
from jaxgeom.solvers import cg as cg
from jaxgeom.solvers import minres as minres
from jaxgeom.solvers import neumann as neumann
from jaxgeom.variants import VARIANTS as VARIANTS
from jaxgeom.vector import PVector as PVector
from jaxgeom.vector import random_pvector as random_pvector

__version__ = "0.1.0"

__all__ = [
    "CrossGramMatrix",
    "FIM",
    "FIM_MonteCarlo",
    "FMatDense",
    "FVector",
    "GramMatrix",
    "Hessian",
    "Jacobian",
    "Layer",
    "LayerCollection",
    "PFMapDense",
    "PFMapImplicit",
    "PMatAbstract",
    "PMatBlockDiag",
    "PMatDense",
    "PMatDiag",
    "PMatEKFAC",
    "PMatEKFACBlockDiag",
    "PMatEye",
    "PMatImplicit",
    "PMatKFAC",
    "PMatKFOC",
    "PMatLowRank",
    "PMatMixed",
    "PMatQuasiDiag",
    "PVector",
    "SecondMoment",
    "VARIANTS",
    "cg",
    "estimators",
    "ewc_penalty",
    "minres",
    "neumann",
    "no_host_callbacks",
    "optim",
    "progress",
    "random_pvector",
]
