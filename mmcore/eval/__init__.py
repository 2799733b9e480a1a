"""Evaluation suites over registered models and dataset versions."""
