"""The training entry point every launcher runs: ``python -m training.entry JOB.json``.

The job file is a ``TrainJob`` written as JSON. ``torchrun`` starts one of these per
process (locally, or on each node under Slurm or Kubernetes); each runs ``run_job``, and
rank 0 writes ``result.json`` into the job's output folder for the launcher to read.
Exit status: 0 done, 2 invalid job or data, 1 any other forgeline error. Launchers decide
a job's outcome by that result file: once it names a registered version, a late non-zero
exit of some process does not make the job fail.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from registry.errors import ConfigError, ForgelineError

from .distributed import is_main_process, rank, teardown
from .job import TrainJob, run_job

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    """Run the job in ``argv[0]``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m training.entry", description=__doc__.splitlines()[0])
    parser.add_argument("job", type=Path, help="TrainJob JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if is_main_process() else logging.WARNING,
        format=f"[rank {rank()}] %(levelname)s %(name)s: %(message)s",
    )
    try:
        job = TrainJob.model_validate_json(args.job.read_text())
        run_job(job)
        teardown()  # only after success: after a failure the other ranks may never reach the barrier
    except (ConfigError, ForgelineError) as err:
        log.error("%s", err)
        return 2 if err.code == "invalid_config" else 1
    except (OSError, ValueError) as err:  # unreadable file, or JSON that is not a TrainJob
        log.error("cannot read job file %s: %s", args.job, err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
