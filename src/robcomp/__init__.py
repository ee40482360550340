"""robcomp: how much robustness does compression cost, and which method keeps the most?

Compress (prune, distill, quantize), train robustly, attack, shift the data, measure cost, and
report, from one experiment file. See the README for a tour.
"""

__version__ = "0.1.0"
