"""Runnable studies and examples built on stagewise's modules."""
