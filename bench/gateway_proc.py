"""The forgeline gateway in front of an OpenAI-compatible worker, as its own process.

Wired like ``forgeline serve`` does it (`serving.service.build_gateway`): API keys from the
control database with the default verification cache, the in-process quota limiter,
metrics and the JSON access log on stdout; the model is an
`serving.engine.upstream.UpstreamEngine` (what serves TensorRT-LLM workers on H200s).
With ``--key-file`` a fresh ``user`` key (no quota) is created and its secret written
there, so the load generator authenticates like a customer. ``--workers N`` runs N gateway
processes on the port, as ``forgeline serve --workers N`` does (each builds its app from the
options in ``BENCH_GATEWAY_ARGS``; the bench key has no quota, so the in-process limiter is
exact).

    python -m bench.gateway_proc --upstream http://127.0.0.1:9000 --port 9001 --key-file key.txt [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from bench.procs import REPO

logger = logging.getLogger(__name__)

MODEL = "bench"
ARGS_ENV = "BENCH_GATEWAY_ARGS"


def build_app(
    upstream: str, *, tokenizer: str, key_file: Path | None, max_new_tokens: int, access_log: bool, auth: bool | None = None,
    upstream_api: str = "chat",
) -> object:
    """The gateway app (auth on when ``key_file`` is given, or ``auth``: keys made elsewhere).

    ``upstream_api="chat"`` (the default) relays chat requests whole to the worker's
    ``/v1/chat/completions``, as production does for a chat-capable worker (vLLM,
    trtllm-serve, SGLang); ``completions`` renders the chat template in the gateway and
    calls ``/v1/completions``.
    """
    from registry.keys import KeyStore
    from serving.config import ServeSpec
    from serving.engine.upstream import UpstreamEngine
    from serving.gateway.catalog import ServedModel, StaticCatalog
    from serving.service import configure_access_log, gateway_app

    spec = ServeSpec(engine="upstream", upstream_url=upstream, max_new_tokens=max_new_tokens, auth=key_file is not None)
    engine = UpstreamEngine(
        upstream, "fake", tokenizer=tokenizer, adapter_mode="none", model_id=MODEL, upstream_api=upstream_api  # type: ignore[arg-type]
    )
    served = ServedModel(name=MODEL, version="1", engine=engine, aliases=(f"{MODEL}@production",), chat_relay=engine.chat_relay)
    catalog = StaticCatalog([served])
    keys = None
    if key_file is not None or auth:
        keys = KeyStore()
    if key_file is not None and keys is not None:
        secret, _ = keys.create("bench-load", roles=("user",))
        key_file.write_text(secret)
    if access_log:
        configure_access_log()
    return gateway_app(catalog, spec, keys)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="forgeline gateway over an upstream worker")
    parser.add_argument("--upstream", required=True, help="the worker's base URL (no /v1)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokenizer", default=str(REPO / "assets" / "tiny-base"), help="chat template and token counts")
    parser.add_argument("--key-file", type=Path, default=None, help="create a key and write it here (auth on); omit for auth off")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--quiet", action="store_true", help="no access logs (ours nor uvicorn's): to see what logging costs")
    parser.add_argument("--workers", type=int, default=1, help="gateway processes sharing the port")
    parser.add_argument("--upstream-api", choices=("chat", "completions"), default="chat",
                        help="chat: pass chat requests through whole (production, chat-capable workers); completions: template here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.workers > 1:
        from serving.gateway.server import run_server

        if args.key_file is not None:  # one key for every process, made once
            from registry.keys import KeyStore

            secret, _ = KeyStore().create("bench-load", roles=("user",))
            args.key_file.write_text(secret)
        os.environ[ARGS_ENV] = json.dumps(
            {"upstream": args.upstream, "tokenizer": args.tokenizer, "auth": args.key_file is not None,
             "max_new_tokens": args.max_new_tokens, "access_log": not args.quiet, "upstream_api": args.upstream_api}
        )
        run_server("bench.gateway_proc:app_from_env", args.host, args.port, log_level="warning", workers=args.workers)
        return
    app = build_app(
        args.upstream, tokenizer=args.tokenizer, key_file=args.key_file, max_new_tokens=args.max_new_tokens, access_log=not args.quiet,
        upstream_api=args.upstream_api,
    )
    if args.quiet:
        import uvicorn

        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)  # type: ignore[arg-type]
    else:
        from serving.gateway.server import run_server

        run_server(app, args.host, args.port)  # type: ignore[arg-type]  # exactly as `forgeline serve`


def app_from_env() -> object:
    """uvicorn app factory of each ``--workers`` process."""
    options = json.loads(os.environ[ARGS_ENV])
    return build_app(options.pop("upstream"), key_file=None, **options)


if __name__ == "__main__":
    main()
