"""loomx.io."""
