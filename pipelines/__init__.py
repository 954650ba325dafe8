"""headscope engine: text → attention → per-head statistics → Parquet."""

__version__ = "0.1.0"

#: Version of the statistic definitions written into every manifest.
#: Bump it whenever a definition in ``pipelines.compute.stats`` changes meaning.
STATS_VERSION = "1"


def __getattr__(name: str) -> object:
    """``pipelines.Dataset`` and ``pipelines.open_dataset``, imported on first use so that
    ``import pipelines`` stays light (the CLI starts fast)."""
    if name in ("Dataset", "open_dataset"):
        from pipelines import api

        return getattr(api, name)
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
