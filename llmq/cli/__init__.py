"""The ``llmq`` command line: one module per subcommand, each only parsing and calling the API."""
