"""Mixture-of-experts support: which fused-expert classes are known, and how their experts are quantized."""
