"""Quantization algorithms: tensors in, codes/scales out."""
