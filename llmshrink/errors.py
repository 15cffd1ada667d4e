"""Errors that the CLI turns into a one-line message and exit code 2."""

__all__ = ["UsageError"]


class UsageError(ValueError):
    """Bad input from the user: the message says what was wrong and what to do."""
