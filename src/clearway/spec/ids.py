"""Names and the ids composed from them: one typed constructor each.

Every id the platform derives from user-chosen names goes through this module,
because ids composed by hand collide: with ``-`` as the only separator, app
``b`` with component ``x-2-y`` and app ``b-1-x`` with component ``y`` both
made replica ``b-1-x-2-y-0``, and the second was never started.

The rules that make composition unambiguous:

* a *name* (app, component) is a DNS label: lowercase letters, digits and
  ``-``; it never contains ``.``;
* a revision id is ``<app>-<number>``; the number is the part after the last
  ``-`` and is always decimal, so two apps never share a revision id;
* a replica id is ``<revision>.<component>.<index>``: ``.`` appears in no
  name, so the three parts are recovered by splitting on it.

Patterns are applied with ``fullmatch``: ``re.match`` with ``$`` accepts a
trailing newline (``App("name\\n")`` used to pass and then broke the CLI).
"""

from __future__ import annotations

import hashlib
import re
from typing import NewType

__all__ = [
    "ENV_NAME",
    "MAX_LOCK_NAME",
    "AppName",
    "ComponentName",
    "ReplicaId",
    "RevisionId",
    "branch_label",
    "check_env_name",
    "check_lock_name",
    "check_name",
    "commit_label",
    "parse_replica_id",
    "replica_id",
    "revision_id",
]

AppName = NewType("AppName", str)
ComponentName = NewType("ComponentName", str)
RevisionId = NewType("RevisionId", str)
ReplicaId = NewType("ReplicaId", str)

#: A DNS label of at most 40 characters (it becomes part of host names).
_NAME = re.compile(r"[a-z](?:[a-z0-9-]{0,38}[a-z0-9])?")
#: A portable environment variable name (POSIX).
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_name(value: object, what: str) -> str:
    """Validate an app or component name, saying how to fix it."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} is not a valid name: use 1-40 lowercase letters, digits and '-', "
            "starting with a letter and not ending with '-' (it becomes part of a host name)"
        )
    return value


def check_env_name(value: object) -> str:
    """Validate an environment variable name (``[A-Za-z_][A-Za-z0-9_]*``)."""
    if not isinstance(value, str) or not ENV_NAME.fullmatch(value):
        raise ValueError(
            f"environment variable name {value!r} is invalid: use letters, digits and '_', "
            "not starting with a digit"
        )
    return value


def branch_label(branch: str) -> str:
    """The DNS label a preview of ``branch`` is served under (``<label>.<app>.<domain>``).

    Lowercase letters, digits and ``-``, at most 40 characters. When that loses
    anything (``feature/x`` and ``feature-x`` would both be ``feature-x``), a
    six-digit hash of the real name is appended, so two branches never share a
    host. A label never looks like a commit label (seven hex digits): those
    would be ambiguous with ``<sha7>.<app>``; one that would gets the hash too.
    """
    label = re.sub(r"[^a-z0-9]+", "-", branch.lower()).strip("-")
    lossy = label != branch or len(label) > 40 or not label or not label[0].isalpha() or _COMMIT.fullmatch(label)
    if lossy:
        digest = hashlib.sha256(branch.encode()).hexdigest()[:6]
        label = (label[:33].strip("-") or "branch") + "-" + digest
        if not label[0].isalpha():
            label = "b-" + label[: 40 - 2]
    return label


def commit_label(sha: str) -> str:
    """The DNS label of a commit's preview: its first seven hex digits."""
    if not re.fullmatch(r"[0-9a-f]{7,64}", sha):
        raise ValueError(f"{sha!r} is not a commit id (hex digits)")
    return sha[:7]


#: Seven lowercase hex digits: the shape of a commit label.
_COMMIT = re.compile(r"[0-9a-f]{7}")


def revision_id(app: str, number: int) -> RevisionId:
    check_name(app, "app name")
    if number < 1:
        raise ValueError(f"revision numbers start at 1, got {number}")
    return RevisionId(f"{app}-{number}")


def replica_id(revision: str, component: str, index: int) -> ReplicaId:
    app, sep, number = revision.rpartition("-")
    if not sep or not number.isdecimal() or str(int(number)) != number or number == "0":
        raise ValueError(f"{revision!r} is not a revision id (<app>-<number>)")
    check_name(app, "app name")
    check_name(component, "component name")
    if index < 0:
        raise ValueError(f"replica index must be >= 0, got {index}")
    return ReplicaId(f"{revision}.{component}.{index}")


def parse_replica_id(value: str) -> tuple[RevisionId, ComponentName, int]:
    """The inverse of `replica_id`; raises ``ValueError`` for anything else."""
    parts = value.split(".")
    if len(parts) != 3 or not parts[2].isdecimal():
        raise ValueError(f"{value!r} is not a replica id (<app>-<number>.<component>.<index>)")
    revision, component, index = parts[0], parts[1], int(parts[2])
    if replica_id(revision, component, index) != value:
        raise ValueError(f"{value!r} is not a canonical replica id")
    return RevisionId(revision), ComponentName(component), index


MAX_LOCK_NAME = 200
_LOCK_PART = re.compile(r"[A-Za-z0-9._:-]+")


def check_lock_name(name: object) -> str:
    """``name`` when it is a valid lock name, else ValueError saying why.

    1 to 200 characters: parts of ``A-Z a-z 0-9 . _ : -`` joined by single ``/``
    (``inventory``, ``orders/eu``). The name becomes part of a key, so ``a/b``
    must never mean the same lock as ``a//b``, ``/a/b`` or ``a/b/``. The one rule
    for the SDK (which checks before any call) and for every coordination backend.
    """
    if not isinstance(name, str):
        raise ValueError(f"a lock name must be a string, not {type(name).__name__}")
    if not name:
        raise ValueError("a lock name must not be empty")
    if len(name) > MAX_LOCK_NAME:
        raise ValueError(f"lock name {name[:40]!r}... is {len(name)} characters long; the limit is {MAX_LOCK_NAME}")
    bad = sorted({c for c in name if c != "/" and not _LOCK_PART.fullmatch(c)})
    if bad:
        raise ValueError(f"lock name {name!r} contains {''.join(bad)!r}: use only letters, digits and . _ : / -")
    if not all(_LOCK_PART.fullmatch(part) for part in name.split("/")):
        raise ValueError(
            f"lock name {name!r} has an empty part: '/' goes only between parts (e.g. 'orders/eu'), "
            "never at the start or the end, and never twice in a row"
        )
    return name
