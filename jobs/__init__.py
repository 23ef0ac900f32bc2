"""Jobs: every heavy stage (training, evaluation, the torch and TensorRT-LLM builds) as a
command plus resources, run on this machine in the background, on Slurm, on Kubernetes or
with DeepSpeed's hostfile launcher behind one seam (``submit``, ``status``, ``logs``,
``cancel``; see ``base``); ``submission`` submits and follows them by id, ``store`` keeps
them in the control database. Templates are data in ``platform/``.

``training``, ``serving`` and ``forgeline`` import this package; it imports none of them
(only ``registry``). Only the recipe section is imported here, so reading a recipe stays light.
"""

from .config import ClusterSpec

__all__ = ["ClusterSpec"]
