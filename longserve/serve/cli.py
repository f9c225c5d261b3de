"""`longserve serve`: the OpenAI-compatible server on uvicorn."""

from __future__ import annotations

import argparse

from longserve.cli import add_engine_args, engine_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over the OpenAI API",
        description="An OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions,"
        " /v1/models, /tokenize, /health, /metrics (Prometheus).",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the model name clients send (default: the --model argument)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn's log level",
    )
    add_engine_args(p)
    p.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from longserve.engine.llm import LLMEngine
    from longserve.serve.app import create_app

    engine = LLMEngine(engine_config(args))
    app = create_app(engine, args.served_model_name)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
