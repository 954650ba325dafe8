"""The project's versions, in one place (pyproject.toml reads ``__version__`` from here)."""

__version__ = "0.1.0"

#: Version of the statistic definitions written into every manifest.
#: Bump it whenever a definition in ``pipelines.compute.stats`` changes meaning.
STATS_VERSION = "2"
