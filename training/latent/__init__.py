"""Latent tools that need training-side machinery: edit directions and inversion."""
