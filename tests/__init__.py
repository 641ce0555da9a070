"""The kvstore test suite."""
