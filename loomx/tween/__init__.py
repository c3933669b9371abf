"""loomx.tween."""
