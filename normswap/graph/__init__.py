"""Tracing models, finding their normalization sites, and rewriting them."""
