"""Errors a user can fix, reported as one line by the entry points."""


class UserError(Exception):
    """Bad input: the message names the field, the value and what is accepted."""
