"""Runestone: an OpenAI-compatible LLM API gateway on Trio."""

__version__ = "0.1.0"
