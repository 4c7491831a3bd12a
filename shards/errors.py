"""Errors a user can cause: the CLI prints their message as one line, without a traceback."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pydantic is imported by the readers that validate, not by every command
    from pydantic import ValidationError


class UserError(Exception):
    pass


class UserStop(BaseException):
    """A stop the user (or their scheduler) asked for, said as one line as a UserError is; a BaseException
    (as KeyboardInterrupt is) so that no `except Exception` on its way, a retry loop or a sample's error
    handling, takes it for a fault to retry or to skip."""


# a URL's user-info (user:password@), up to the last @ before its path: a password with a raw @ in it too
URL_USER_INFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s]*@")


def without_credentials(text: str) -> str:
    """`text` with the user-info of every URL in it replaced by `***`: what a run prints or writes (its
    config copies, errors, logs) never holds a password given in a URL (docs/shards.md, "Remote shards")."""
    return URL_USER_INFO.sub(r"\g<scheme>***@", text)


CLASS_NAME = re.compile(r" or instance of \w+")  # pydantic's "a valid dictionary or instance of ShardRecord"


def shown(part: Any) -> str:
    """A key or value from a user's file, safe in a one-line message: a plain name as it is, anything else
    (newlines, megabytes) quoted and cut short."""
    text = str(part)
    return text if re.fullmatch(r"[\w.-]{1,80}", text) else repr(text[:80])


def describe_error(item: dict) -> str:
    """One of pydantic's findings as `where: what (got VALUE)`."""
    where = ".".join(shown(part) for part in item["loc"])
    if item["type"] == "missing":
        what = "missing"
    elif item["type"] == "value_error":
        what = str(item["ctx"]["error"])
    else:
        given = item.get("input")
        got = "" if isinstance(given, dict | list) else f" (got {repr(given)[:80]})"
        what = f"{CLASS_NAME.sub('', item['msg'])[:200]}{got}"
    return f"{where}: {what}" if where else what


def describe_errors(error: ValidationError, limit: int = 3) -> str:
    """pydantic's findings in a file a user gave, as one line."""
    lines = [describe_error(item) for item in error.errors()[:limit]]
    more = error.error_count() - limit
    return "; ".join(lines) + (f"; and {more} more" if more > 0 else "")


def parse_json(data: bytes, where: object, what: str, error: type[UserError]) -> Any:
    """The JSON in a file a user gave (bytes read from `where`); anything unreadable is
    error("WHERE: not a valid WHAT: why")."""
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as failure:
        raise error(f"{where}: not a valid {what}: not UTF-8 (byte {failure.start})") from None
    except (ValueError, RecursionError) as failure:  # JSONDecodeError, an integer of 5000 digits, deep nesting
        raise error(f"{where}: not a valid {what}: not JSON ({str(failure)[:200]})") from None


def check_structure(model: type, value: Any, where: object, what: str, error: type[UserError]) -> Any:
    """`value` validated by the pydantic `model` (the validated model is returned); its findings are one
    line, error("WHERE: not a valid WHAT: where in it: what is wrong")."""
    from pydantic import ValidationError

    try:
        return model.model_validate(value)
    except ValidationError as failure:
        raise error(f"{where}: not a valid {what}: {describe_errors(failure)}") from None
