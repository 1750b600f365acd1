"""Surrogate pattern: Crysformer predicts formation energy and band gap with an uncertainty."""
