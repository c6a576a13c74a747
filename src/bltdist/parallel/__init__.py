"""Parallel dimensions, one module each, applied to the plain model from outside."""
