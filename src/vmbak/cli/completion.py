"""vmbak completion bash|zsh|fish: shell completion scripts generated from the argument parser.

The scripts are built by walking the same argparse parser that parses the command line
(``command_tree``), so a new command or option completes as soon as it is registered.
Values complete by kind: an option's ``choices``; files or directories for arguments
that name a local path (``path_kind``); nothing for snapshot ids, names and numbers.
An argument can state its kind itself: ``p.add_argument(...).complete = "file"`` (or
"dir", or "none").
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field

EPILOG = """examples:
  vmbak completion bash > /etc/bash_completion.d/vmbak
  echo 'source <(vmbak completion zsh)' >> ~/.zshrc   # zsh runs it through bashcompinit
  vmbak completion fish > ~/.config/fish/completions/vmbak.fish
  source <(vmbak completion bash)                    # this shell only
"""

SHELLS = ("bash", "zsh", "fish")

# Arguments that name a local path, by destination or metavar (anything else completes no
# files: snapshot ids, disk names, numbers, paths *inside* a snapshot).
_DIR_DESTS = {"repo", "from_repo", "to_repo", "state_dir", "mountpoint"}
_DIR_METAVARS = {"DIR", "MOUNTPOINT", "REPO"}
_FILE_DESTS = {"password_file", "new_password_file", "from_password_file", "disk", "overlay", "qmp", "socket",
               "from_serve"}
_FILE_METAVARS = {"FILE", "FILE.qcow2", "DISK", "TARGET", "SOCKET", "SOCKET|DISK"}


@dataclass
class Command:
    """One command of the tree: its words (``["key", "add"]``), parser, one-line help,
    subcommands, options and positional arguments (those hidden from --help left out)."""

    path: list[str]
    parser: argparse.ArgumentParser
    help: str = ""
    subcommands: list[Command] = field(default_factory=list)
    options: list[argparse.Action] = field(default_factory=list)
    positionals: list[argparse.Action] = field(default_factory=list)

    @property
    def name(self) -> str:
        return " ".join(["vmbak", *self.path])


def command_tree(parser: argparse.ArgumentParser, path: list[str] | None = None, help: str = "") -> Command:
    """Walk ``parser`` (and its subparsers, recursively) into a Command tree."""
    cmd = Command(path or [], parser, help)
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            helps = {c.dest: c.help or "" for c in a._choices_actions}
            for name, sp in a.choices.items():
                cmd.subcommands.append(command_tree(sp, [*cmd.path, name], helps.get(name, "")))
        elif a.help == argparse.SUPPRESS:
            continue
        elif a.option_strings:
            cmd.options.append(a)
        else:
            cmd.positionals.append(a)
    return cmd


def walk(cmd: Command) -> list[Command]:
    """The command and all its descendants, depth first."""
    out = [cmd]
    for s in cmd.subcommands:
        out += walk(s)
    return out


def takes_value(a: argparse.Action) -> bool:
    return a.nargs != 0 and not isinstance(a, argparse._HelpAction | argparse._VersionAction)


def path_kind(a: argparse.Action) -> str:
    """"file", "dir" or "none": what a value of this argument completes to."""
    explicit = getattr(a, "complete", None)
    if explicit:
        return str(explicit)
    mv = a.metavar if isinstance(a.metavar, str) else None
    if a.dest in _DIR_DESTS or mv in _DIR_METAVARS:
        return "dir"
    if not a.option_strings and mv == "PATH":
        return "none"  # a path inside a snapshot (ls, cat, extract)
    if a.dest in _FILE_DESTS or mv in _FILE_METAVARS or (a.option_strings and mv == "PATH"):
        return "file"
    return "none"


def first_line(text: str | None) -> str:
    """The first sentence of a help text, on one line (argparse's %(...)s fields left out)."""
    t = re.sub(r"\s*%\([a-z_]+\)s", "", " ".join((text or "").split()))
    return t.split(". ")[0]


# ---------------------------------------------------------------------------- bash
def _bash_assoc(name: str, items: dict[str, str]) -> str:
    body = "".join(f"\n    [{_sh_quote(k)}]={_sh_quote(v)}" for k, v in items.items())
    return f"declare -gA {name}=({body}\n)"


def _sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def bash_script(tree: Command) -> str:
    """A bash completion script (also run by zsh through bashcompinit)."""
    subs, opts, argopts, choices, kinds, pos = {}, {}, {}, {}, {}, {}
    for c in walk(tree):
        key = c.name
        subs[key] = " ".join(s.path[-1] for s in c.subcommands)
        opts[key] = " ".join(o for a in c.options for o in a.option_strings)
        argopts[key] = " ".join(o for a in c.options if takes_value(a) for o in a.option_strings)
        for a in c.options:
            if not takes_value(a):
                continue
            for o in a.option_strings:
                if a.choices:
                    choices[f"{key} {o}"] = " ".join(map(str, a.choices))
                kinds[f"{key} {o}"] = path_kind(a)
        pos[key] = " ".join("=" + ",".join(map(str, a.choices)) if a.choices else path_kind(a)
                            for a in c.positionals)
    return f"""# bash completion for vmbak (generated by 'vmbak completion bash'; do not edit)
{_bash_assoc("_vmbak_subs", subs)}
{_bash_assoc("_vmbak_opts", opts)}
{_bash_assoc("_vmbak_argopts", argopts)}
{_bash_assoc("_vmbak_choices", choices)}
{_bash_assoc("_vmbak_kinds", kinds)}
{_bash_assoc("_vmbak_pos", pos)}

_vmbak_values() {{  # _vmbak_values KIND CUR: complete a value of this kind
    [[ -n ${{ZSH_VERSION-}} ]] && setopt localoptions ksharrays shwordsplit
    case "$1" in
        file) compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -f -- "$2"));;
        dir) compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -d -- "$2"));;
        "="*) local words="${{1#=}}"; COMPREPLY=($(compgen -W "${{words//,/ }}" -- "$2"));;  # =a,b,c: choices
        *) COMPREPLY=();;
    esac
}}

_vmbak() {{
    [[ -n ${{ZSH_VERSION-}} ]] && setopt localoptions ksharrays shwordsplit
    local cur="${{COMP_WORDS[COMP_CWORD]}}" path=vmbak w i skip=0 npos=0 opt=""
    COMPREPLY=()
    for ((i = 1; i < COMP_CWORD; i++)); do
        w="${{COMP_WORDS[i]}}"
        if ((skip)); then skip=0; continue; fi
        case "$w" in
            --*=*) continue;;
            -?*) [[ " ${{_vmbak_argopts[$path]}} " == *" $w "* ]] && skip=1 && opt="$w"; continue;;
        esac
        if [[ " ${{_vmbak_subs[$path]}} " == *" $w "* ]]; then
            path="$path $w"; npos=0
        else
            npos=$((npos + 1))
        fi
    done
    if ((skip)); then  # the word is the value of option $opt
        local key="$path $opt"
        if [[ -n "${{_vmbak_choices[$key]+set}}" ]]; then
            COMPREPLY=($(compgen -W "${{_vmbak_choices[$key]}}" -- "$cur"))
        else
            _vmbak_values "${{_vmbak_kinds[$key]}}" "$cur"
        fi
        return 0
    fi
    if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "${{_vmbak_opts[$path]}}" -- "$cur"))
        return 0
    fi
    if [[ -n "${{_vmbak_subs[$path]}}" ]]; then
        COMPREPLY=($(compgen -W "${{_vmbak_subs[$path]}}" -- "$cur"))
        return 0
    fi
    local -a kinds=(${{_vmbak_pos[$path]}})
    ((${{#kinds[@]}})) || return 0
    ((npos >= ${{#kinds[@]}})) && npos=$((${{#kinds[@]}} - 1))  # the last one may repeat
    _vmbak_values "${{kinds[npos]}}" "$cur"
    return 0
}}
complete -F _vmbak vmbak
"""


def zsh_script(tree: Command) -> str:
    """A zsh completion script: the bash one, run through zsh's bashcompinit."""
    return ("# zsh completion for vmbak (generated by 'vmbak completion zsh'; do not edit); load it with\n"
            "# source <(vmbak completion zsh) in ~/.zshrc (it is not an fpath function file)\n"
            "autoload -U +X compinit && { (( $+functions[compdef] )) || compinit; }\n"
            "autoload -U +X bashcompinit && bashcompinit\n"
            + bash_script(tree).split("\n", 1)[1])


# ---------------------------------------------------------------------------- fish
def _fish_quote(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def fish_script(tree: Command) -> str:
    """A fish completion script."""
    out = ["# fish completion for vmbak (generated by 'vmbak completion fish'; do not edit)",
           "complete -c vmbak -e", "complete -c vmbak -f",
           "function __vmbak_path --description 'the vmbak (sub)commands on the line so far'",
           "    set -l words (commandline -opc)", "    set -e words[1]", "    set -l path", "    set -l skip 0",
           "    for w in $words",
           "        if test $skip = 1; set skip 0; continue; end",
           "        switch $w",
           "            case '--*=*'", "                continue",
           "            case '-*'",
           "                if contains -- $w (__vmbak_argopts $path); set skip 1; end",
           "                continue", "        end",
           "        if contains -- $w (__vmbak_subs $path); set -a path $w; end",
           "    end", "    echo (string join ' ' -- $path)", "end"]
    subs_case, argopts_case = [], []
    for c in walk(tree):
        key = " ".join(c.path)
        subs_case.append(f"        case {_fish_quote(key)}\n            printf '%s\\n' "
                         + " ".join(_fish_quote(s.path[-1]) for s in c.subcommands) if c.subcommands else
                         f"        case {_fish_quote(key)}\n            true")
        ao = [o for a in c.options if takes_value(a) for o in a.option_strings]
        argopts_case.append(f"        case {_fish_quote(key)}\n            printf '%s\\n' "
                            + " ".join(_fish_quote(o) for o in ao) if ao else
                            f"        case {_fish_quote(key)}\n            true")
    out += ["function __vmbak_subs", "    switch (string join ' ' -- $argv)", *subs_case, "    end", "end"]
    out += ["function __vmbak_argopts", "    switch (string join ' ' -- $argv)", *argopts_case, "    end", "end"]
    for c in walk(tree):
        cond = f"test (__vmbak_path) = {_fish_quote(' '.join(c.path))}"
        for s in c.subcommands:
            out.append(f"complete -c vmbak -n {_fish_quote(cond)} -a {_fish_quote(s.path[-1])}"
                       f" -d {_fish_quote(first_line(s.help))}")
        for a in c.options:
            flags = []
            for o in a.option_strings:
                flags.append(f"-l {_fish_quote(o[2:])}" if o.startswith("--") else f"-s {_fish_quote(o[1:])}")
            extra = ""
            if takes_value(a):
                if a.choices:
                    extra = " -x -a " + _fish_quote(" ".join(map(str, a.choices)))
                else:
                    kind = path_kind(a)
                    extra = {"file": " -r -F", "dir": " -x -a '(__fish_complete_directories)'"}.get(kind, " -x")
            out.append(f"complete -c vmbak -n {_fish_quote(cond)} {' '.join(flags)}{extra}"
                       f" -d {_fish_quote(first_line(a.help))}")
        kinds = {path_kind(a) for a in c.positionals}
        for a in c.positionals:
            if a.choices:
                out.append(f"complete -c vmbak -n {_fish_quote(cond)} -a {_fish_quote(' '.join(map(str, a.choices)))}")
        if not c.subcommands and "file" in kinds:
            out.append(f"complete -c vmbak -n {_fish_quote(cond)} -F")
        elif not c.subcommands and "dir" in kinds:
            out.append(f"complete -c vmbak -n {_fish_quote(cond)} -a '(__fish_complete_directories)'")
    return "\n".join(out) + "\n"


GENERATORS = {"bash": bash_script, "zsh": zsh_script, "fish": fish_script}


def completion_script(shell: str, parser: argparse.ArgumentParser | None = None) -> str:
    """The completion script for ``shell`` ("bash", "zsh" or "fish") of vmbak's parser."""
    if parser is None:
        from vmbak.cli.main import build_parser

        parser = build_parser()
    return GENERATORS[shell](command_tree(parser))


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("completion", help="print a shell completion script",
                       description="Print a completion script for bash, zsh or fish, generated from vmbak's "
                       "own command-line parser: commands, options, option values with fixed choices, and "
                       "file or directory names where an argument is a local path.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shell", choices=SHELLS, metavar="SHELL", help="bash, zsh or fish")
    p.set_defaults(func=cmd_completion)


def cmd_completion(args: argparse.Namespace) -> int:
    sys.stdout.write(completion_script(args.shell))
    return 0
