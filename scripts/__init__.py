"""Runnable tools beside the library: demo trainers and data, checks, screenshots. Each starts with how to run it."""
