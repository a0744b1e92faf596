"""Parameter-space matrix representations (one module each)."""

from jaxgeom.pmat.base import PMatAbstract as PMatAbstract
from jaxgeom.pmat.blockdiag import PMatBlockDiag as PMatBlockDiag
from jaxgeom.pmat.dense import PMatDense as PMatDense
from jaxgeom.pmat.diag import PMatDiag as PMatDiag
from jaxgeom.pmat.ekfac import PMatEKFAC as PMatEKFAC
from jaxgeom.pmat.ekfac import PMatEKFACBlockDiag as PMatEKFACBlockDiag
from jaxgeom.pmat.eye import PMatEye as PMatEye
from jaxgeom.pmat.implicit import PMatImplicit as PMatImplicit
from jaxgeom.pmat.kfac import PMatKFAC as PMatKFAC
from jaxgeom.pmat.kfoc import PMatKFOC as PMatKFOC
from jaxgeom.pmat.lowrank import PMatLowRank as PMatLowRank
from jaxgeom.pmat.mixed import PMatMixed as PMatMixed
from jaxgeom.pmat.quasidiag import PMatQuasiDiag as PMatQuasiDiag

__all__ = [
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
]
