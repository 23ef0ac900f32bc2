"""forgeline: recipe in, governed OpenAI-compatible endpoint out."""

__version__ = "0.1.0"
