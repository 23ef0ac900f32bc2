"""A gateway replica in its own process, for the Redis-shared quota test.

Usage: python gateway_process.py ARTIFACT KEYS_URL REDIS_URL
Prints the base URL on one line once it serves; runs until stdin closes or SIGTERM.
"""

from __future__ import annotations

import sys

from registry.keys import KeyStore
from serving.engine.torch_engine import TorchEngine
from serving.gateway.app import ServedModel, StaticCatalog, create_app
from serving.gateway.quota import RedisLimiter
from serving.gateway.server import serve_in_background


def main() -> None:
    artifact, keys_url, redis_url = sys.argv[1:4]
    engine = TorchEngine(artifact, device="cpu", model_id="tiny", num_threads=1)
    app = create_app(
        StaticCatalog([ServedModel(name="tiny", version="1", engine=engine)]),
        max_new_tokens=16,
        keys=KeyStore(keys_url),
        limiter=RedisLimiter(redis_url),
    )
    base_url, stop = serve_in_background(app)
    print(base_url, flush=True)
    sys.stdin.read()  # the test closes stdin to stop us
    stop()


if __name__ == "__main__":
    main()
