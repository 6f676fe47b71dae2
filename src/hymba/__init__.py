"""Hymba."""
