"""Datasets (DataBundle loaders) and models (the registry, width multipliers, user models)."""
