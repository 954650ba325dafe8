"""headscope engine: text → attention → per-head statistics → Parquet."""

__version__ = "0.1.0"

#: Version of the statistic definitions written into every manifest.
#: Bump it whenever a definition in ``pipelines.compute.stats`` changes meaning.
STATS_VERSION = "1"
