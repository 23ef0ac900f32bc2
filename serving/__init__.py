"""forgeline serving: engine builds, engines, and the OpenAI-compatible gateway.

Imports ``registry`` only; never ``training``.
"""
