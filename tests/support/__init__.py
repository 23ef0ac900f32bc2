"""Test helpers shared by every test tree (tiny checkpoints of each model family, ...)."""
