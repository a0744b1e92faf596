"""Parameter-space matrix representations (one module each)."""

from jaxgeom.pmat.base import PMatAbstract as PMatAbstract
from jaxgeom.pmat.dense import PMatDense as PMatDense

__all__ = ["PMatAbstract", "PMatDense"]
