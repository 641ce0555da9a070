"""kvstore: an async key-value HTTP service for JSON values, backed by Redis."""

__version__ = "0.1.0"
