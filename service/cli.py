"""``headscope serve``: the HTTP service on a local Ray (or an existing cluster)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import threading

log = logging.getLogger("headscope.serve")


def serve(args: argparse.Namespace) -> int:
    """Start Ray (or join ``--address``), deploy the app, and serve until SIGINT/SIGTERM."""
    from service.config import HttpOptions, ServiceConfig, read_serve_file

    if args.config:
        config, http = read_serve_file(args.config)
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
