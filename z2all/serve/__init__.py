"""Serving: the continuous-batching engine (engine.py), the OpenAI-compatible server with its chat page
(api.py, static/), and the terminal chat (chat.py)."""
