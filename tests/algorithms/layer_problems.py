"""Synthetic layer problems (helpers, imported by the tests in this folder): a weight and correlated inputs with a few large channels (like LLM activations)."""

import torch


def layer_problem(n: int, k: int, tokens: int = 1024, seed: int = 0):
    """``W [n, k]`` (std 0.05) and ``X [tokens, k]`` with correlated channels, 4 of them 8x larger."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    mix = torch.eye(k) + 0.3 * torch.randn(k, k, generator=g) / k**0.5
    x = torch.randn(tokens, k, generator=g) @ mix
    x[:, :4] *= 8
    return w, x


def output_error(w, x, w_hat, x_hat=None) -> float:
    """``‖W Xᵀ − Ŵ X̂ᵀ‖²`` / tokens."""
    x_hat = x if x_hat is None else x_hat
    return ((x @ w.T - x_hat @ w_hat.T) ** 2).sum().item() / x.shape[0]
