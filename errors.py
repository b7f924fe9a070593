"""The one exception type that users see as a single line instead of a traceback."""

_WORKER_MARKER = f"{__name__}.UserError: "


class UserError(Exception):
    """Bad input or set-up that the user can fix; the message names the file and the fix.

    A DataLoader worker's exception reaches the main process re-raised as the same type, but with the
    worker's whole traceback as its message; only the original message after the marker is kept, so an
    error in a worker still reaches the user as one line.
    """

    def __init__(self, message: str):
        if _WORKER_MARKER in message:
            message = message.rsplit(_WORKER_MARKER, 1)[1].strip()
        super().__init__(message)
