"""forgeline registry: a typed facade over MLflow (runs, versions, lineage, aliases, audit).

This package imports nothing else of forgeline's: training and serving build on it.
"""
