"""vmbak man: the manual page vmbak(1), in roff, generated from the argument parser.

``make man`` writes it to build/vmbak.1 (read it with ``man -l build/vmbak.1``). Every
command's description, synopsis, options and examples come from the same parser that
--help prints, so the page cannot drift from the program.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from vmbak.cli.completion import Command, command_tree, takes_value, walk

ENVIRONMENT = [
    ("VMBAK_REPOSITORY", "the repository, when -r is not given"),
    ("VMBAK_PASSWORD", "the repository password, when neither a password file nor a password command is given"),
    ("VMBAK_PASSWORD_FILE", "read the password from this file (instead of --password-file)"),
    ("VMBAK_PASSWORD_COMMAND", "run this command for the password (instead of --password-command); "
     "set at most one of VMBAK_PASSWORD_FILE and VMBAK_PASSWORD_COMMAND"),
    ("VMBAK_FROM_REPOSITORY", "copy: the source repository, when --from-repo is not given"),
    ("VMBAK_FROM_PASSWORD, VMBAK_FROM_PASSWORD_FILE, VMBAK_FROM_PASSWORD_COMMAND",
     "copy: the source repository's password, as the three above are the destination's"),
    ("VMBAK_NEW_PASSWORD", "key add, key passwd: the new password, when --new-password-file is not given"),
    ("VMBAK_S3_ENDPOINT", "the endpoint of s3:BUCKET/PREFIX locations (instead of --s3-endpoint)"),
    ("AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE", "S3 credentials, found as the AWS tools find them"),
    ("VMBAK_CACHE_DIR", "where index files and manifests of S3 repositories are cached (default ~/.cache/vmbak; "
     "off: no cache)"),
    ("VMBAK_TOOL_TIMEOUT", "seconds that every external tool (qemu-img, a password command) may run"),
    ("VMBAK_INDEX_PAGED_ROWS", "above this many loaded index rows (default 4000000), the chunk index is kept in "
     "a temporary file under $VMBAK_CACHE_DIR/tmp (else $TMPDIR) instead of in memory"),
]

PRECEDENCE = ("The password is taken from the first of: --password-file or --password-command (not both); "
              "$VMBAK_PASSWORD_FILE or $VMBAK_PASSWORD_COMMAND (not both); $VMBAK_PASSWORD; a prompt when "
              "standard input is a terminal. A password command is split into words like a shell line but run "
              "without a shell; the first line it prints is the password. It must finish within 60 seconds "
              "($VMBAK_TOOL_TIMEOUT) and exit 0; otherwise vmbak stops with an error naming the command.")

EXIT_STATUS = [("0", "success"), ("1", "an error (one line on standard error), or check found damage"),
               ("2", "a usage error"),
               ("3", "extract: some entries could not be read; the rest was extracted"),
               ("128+N", "interrupted by signal N (130 SIGINT, 143 SIGTERM, 129 SIGHUP)")]


def roff_escape(text: str) -> str:
    """Text safe inside a roff paragraph: backslashes and hyphens escaped, and no line
    starting with a control character."""
    t = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + ln if ln.startswith((".", "'")) else ln for ln in t.split("\n"))


def _paragraphs(text: str) -> list[str]:
    return [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]


def _option_head(a: argparse.Action) -> str:
    head = ", ".join(f"\\fB{roff_escape(o)}\\fR" for o in a.option_strings)
    if takes_value(a):
        mv = a.metavar or (a.dest.upper() if not a.choices else "{" + ",".join(map(str, a.choices)) + "}")
        head += f" \\fI{roff_escape(str(mv))}\\fR"
    return head


def _help(parser: argparse.ArgumentParser, a: argparse.Action) -> str:
    if not a.help:
        return ""
    try:
        return parser._get_formatter()._expand_help(a)
    except (KeyError, TypeError, ValueError):
        return a.help


def _synopsis(c: Command) -> str:
    parts = [f"\\fB{roff_escape(c.name)}\\fR"]
    if c.options:
        parts.append("[\\fIOPTIONS\\fR]")
    if c.subcommands:
        parts.append("\\fICOMMAND\\fR")
    for a in c.positionals:
        mv = roff_escape(str(a.metavar or a.dest.upper()))
        if a.nargs == "?":
            parts.append(f"[\\fI{mv}\\fR]")
        elif a.nargs == "*":
            parts.append(f"[\\fI{mv}\\fR ...]")
        elif a.nargs == "+":
            parts.append(f"\\fI{mv}\\fR ...")
        else:
            parts.append(f"\\fI{mv}\\fR")
    return " ".join(parts)


def _options(out: list[str], parser: argparse.ArgumentParser, actions: list[argparse.Action]) -> None:
    for a in actions:
        out += [".TP", _option_head(a), roff_escape(" ".join(_help(parser, a).split()))]


def _block(out: list[str], text: str) -> None:
    out += [".PP", ".nf", ".RS 4", roff_escape(text.strip("\n")), ".RE", ".fi"]


def manpage(parser: argparse.ArgumentParser | None = None, date: str | None = None) -> str:
    """The roff source of vmbak(1). ``date`` defaults to $SOURCE_DATE_EPOCH's day, else today."""
    from vmbak import __version__

    if parser is None:
        from vmbak.cli.main import build_parser

        parser = build_parser()
    if date is None:
        epoch = os.environ.get("SOURCE_DATE_EPOCH")
        date = time.strftime("%Y-%m-%d", time.gmtime(int(epoch) if epoch and epoch.isdigit() else None))
    tree = command_tree(parser)
    global_dests = {a.dest for a in tree.options}
    out = [f'.TH VMBAK 1 "{date}" "vmbak {__version__}" "User Commands"',
           ".SH NAME", "vmbak \\- block\\-level backup for virtual\\-machine disks",
           ".SH SYNOPSIS", "\\fBvmbak\\fR [\\fIGLOBAL OPTIONS\\fR] \\fICOMMAND\\fR [\\fIOPTIONS\\fR] [\\fIARGUMENTS\\fR]",
           ".SH DESCRIPTION"]
    for para in _paragraphs(parser.description or ""):
        out += [".PP", roff_escape(para)]
    out += [".PP", "Global options may come before or after the command. Every command explains itself, "
            "with examples, under \\fBvmbak \\fICOMMAND\\fB \\-\\-help\\fR.",
            ".SH GLOBAL OPTIONS"]
    _options(out, parser, tree.options)
    out += [".SH COMMANDS"]
    for c in walk(tree)[1:]:
        out += [f'.SS "{roff_escape(c.name)}"']
        if c.help:
            out += [roff_escape(c.help[:1].upper() + c.help[1:] + ("" if c.help.endswith(".") else "."))]
        out += [".PP", _synopsis(c)]
        for para in _paragraphs(c.parser.description or ""):
            out += [".PP", roff_escape(para)]
        if c.subcommands:
            out += [".PP", "Commands: " + ", ".join(f"\\fB{roff_escape(s.name)}\\fR" for s in c.subcommands) + "."]
        positionals = [a for a in c.positionals if a.help]
        own = [a for a in c.options if a.dest not in global_dests]
        if positionals or own:
            out += [".PP", "Arguments and options:" if positionals else "Options:"]
            for a in positionals:
                out += [".TP", f"\\fI{roff_escape(str(a.metavar or a.dest.upper()))}\\fR",
                        roff_escape(" ".join(_help(c.parser, a).split()))]
            _options(out, c.parser, own)
        if c.parser.epilog:
            _block(out, c.parser.epilog)
    out += [".SH PASSWORDS", roff_escape(PRECEDENCE), ".SH ENVIRONMENT"]
    for name, what in ENVIRONMENT:
        out += [".TP", f"\\fB{roff_escape(name)}\\fR", roff_escape(what)]
    out += [".SH EXIT STATUS", "Errors are one line on standard error, \\fBvmbak: error: \\fR...."]
    for code, what in EXIT_STATUS:
        out += [".TP", f"\\fB{roff_escape(code)}\\fR", roff_escape(what)]
    out += [".SH EXAMPLES"]
    _block(out, parser.epilog or "")
    out += [".SH SEE ALSO", "\\fBqemu\\-img\\fR(1), \\fBrestic\\fR(1); the documents under docs/ in vmbak's source.",
            ""]
    return "\n".join(out)


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("man", help="print the manual page (roff)",
                       description="Print the manual page vmbak(1) in roff, generated from the command-line "
                       "parser (the same text as every command's --help). 'make man' writes it to build/vmbak.1.",
                       epilog="examples:\n  vmbak man > vmbak.1 && man -l vmbak.1\n"
                       "  vmbak man | gzip > /usr/local/share/man/man1/vmbak.1.gz",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=cmd_man)


def cmd_man(args: argparse.Namespace) -> int:
    sys.stdout.write(manpage())
    return 0
