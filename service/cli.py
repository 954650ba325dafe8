"""``headscope`` with the ``serve`` command added to the engine's commands."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from pipelines import cli as engine_cli

DEFAULT_CONFIG = Path("deploy/serve.yaml")
log = logging.getLogger("headscope.serve")


def _serve(args: argparse.Namespace) -> int:
    from service.config import HttpOptions, ServiceConfig, read_serve_file

    if args.config:
        config, http = read_serve_file(args.config)
    elif DEFAULT_CONFIG.is_file():
        config, http = read_serve_file(DEFAULT_CONFIG)
    else:
        config, http = ServiceConfig(), HttpOptions()
    http = HttpOptions(host=args.host or http.host, port=args.port or http.port)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local cluster of this process

    import ray
    from ray import serve

    from service.app import build

    if args.address:
        ray.init(address=args.address, log_to_driver=args.verbose)
    else:  # a local Ray with a bounded shared-memory object store
        ray.init(include_dashboard=False, log_to_driver=args.verbose,
                 object_store_memory=args.object_store_mb * 1024**2)
    serve.start(http_options={"host": http.host, "port": http.port})
    serve.run(build(config.model_dump()), name="headscope", route_prefix="/")
    url = f"http://{http.host}:{http.port}"
    auth = ' -H "Authorization: Bearer $HEADSCOPE_API_TOKEN"' if config.auth_token() else ""
    print(f"headscope is serving {', '.join(m.name for m in config.models)} at {url}\n"
          f"  try: curl -s {url}/v1/attention{auth} -H 'Content-Type: application/json' "
          "-d '{\"texts\": [\"The cat sat on the mat.\"], \"attention\": \"topk:2\"}'\n"
          f"  API docs: {url}/docs    stop: Ctrl-C", flush=True)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):  # SIGINT explicitly: it may be inherited
        signal.signal(signum, lambda *_: stop.set())  # as ignored (background jobs)
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    print("stopping headscope...", flush=True)
    serve.shutdown()
    ray.shutdown()
    return 0


def parser() -> argparse.ArgumentParser:
    top = engine_cli.parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    serve = sub.add_parser("serve", help="run the HTTP service (Ray Serve)",
                           description="Run the HTTP service on a local Ray (or --address).")
    serve.add_argument("--config", help=f"Serve config file (default {DEFAULT_CONFIG} if present)")
    serve.add_argument("--host", help="override http_options.host")
    serve.add_argument("--port", type=int, help="override http_options.port")
    serve.add_argument("--address", default=None, help="an existing Ray cluster to join")
    serve.add_argument("--object-store-mb", type=int, default=1024,
                       help="object store size of the local Ray (default 1024 MB)")
    serve.set_defaults(func=_serve)
    return top


def main(argv: list[str] | None = None) -> int:
    return engine_cli.main(argv, parser())


if __name__ == "__main__":
    sys.exit(main())
