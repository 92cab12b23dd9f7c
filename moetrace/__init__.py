"""The ``moetrace`` command (`moetrace.cli`): one entry point for the capture service, the
service's clients, the analyzer, routing stores and specimen models."""
