"""loomx.models."""
