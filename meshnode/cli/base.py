"""What every `meshnode` command shares: help as git and kubectl print it, one-line errors,
--json, tables, value parsers."""

import getopt
import json
import re
import textwrap

from twisted.python import reflect, usage

from meshnode import __version__, records
from meshnode.cli.show import WIDTH

PROGRAM = "meshnode"
GLOBAL_SYNOPSIS = "[--config FILE] [--state-dir DIR] [--database URL]"
GLOBAL_OPTIONS = "--config, --state-dir, --database"


class CommandError(Exception):
    """A command that could not be carried out; printed as one line, exit status 1."""


class ShowText(Exception):
    """--help or --version was asked for: print the text and exit 0, doing nothing else."""


def command_path(options):
    """The words naming the command `options` parses: "operator device add" ("" at the top)."""
    words = []
    while options.parent is not None:
        words.append(options.parent.subCommand)
        options = options.parent
    return " ".join(reversed(words))


class Described(usage.Options):
    """Options whose --help reads as git's and kubectl's do: a usage line naming the program
    and the whole command, one sentence on what it does, its commands or options, examples.

    A class says `synopsis` (what follows the command in the usage line; an option's value
    is named there once, in capitals: `--domain NAME`), `longdesc` (the sentence) and
    `examples` (pairs of what it shows and the command line).
    """

    synopsis = ""
    longdesc = ""
    examples = ()

    def opt_help(self):
        """show this help"""
        raise ShowText(self.help_text())

    opt_h = opt_help

    def opt_version(self):
        """show meshnode's version"""
        raise ShowText(f"{PROGRAM} {__version__}")

    def unknown_command(self, word):
        """The UsageError for a command word that is none of ours, with the list."""
        names = ", ".join(c[0] for c in self.subCommands)
        return usage.UsageError(f"unknown command {word!r}; the commands are: {names}")

    def parseOptions(self, options=None):
        if getattr(self, "subCommands", None) and options is not None:
            try:
                _, arguments = getopt.getopt(options, self.shortOpt, self.longOpt)
            except getopt.GetoptError:
                arguments = []  # twisted's parser names the bad option
            if arguments and arguments[0] not in {c[0] for c in self.subCommands}:
                raise self.unknown_command(arguments[0])
        super().parseOptions(options)

    def help_text(self):
        path = command_path(self)
        usage_line = " ".join(part for part in ("Usage:", PROGRAM, path, self.synopsis) if part)
        lines = textwrap.wrap(usage_line, WIDTH, subsequent_indent="         ",
                              break_on_hyphens=False) + [""]
        if self.longdesc:
            lines += textwrap.wrap(self.longdesc, WIDTH) + [""]
        if getattr(self, "subCommands", None):
            lines += ["Commands:", *_columns([(c[0], c[3]) for c in self.subCommands]), ""]
        lines += ["Options:", *_columns(self._described_options()), ""]
        if self.examples:
            lines.append("Examples:")
            for what, command in self.examples:
                lines += ["  # " + what, *_command_lines(command)]
            lines.append("")
        if getattr(self, "subCommands", None):
            lines.append(f"Run '{' '.join(filter(None, (PROGRAM, path)))} COMMAND --help' "
                         "for a command's options and examples.")
        if self.parent is not None:
            lines += textwrap.wrap(f"Global options ({GLOBAL_OPTIONS}) come before the "
                                   f"command; see '{PROGRAM} --help'.", WIDTH)
        return "\n".join(lines).rstrip()

    def _described_options(self):
        """(spelling, what it does) of each option, in the order the synopsis names them."""
        shorts = {long: short for short, long in self.synonyms.items()
                  if len(short) == 1 and short != long}
        found = []
        for spelled in self.longOpt:
            name = spelled.rstrip("=")
            if name == "version" and self.parent is not None:
                continue
            flag = "-" + shorts[name] + ", " if name in shorts else ""
            value = ""
            if spelled.endswith("="):
                named = re.search(rf"--{re.escape(name)}[ =]([A-Z][A-Z0-9_-]*)", self.synopsis)
                value = " " + (named.group(1) if named else name.upper().replace("-", "_"))
            doc = " ".join((self.docs.get(name) or "").split())
            default = self.defaults.get(name) if spelled.endswith("=") else None
            if default is not None and "default" not in doc:
                doc += f" (default: {default})"
            place = self.synopsis.find(f"--{name}")
            rank = (2 if name in ("help", "version") else 0 if place >= 0 else 1, place)
            found.append((rank, f"{flag}--{name}{value}", doc))
        return [(spelling, doc) for _, spelling, doc in sorted(found, key=lambda f: f[0])]


def _columns(pairs, indent=2, gap=2, limit=26):
    """Aligned `name  text` lines, the text wrapped; a name too long puts its text below."""
    width = min(max((len(name) for name, _ in pairs), default=0), limit)
    column = indent + width + gap
    lines = []
    for name, text in pairs:
        wrapped = textwrap.wrap(text, WIDTH - column) or [""]
        if len(name) > width:
            lines.append(" " * indent + name)
        else:
            lines.append((" " * indent + name.ljust(width + gap) + wrapped.pop(0)).rstrip())
        lines += [" " * column + rest for rest in wrapped]
    return lines


def _command_lines(command, indent=2):
    """A command line, broken before an option with a backslash when it is too long."""
    lines, current = [], " " * indent
    for word in command.split(" "):
        if (len(current) + len(word) + 3 > WIDTH and current.strip()
                and word.startswith("-")):
            lines.append(current + " \\")
            current = " " * (indent + 4)
        current += ("" if not current.strip() else " ") + word
    return lines + [current]


class Command(Described):
    """A command that prints: human-readable by default, JSON with --json.

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
        return {name for flag in flags for name in flag[:2] if name} | {"help", "h", "version"}


class CommandGroup(Described):
    """Subcommands under one word (`meshnode operator domain create …`): one must be named."""

    def postOptions(self):
        if self.subCommand is None:
            names = ", ".join(c[0] for c in self.subCommands)
            raise usage.UsageError(f"name a command: {names}")


def print_result(options, data, text):
    print(json.dumps(data, indent=2) if options["json"] else text)


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
