"""Errors a user can act on. The CLI prints them as one line and exits with code 2."""


class LLMPruneError(ValueError):
    """Bad input or an unsupported situation, with a message that says what to do."""
