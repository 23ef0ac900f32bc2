"""A resolved training job to launch (nothing here trains it)."""

from tests.support.train_jobs import train_job  # noqa: F401 - a fixture, found by pytest through this import
