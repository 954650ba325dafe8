"""The format of every folder headscope writes, named in its manifest's ``format``.

Kept out of :mod:`pipelines.dataset.manifest`, which imports the model description, so that
the reader (and the views through it) know the formats without importing models.
"""

#: A dataset folder (corpus job, service store): documents, tokens, head_stats, attention...
#: Format 2: every integer column signed (``pipelines.dataset.schema``).
DATASET_FORMAT = "headscope-dataset/2"
#: ``headscope ablate`` output: a head_importance table (2: signed layer and head).
ABLATION_FORMAT = "headscope-ablation/2"
#: ``headscope factors train`` output: a dictionary of transformer factors.
FACTORS_FORMAT = "headscope-factors/1"
#: ``headscope factors apply`` output: factor codes of a corpus (2: signed integer columns).
FACTOR_CODES_FORMAT = "headscope-factor-codes/2"
#: ``headscope compare`` output: how two models' heads differ on the same windows.
COMPARE_FORMAT = "headscope-compare/1"
#: The earlier formats of those folders, whose integer columns were unsigned, each with the
#: format it reads as: the reader casts their columns (``schema.signed_schema``); no job
#: resumes or appends to one.
UNSIGNED_FORMATS = {"headscope-dataset/1": DATASET_FORMAT,
                    "headscope-ablation/1": ABLATION_FORMAT,
                    "headscope-factor-codes/1": FACTOR_CODES_FORMAT}
