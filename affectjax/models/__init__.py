"""Backbones, heads and device-side preprocessing."""
