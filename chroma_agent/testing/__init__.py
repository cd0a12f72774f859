"""Helpers for checking chroma-agent against the original implementation."""
