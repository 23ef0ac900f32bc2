"""forgeline post-training: data, TRL trainers with PEFT, tracking, launchers.

Imports ``registry`` only; never ``serving``.
"""
