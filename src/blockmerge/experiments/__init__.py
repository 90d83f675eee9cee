"""Experiments: sweeps over blocks (scale / bypass / swap), their metrics and the U-shaped report.

Submodules are imported where used so that running a sweep does not pull in the evaluation's
dependencies (scikit-image) and vice versa.
"""
