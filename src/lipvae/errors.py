"""Errors a user can fix, reported as one line by the entry points, and the stops (signals, a
full disk) every entry point handles the same way."""

import contextlib
import errno
import signal
import sys

#: the errors of a write that ran out of room: a full disk, a quota, a file-size limit
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class UserError(Exception):
    """Bad input: the message names the field, the value and what is accepted."""


def unwritable(e: BaseException, where: str = "") -> UserError | None:
    """The one-line error for an OSError that says a folder cannot be written to (read-only file
    system, no permission); None for any other error. ``where``: what to do instead."""
    if not isinstance(e, OSError) or e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
        return None
    return UserError(f"cannot write to {e.filename or 'the folder'} ({e.strerror}); make it writable"
                     f"{' or ' + where if where else ''}")


def command(run, where: str) -> int:
    """A command's exit status: ``run()``'s, or 2 after one ``error:`` line on stderr
    when it raised a ``UserError`` or could not write to a folder (``where``: what to do instead,
    as ``unwritable`` takes it); any other error is left to propagate."""
    try:
        return run()
    except UserError as e:
        error = e
    except OSError as e:
        if (error := unwritable(e, where)) is None:
            raise
    print(f"error: {error}", file=sys.stderr)
    return 2


@contextlib.contextmanager
def signals_stop(received: dict | None = None, defer=None):
    """SIGINT and SIGTERM raise ``KeyboardInterrupt(<signal name>)`` inside the block (also where
    the process was started with SIGINT ignored, a script's ``&``), so that it stops cleanly;
    the caller's handlers are back afterwards. ``received["received"]`` is set to the signal's
    number; ``defer(name)`` True leaves the stop to the code that asked (training stops between
    two steps, ``lipvae.lightning.callbacks.StopBetweenSteps``)."""
    def on_signal(signum, frame) -> None:
        if received is not None:
            received["received"] = signum
        name = signal.Signals(signum).name
        if defer is not None and defer(name):
            return
        raise KeyboardInterrupt(name)

    before = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
