"""Compression (registry). ``compressor(model, data) -> (new_model, Record)``."""

from robcomp.compress.base import COMPRESSORS, Compressor, Record
from robcomp.compress.efficiency import Efficiency, count_macs, count_nonzero, count_params, measure
from robcomp.compress.prune import MagnitudePruning, NoCompression, finalize

__all__ = [
    "COMPRESSORS",
    "Compressor",
    "Efficiency",
    "MagnitudePruning",
    "NoCompression",
    "Record",
    "count_macs",
    "count_nonzero",
    "count_params",
    "finalize",
    "measure",
]
