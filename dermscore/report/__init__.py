"""Report writers: they format results and never recompute a score."""
