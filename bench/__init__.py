"""forgeline benchmarks: each figure is a ratio against a baseline measured in the same run.

Run the suite with ``make bench`` (``python -m bench``); ``python -m bench --help`` lists
the options. Results go to ``bench/results/*.json`` (git-ignored); the report is
``BENCHMARKS.md`` with plots in ``bench/plots/``.
"""
