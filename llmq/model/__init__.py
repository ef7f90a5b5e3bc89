"""Finding, loading and rewriting Hugging Face models."""
