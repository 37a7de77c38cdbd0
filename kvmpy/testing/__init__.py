"""Helpers the selftests share: backend selection, capability requirements, errno tables."""
