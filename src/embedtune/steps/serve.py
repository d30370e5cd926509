"""serve: answer embeddings and rerank requests for a model embedtune wrote, until stopped.

    embedtune serve --model out/merged [--host 127.0.0.1] [--port 8000]
    embedtune serve --model models:/my-embedder@champion --host 0.0.0.0     # from the MLflow registry

Read top to bottom: check the knobs and that the model can be found, build the ASGI app (`embedtune.server`:
it loads the model in the background and answers `/ready` once loaded), run it with uvicorn until SIGTERM or
Ctrl-C (requests in flight are answered first), return what was served. A model that does not load stops the
server with its error (exit status 2), so a pod restarts and says why instead of waiting unready forever.
Routes, request shapes, batching and limits: `embedtune.serving`.
"""

from __future__ import annotations

import os
from pathlib import Path

from embedtune.config import ServeConfig
from embedtune.errors import EmbedtuneError
from embedtune.progress import say


def run(cfg: ServeConfig) -> dict:
    """Serve `cfg.model` on `cfg.host:cfg.port` until stopped; returns the model, address and requests served."""
    check_knobs(cfg)
    from embedtune.server import create_app, serve_until_stopped

    say("serve", f"listening on http://{cfg.host}:{cfg.port}; loading {cfg.model}")
    requests, failure = serve_until_stopped(
        lambda on_failure: create_app(cfg, on_failure), cfg.host, cfg.port
    )
    if failure:
        raise EmbedtuneError(f"model: {failure}")
    return {"model": cfg.model, "host": cfg.host, "port": cfg.port, "requests": requests}


def check_knobs(cfg: ServeConfig) -> None:
    """Refuse what cannot be served before anything is loaded: the key's variable, a missing folder (each
    knob's own range: knobs.py, when cfg was built)."""
    if cfg.api_key_env and not os.environ.get(cfg.api_key_env):
        raise EmbedtuneError(f"api_key_env: the environment variable {cfg.api_key_env} is not set (or empty)")
    if cfg.model.startswith(("/", ".", "~")) and not Path(cfg.model).expanduser().is_dir():
        raise EmbedtuneError(f"model: {cfg.model}: no such folder")
