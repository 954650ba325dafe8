"""headscope online front: Ray Serve deployments over the ``pipelines`` engine (see issue 3)."""
