"""`prfaas router --config clusters.yaml`: the PrfaaS global router (OpenAI-compatible)."""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import click


@click.command(name="router")
@click.option("--config", "config", type=click.Path(path_type=Path), required=True, help="router YAML")
@click.option("--host", default="0.0.0.0", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"])
)
def command(config: Path, host: str, port: int, log_level: str) -> None:
    """Serve /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics and /admin/*,
    placing each prefill on the PrfaaS or the local cluster."""
    import uvicorn

    from prfaas_plugin.router.app import create_app
    from prfaas_plugin.router.config import RouterConfigError, load_router_config

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        cfg = load_router_config(config)
        app = create_app(cfg)
    except (RouterConfigError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    freeze_startup_heap()
    # SIGTERM (or Ctrl-C): uvicorn stops accepting at once, lets open requests finish for up to
    # replicas.drain_grace_s, then cancels them (the router closes their upstream requests, so
    # the engines abort them and free their blocks) and runs the lifespan's shutdown.
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_keep_alive=30,
        # uvicorn waits with asyncio.wait_for, which takes fractions of a second; its stub says int
        timeout_graceful_shutdown=cfg.replicas.drain_grace_s,  # type: ignore[arg-type]
    )


def freeze_startup_heap() -> None:
    """Exempt what start-up built (transformers, the tokenizer, FastAPI, pydantic models: a
    few hundred thousand long-lived objects) from the cyclic garbage collector. Without this
    every full collection walks them all and pauses the event loop for far longer than a
    request takes.
    Objects created while serving are collected as usual."""
    gc.collect()
    gc.freeze()
