"""headscope engine: text → attention → per-head statistics → Parquet."""

from pipelines.version import STATS_VERSION, __version__

__all__ = ["STATS_VERSION", "Dataset", "__version__", "open_dataset"]


def __getattr__(name: str) -> object:
    """``pipelines.Dataset`` and ``pipelines.open_dataset``, imported on first use so that
    ``import pipelines`` stays light (the CLI starts fast)."""
    if name in ("Dataset", "open_dataset"):
        from pipelines import api

        return getattr(api, name)
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
