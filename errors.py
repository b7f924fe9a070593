"""The one exception type that users see as a single line instead of a traceback."""


class UserError(Exception):
    """Bad input or set-up that the user can fix; the message names the file and the fix."""
