"""Analyses of attention maps beyond the per-head statistics."""
