"""`causal-dit serve`: live text-to-video in the browser, one WebSocket per session.

config.py (ServerConfig), protocol.py (the messages), outbox.py (a session's bounded frame queue),
worker.py (the generation thread and the shared pipelines), session.py (sessions and their limit),
app.py (the FastAPI app, `create_app`, and `serve`), static/ (the page)."""

from causal_dit_jax.app.serve.app import create_app, serve, uvicorn_config
from causal_dit_jax.app.serve.config import ServerConfig

__all__ = ["ServerConfig", "create_app", "serve", "uvicorn_config"]
