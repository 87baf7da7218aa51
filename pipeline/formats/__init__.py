"""Readers of other people's files (BOLD5000, the authors' published results): paths in, arrays
out; no study configuration."""
