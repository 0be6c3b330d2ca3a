"""One exception type for problems the user can fix; the CLI prints its message on one line."""


class UserError(Exception):
    """Bad input or configuration: the message says what is wrong and what to change."""
