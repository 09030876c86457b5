"""Turning rows into pixels: the grouped path, continuous batching, feature reuse, batch sizes."""
