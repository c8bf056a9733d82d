"""Attention: the metadata contract, the backends and their selection."""
from attention.backend import AttentionBackend
from attention.metadata import AttentionMetadata
from attention.selector import available_backends, get_attn_backend

__all__ = ["AttentionBackend", "AttentionMetadata", "available_backends", "get_attn_backend"]
