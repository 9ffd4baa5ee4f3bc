"""Flower federated training across hospital sites (reuses medseg's training step)."""
