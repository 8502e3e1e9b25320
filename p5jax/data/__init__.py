"""Data layer: raw readers, filtering, splits, item indexing, TFDS builders.

The on-disk contract between this package and `tasks/` is in `schema.py`.
"""
