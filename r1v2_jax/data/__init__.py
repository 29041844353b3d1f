"""Data: image preprocessing and prompt building (InternVL conventions)."""
