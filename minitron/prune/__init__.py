"""Structured pruning: importance, selection of what to keep, slicing, export."""
