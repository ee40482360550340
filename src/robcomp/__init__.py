"""robcomp: how much robustness does compression cost, and which method keeps the most?

Compress (prune, distill, quantize), train robustly, attack, shift the data, measure cost, and
report, from one experiment file. See the README for a tour.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from robcomp.api import compress_model, evaluate_model

__version__ = "0.1.0"
__all__ = ["__version__", "compress_model", "evaluate_model"]


def __getattr__(name: str) -> Any:
    """``robcomp.evaluate_model`` and ``robcomp.compress_model`` (see :mod:`robcomp.api`),
    imported on first use so that ``import robcomp`` (and the CLI's start) stays light. The
    compressor is ``compress_model``: ``robcomp.compress`` is the package of compressors."""
    if name in ("evaluate_model", "compress_model"):
        from robcomp import api

        return getattr(api, name)
    raise AttributeError(f"module 'robcomp' has no attribute {name!r}")
