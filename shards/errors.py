"""Errors a user can cause: the CLI prints their message as one line, without a traceback."""


class UserError(Exception):
    pass
