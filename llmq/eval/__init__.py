"""Model quality evaluation."""
