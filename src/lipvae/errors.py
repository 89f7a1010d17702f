"""Errors a user can fix, reported as one line by the entry points."""


class UserError(Exception):
    """Bad input: the message names the field, the value and what is accepted."""


def unwritable(e: BaseException, where: str = "") -> UserError | None:
    """The one-line error for an OSError that says a folder cannot be written to (read-only file
    system, no permission); None for any other error. ``where``: what to do instead."""
    import errno

    if not isinstance(e, OSError) or e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
        return None
    return UserError(f"cannot write to {e.filename or 'the folder'} ({e.strerror}); make it writable"
                     f"{' or ' + where if where else ''}")
