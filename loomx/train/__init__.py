"""loomx.train."""
