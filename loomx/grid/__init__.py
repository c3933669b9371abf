"""The grid network and its executors."""

from .network import Network

__all__ = ["Network"]
