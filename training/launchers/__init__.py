"""Launchers: run a training job on this machine in the background, on Slurm, on Kubernetes,
or with DeepSpeed's hostfile launcher, behind one seam (``submit``, ``status``, ``logs``,
``cancel``; see ``base``). Every launcher starts the same entry point,
``python -m training.entry JOB.json``; ``jobs`` submits and follows them by id.

Only the recipe section is imported here, so reading a recipe stays light.
"""

from .config import ClusterSpec

__all__ = ["ClusterSpec"]
