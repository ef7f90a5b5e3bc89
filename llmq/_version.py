"""The installed llmq version, written into every checkpoint (``llmq_version``); kept out of
``llmq/__init__`` so modules inside the package never import the package root for it."""

__version__ = "0.1.0"
