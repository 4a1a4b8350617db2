"""Experiment configs: one ``get_config(arg)`` per file (ml_collections), shared builders in ``common``."""
