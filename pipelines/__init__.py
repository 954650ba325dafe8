"""headscope engine: text → attention → per-head statistics → Parquet."""

from pipelines.version import STATS_VERSION, __version__

#: The notebook API (``pipelines.api``), imported on first use.
API = ("Analyzer", "Dataset", "Result", "analyze", "cache_info", "clear_cache", "open_dataset")

__all__ = ["STATS_VERSION", "__version__", *API]


def __getattr__(name: str) -> object:
    """``pipelines.analyze``, ``pipelines.Dataset``, ... (``API``), imported on first use so
    that ``import pipelines`` stays light (the CLI starts fast)."""
    if name in API:
        from pipelines import api

        return getattr(api, name)
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
