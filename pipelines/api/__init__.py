"""The Python front door for notebooks.

- ``analyze(texts, model=..., attention=...)``: every table of a corpus job for texts given in
  Python, computed in this process (:class:`Result`: pandas tables, ``view``, ``to_bertviz``,
  ``save``); the model stays loaded between calls (``Analyzer``, ``cache_info``).
- ``Dataset`` / ``open_dataset``: a dataset folder with its views and ``to_bertviz``.
"""

from pipelines.api.analyzer import (
    Analyzer,
    CacheInfo,
    ModelKey,
    analyze,
    analyzer,
    cache_info,
    clear_cache,
)
from pipelines.api.dataset import Dataset, open_dataset
from pipelines.api.result import Result

__all__ = ["Analyzer", "CacheInfo", "Dataset", "ModelKey", "Result", "analyze", "analyzer",
           "cache_info", "clear_cache", "open_dataset"]
