"""Compression (registry). ``compressor(model, data) -> (new_model, Record)``."""

from robcomp.compress import admm, distill, hydra, proximal  # noqa: F401  (register compressors)
from robcomp.compress.base import COMPRESSORS, Compressor, Record, uses_training_data
from robcomp.compress.efficiency import Efficiency, count_macs, count_nonzero, count_params, measure
from robcomp.compress.latency import LatencyResult, latency, peak_memory_bytes
from robcomp.compress.prune import MagnitudePruning, NoCompression, finalize
from robcomp.compress.quantize import BinaryWeights, Int8PTQ, LowBit, QuantizedModel, twin_agreement
from robcomp.compress.structured import L1FilterPruning, plot_sensitivity, sensitivity_analysis
from robcomp.compress.unstructured import GradualPruning, RandomPruning

__all__ = [
    "COMPRESSORS",
    "BinaryWeights",
    "Compressor",
    "Efficiency",
    "GradualPruning",
    "Int8PTQ",
    "L1FilterPruning",
    "LatencyResult",
    "LowBit",
    "MagnitudePruning",
    "NoCompression",
    "QuantizedModel",
    "RandomPruning",
    "Record",
    "count_macs",
    "count_nonzero",
    "count_params",
    "finalize",
    "latency",
    "measure",
    "peak_memory_bytes",
    "plot_sensitivity",
    "sensitivity_analysis",
    "twin_agreement",
    "uses_training_data",
]
