"""Errors a user can fix. The CLI prints them as one message and exits with status 2."""


class UserError(Exception):
    """Bad input or environment: say what was wrong and how to fix it, no traceback."""


class HubUnreachable(UserError):
    """A hub id was asked for while the hub cannot be reached."""
