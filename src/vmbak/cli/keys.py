"""Key management: key list, key add, key remove, key passwd."""

from __future__ import annotations

import argparse
import getpass
import os
import sys

from vmbak.cli.common import counted, emit, open_repo
from vmbak.errors import VmbakError
from vmbak.repo.crypto import ENC_NONE, key_names, read_key_doc, save_key_file, wrap_key
from vmbak.repo.repository import Repository

EPILOG = """examples:
  vmbak key list
  VMBAK_NEW_PASSWORD=... vmbak key add            # a second password for the same repository
  vmbak key passwd --new-password-file /root/new.pw
  vmbak key remove 3f2a9c1e                      # by key id (prefix)
"""


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("key", parents=[parent], help="manage the passwords (key files) of a repository",
                       description="Every key file holds the repository's master key, wrapped with a key "
                       "derived from one password (scrypt). Any key file opens the repository; adding, "
                       "removing or changing a password touches only key files, never data.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ks = p.add_subparsers(dest="key_command", metavar="KEYCOMMAND")
    new_pw = argparse.ArgumentParser(add_help=False)
    new_pw.add_argument("--new-password-file", metavar="FILE",
                        help="read the new password from FILE (default: $VMBAK_NEW_PASSWORD, or a prompt)")

    q = ks.add_parser("list", parents=[parent], help="list key files",
                      description="List the key files: id, creation time, host and user, and which one "
                      "the given password opens.",
                      epilog="example:\n  vmbak key list --json", formatter_class=argparse.RawDescriptionHelpFormatter)
    q.set_defaults(func=cmd_list)
    q = ks.add_parser("add", parents=[parent, new_pw], help="add a password",
                      description="Add a key file holding the same master key under a new password. "
                      "The current password (VMBAK_PASSWORD, --password-file, --password-command or a prompt) opens the "
                      "repository; the new one comes from --new-password-file, $VMBAK_NEW_PASSWORD or a "
                      "prompt.",
                      epilog="example:\n  vmbak key add --new-password-file /root/second.pw",
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    q.set_defaults(func=cmd_add)
    q = ks.add_parser("passwd", parents=[parent, new_pw], help="change the current password",
                      description="Replace the key file that the current password opens with one for "
                      "a new password. The new key file is written before the old one is removed.",
                      epilog="example:\n  vmbak key passwd --new-password-file /root/new.pw",
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    q.set_defaults(func=cmd_passwd)
    q = ks.add_parser("remove", parents=[parent], help="remove a key file",
                      description="Remove a key file by its id (or a unique prefix). The key that "
                      "opened the repository (the current password's) cannot be removed, nor the last one.",
                      epilog="example:\n  vmbak key remove 3f2a9c1e",
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("key_id", metavar="KEYID")
    q.set_defaults(func=cmd_remove)
    p.set_defaults(func=lambda args: _no_subcommand(p))


def _no_subcommand(p: argparse.ArgumentParser) -> int:
    p.print_help(sys.stderr)
    return 2


def _key_id(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def new_password(args: argparse.Namespace) -> str:
    pf = getattr(args, "new_password_file", None)
    if pf:
        try:
            with open(pf, encoding="utf-8") as f:
                pw = f.read().rstrip("\r\n")
        except OSError as e:
            raise VmbakError(f"cannot read new password file {pf}: {e.strerror}") from None
    elif os.environ.get("VMBAK_NEW_PASSWORD") is not None:
        pw = os.environ["VMBAK_NEW_PASSWORD"]
    elif sys.stdin.isatty():
        try:
            pw = getpass.getpass("new password: ")
            if getpass.getpass("repeat new password: ") != pw:
                raise VmbakError("passwords do not match")
        except EOFError:  # (Ctrl-C and SIGTERM are interrupts, reported as such by cli/main.py)
            raise VmbakError("no new password given") from None
    else:
        raise VmbakError("no new password given (use --new-password-file, VMBAK_NEW_PASSWORD, or a terminal)")
    if not pw:
        raise VmbakError("the new password is empty")
    return pw


def _encrypted_repo(args: argparse.Namespace) -> Repository:
    repo = open_repo(args)
    if repo.encryption == ENC_NONE:
        raise VmbakError("this repository is not encrypted: its key file has no password to add, change or remove")
    return repo


def cmd_list(args: argparse.Namespace) -> int:
    repo = open_repo(args)
    rows = []
    for name in key_names(repo.backend):
        try:
            doc = read_key_doc(repo.backend, name)
            problem = None
        except VmbakError as e:
            doc, problem = {}, str(e)
        row = {"id": _key_id(name), "current": name == repo.key_name, "created": doc.get("created"),
               "host": doc.get("host"), "user": doc.get("user"), "kdf": doc.get("kdf")}
        if doc.get("kdf") == "scrypt":
            row["kdf_params"] = {"n": doc.get("n"), "r": doc.get("r"), "p": doc.get("p")}
        if problem:
            row["problem"] = problem
        rows.append(row)
    lines = [f"{'':1} {'ID':32}  {'CREATED':20}  {'HOST':16}  {'USER':10}  KDF"]
    for r in rows:
        lines.append(f"{'*' if r['current'] else ' '} {r['id']:32}  {str(r['created'] or '-'):20}  "
                     f"{str(r['host'] or '-')[:16]:16}  {str(r['user'] or '-')[:10]:10}  {r['kdf'] or '?'}"
                     + (f"  ({r['problem']})" if r.get("problem") else ""))
    lines.append(f"{counted(len(rows), 'key')} (* = the key the given password opens)")
    emit(args, rows, "\n".join(lines))
    return 0


def _write_new_key(args: argparse.Namespace, repo: Repository) -> str:
    pw = new_password(args)
    return save_key_file(repo.backend, wrap_key(repo.master, pw, repo.config))


def cmd_add(args: argparse.Namespace) -> int:
    repo = _encrypted_repo(args)
    name = _write_new_key(args, repo)
    emit(args, {"added": _key_id(name)}, f"added key {_key_id(name)}")
    return 0


def cmd_passwd(args: argparse.Namespace) -> int:
    repo = _encrypted_repo(args)
    old = repo.key_name
    name = _write_new_key(args, repo)
    repo.backend.delete(old)  # only once the new key file is durable
    emit(args, {"added": _key_id(name), "removed": _key_id(old)},
         f"password changed: key {_key_id(old)} replaced by {_key_id(name)}")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    repo = _encrypted_repo(args)
    names = key_names(repo.backend)
    want = args.key_id.lower().removeprefix("keys/")
    match = [n for n in names if _key_id(n).startswith(want)] if want else []
    if not match:
        raise VmbakError(f"no key {args.key_id!r} (see 'vmbak key list')")
    if len(match) > 1:
        raise VmbakError(f"key id prefix {args.key_id!r} is ambiguous")
    (name,) = match
    if name == repo.key_name:
        raise VmbakError(f"key {_key_id(name)} is the one the given password opens: open the repository with "
                         "another key's password to remove it, or use 'vmbak key passwd'")
    if len(names) == 1:
        raise VmbakError("cannot remove the last key of a repository")
    repo.backend.delete(name)
    emit(args, {"removed": _key_id(name)}, f"removed key {_key_id(name)}")
    return 0
