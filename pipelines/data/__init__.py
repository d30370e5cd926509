"""Bundled datasets of the presets and the scripts that generate them."""
