"""The error a bad setting of a run raises, and the notes a run prints (shared by training and evaluation)."""

from __future__ import annotations

import sys

__all__ = ["ConfigError", "NO_VALUE", "print_notes"]

NO_VALUE = object()  # a ConfigError about a setting whose value is not worth repeating (e.g. --resume)


def _show(value) -> str:
    """A value as the user would type it: strings bare, unless empty, with spaces, or looking like a
    number or a boolean (then quoted, so that ``'5'`` reads as the string it is)."""
    if isinstance(value, str):
        try:
            float(value)
            numeric = True
        except ValueError:
            numeric = False
        plain = value and not any(c.isspace() for c in value) and not numeric and value.lower() not in (
            "true", "false", "null", "none")
        return value if plain else repr(value)
    return repr(value)


class ConfigError(ValueError):
    """A bad setting of a run: the setting (a :class:`~softmask.train.config.TrainConfig` field or a command's flag), the value and what
    was expected. ``str(e)`` is ``"<field> = <value>: <message>"``; the command line names the flag (or
    the config file key) instead of the field (:meth:`render`)."""

    def __init__(self, field: str, value, message: str):
        self.field, self.value, self.message = field, value, message
        super().__init__(self.render(field))

    def render(self, where: str, *, flag: bool = False) -> str:
        """The one-line message with ``where`` naming the setting: ``--batch-size 1: ...`` for a flag
        (``flag``), ``where = value: ...`` otherwise."""
        if self.value is NO_VALUE:
            return f"{where}: {self.message}"
        return f"{where} {_show(self.value)}: {self.message}" if flag else f"{where} = {_show(self.value)}: {self.message}"


def print_notes(notes, prog: str = "softmask-pretrain") -> None:
    for line in notes:
        print(f"{prog}: {line}", file=sys.stderr)
