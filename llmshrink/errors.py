"""Errors that the CLI turns into a one-line message: bad input (exit code 2) and interrupts (130)."""

__all__ = ["UsageError", "Interrupted"]


class UsageError(ValueError):
    """Bad input from the user: the message says what was wrong and what to do."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C in a command that keeps resumable state: the message says what was kept and how to
    resume or discard it (a plain KeyboardInterrupt means nothing was written)."""
