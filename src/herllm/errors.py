"""The one exception type for user mistakes: the CLI prints its message as one line, exit 2."""


class UserError(ValueError):
    """Something the user can fix; the message says what, where, and how."""
