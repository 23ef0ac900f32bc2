"""Engine builds: turn a registered model version into an artifact an engine can serve."""
