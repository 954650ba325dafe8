"""Analyses over attention maps beyond per-head statistics: pattern classes, head similarity."""
