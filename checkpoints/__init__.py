"""Shipped model checkpoints: one folder per model, with weights and a model card."""
