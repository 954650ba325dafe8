"""Transformer factors: one dictionary learned over the hidden states of several layers.

After Yun et al. (2021), "Transformer visualization via dictionary learning": every token
vector x of a chosen layer is explained as a sparse, non-negative combination of the atoms of
one dictionary Φ shared by all those layers, x ≈ αΦ with α ≥ 0.

- :mod:`pipelines.factors.solver`: FISTA for the codes and online dictionary updates (torch).
- :mod:`pipelines.factors.hidden`: hidden states of chosen layers, streamed as token rows.
- :mod:`pipelines.factors.train`: ``headscope factors train``.
- :mod:`pipelines.factors.apply`: ``headscope factors apply`` (codes, top contexts, profiles).
"""
