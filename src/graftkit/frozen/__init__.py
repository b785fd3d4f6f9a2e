"""The frozen part of the base: cut off, run once per image by a fast engine, cached on disk."""
