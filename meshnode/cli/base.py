"""What every `meshnode` subcommand shares: one-line errors, --json, tables, value parsers."""

import getopt
import json

from twisted.python import reflect, usage

from meshnode import records


class CommandError(Exception):
    """A command that could not be carried out; printed as one line, exit status 1."""


class Command(usage.Options):
    """A subcommand that prints: human-readable by default, JSON with --json.

    Options may come after its arguments (`meshnode ping HOST:PORT --count 3`), as with GNU
    tools; twisted's parser alone stops at the first argument.
    """

    optFlags = [["json", None, "print JSON for scripts"]]

    def parseOptions(self, options=None):
        if options is not None:
            try:
                pairs, arguments = getopt.gnu_getopt(options, self.shortOpt, self.longOpt)
            except getopt.GetoptError as e:
                raise usage.UsageError(str(e)) from None
            options = [part for option, value in pairs
                       for part in ((option,) if value == "" and option.lstrip("-") in
                                    self._flag_names() else (option, value))]
            options += ["--"] + arguments
        super().parseOptions(options)

    def _flag_names(self):
        flags = []
        reflect.accumulateClassList(self.__class__, "optFlags", flags)  # subclasses' too
        return {name for flag in flags for name in flag[:2] if name}


class CommandGroup(usage.Options):
    """Subcommands under one word (`meshnode operator domain create …`): one must be named."""

    group = None  # the word, as the error names it

    def postOptions(self):
        if self.subCommand is None:
            raise usage.UsageError(f"{self.group}: name a command ("
                                   + ", ".join(c[0] for c in self.subCommands) + ")")


def print_result(options, data, text):
    print(json.dumps(data, indent=2) if options["json"] else text)


def table(rows, columns):
    """Rows of dicts as aligned text columns, headed by the column names."""
    if not rows:
        return "(none)"
    cells = [[str(column).upper() for column in columns]]
    cells += [["-" if row.get(c) is None else str(row[c]) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
                     for line in cells)


def parse_domain(text):
    try:
        value = int(text, 0)
    except (TypeError, ValueError):
        raise usage.UsageError(f"--domain: {text!r} is not a number") from None
    if not 0 <= value < 2**32:
        raise usage.UsageError(f"--domain: {text!r} is not a 32-bit domain id")
    return value


def parse_name(text):
    if not text or len(text.encode()) > records.NAME_LIMIT:
        raise usage.UsageError(f"name {text!r} must be 1 to {records.NAME_LIMIT} bytes")
    return text


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text):
    """'7d', '12h', '30m' or '90s' → seconds."""
    try:
        value, unit = int(text[:-1]), _UNITS[text[-1]]
    except (ValueError, KeyError, IndexError):
        raise usage.UsageError(f"{text!r} is not a duration like 7d, 12h, 30m or 90s") from None
    if value <= 0:
        raise usage.UsageError(f"{text!r} is not above zero")
    return value * unit
