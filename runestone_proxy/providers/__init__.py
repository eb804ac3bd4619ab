"""Runestone: an OpenAI-compatible LLM API gateway on Trio."""
