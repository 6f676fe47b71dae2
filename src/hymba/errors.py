"""The one exception type users see as a single line (the CLI prints it and exits non-zero)."""


class HymbaError(ValueError):
    """Bad input: a message that says what is wrong and how to fix it."""
