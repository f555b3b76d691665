"""Outputs appear whole or not at all: write under a temporary name, then rename.

A killed process leaves at most a hidden `.NAME.tmp-HOST-PID` beside the target (or
`.NAME.tmp-HOST-PID-old`), which the next write of that target on that machine removes,
whatever the output (`remove_leftovers`: those of processes no longer alive, so never a
concurrent writer's; another machine's once nothing in it has changed for a day);
the target itself is either the previous complete version or the new complete one (a
folder is swapped by two renames, the old one set aside as a leftover first, so a kill
between them leaves no target, never part of one). What was written is on the disk
before the rename, so a crash of the machine, not only of the process, keeps that true.

A folder is replaced whole (or filled) only when it is empty or the same stage wrote it
(the `OWNED` file in it says which): a folder of the user's files named as an output by
mistake (`alexnet synth ~/photos`, `alexnet prepare raw raw`), or another stage's
output (`alexnet synth data/prepared`), is refused before any work, and loses nothing. An
output folder that is a symbolic link is written where the link points (the data stays
on that disk); an output file that is one is replaced by the new file, never written
through (with DVC's symlink cache the link's target is the cache).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from alexnet.errors import AlexnetError

# In every output folder of alexnet: the mark that the stage it names may replace or
# update it. Fixed bytes, so a folder's content (and DVC's hash of it) depends only on
# its data. A mark that names no stage (one a user made with `touch`, or one from before
# marks named their stage) is any stage's.
OWNED = ".alexnet-output"
OWNED_PREFIX = "alexnet-pipeline output:"


def owned_text(owner: str) -> bytes:
    return f"{OWNED_PREFIX} {owner}\n".encode()


def mark_owner(folder: Path) -> str | None:
    """The stage a folder's mark names: None without a mark, "" for a mark naming none."""
    try:
        text = (folder / OWNED).read_bytes().decode(errors="replace").strip()
    except OSError:  # none there, or none to read
        return None
    return text.removeprefix(OWNED_PREFIX).strip() if text.startswith(OWNED_PREFIX) else ""


# The write errors that name no file (`write`, `fsync`): the output's path is added.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


class OutputError(AlexnetError):
    """An output path whose present content alexnet must not replace."""


TMP, ASIDE = ".tmp-", "-old"  # `.NAME.tmp-HOST-PID`; a folder set aside `...-old`
# Another machine's temporary unchanged this long is a leftover: every writer here
# changes its temporary at least every few minutes (a store's transactions, a shard,
# a checkpoint written in seconds).
STALE_ELSEWHERE = 24 * 3600.0  # s
# This machine, in a name: on shared storage a PID alone is not one process (two nodes'
# containers often run the same command with the same PID).
HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "_"
# Any such name (HOST- absent: an older version's, taken as this machine's): what
# `remove_leftovers` looks for.
_TEMPORARY = re.compile(
    rf"\.(?P<name>.+){re.escape(TMP)}(?:(?P<host>\w+)-)?(?P<pid>[0-9]+)(?:{ASIDE})?"
)


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP}{HOST}-{os.getpid()}")


@contextmanager
def atomic_output(path: str | Path, folder: str | None = None) -> Iterator[Path]:
    """Yield a temporary path to write, a file (or, with `folder` naming the stage that
    owns it, a folder made here and marked as that stage's); on success it replaces
    `path` (`file_target`, `folder_target`). What killed writers of `path` left goes
    first (a large output's temporary is as large as the output); a live process's
    temporary stays (`remove_leftovers`)."""
    path = folder_target(path, folder) if folder else file_target(path)
    remove_leftovers(path.parent, path.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_name(path)
    try:
        if folder:
            temporary.mkdir()
        try:
            yield temporary
            if folder:
                (temporary / OWNED).write_bytes(owned_text(folder))
            _sync(temporary)  # on the disk before its name is the output's
        except OSError as error:
            if error.filename is None and error.errno in WRITE_ERRNOS:  # say where
                raise OSError(error.errno, error.strerror, str(path)) from error
            raise
        if folder and path.is_dir():
            aside = path.with_name(f"{temporary.name}{ASIDE}")
            os.replace(path, aside)
            try:
                os.replace(temporary, path)
            except BaseException:  # the old version back: the target is never lost
                os.replace(aside, path)
                raise
            remove_swept(aside)
        else:
            os.replace(temporary, path)
        _fsync(path.parent)  # the rename itself
    finally:
        with suppress(OSError):  # a failed cleanup must not hide the error that led here
            if temporary.is_dir():
                shutil.rmtree(temporary, ignore_errors=True)
            else:
                temporary.unlink(missing_ok=True)


def _sync(path: Path) -> None:
    """Flush a written file, or every file and folder in a written folder, to the disk.
    Without it a crash of the machine (not only of the process) soon after the rename
    can leave the output's name on an empty or partial file: a checkpoint read as
    damaged, hours of training lost. (What is already on the disk costs nothing.)"""
    if not path.is_dir():
        _fsync(path)  # a file: opened read-only, as a folder is
        return
    for folder, _, files in os.walk(path):
        for name in files:
            if not os.path.islink(os.path.join(folder, name)):  # its target is not ours
                _fsync(Path(folder) / name)
        _fsync(Path(folder))


def _fsync(path: Path) -> None:
    """fsync a file, or a folder (its entries: the names made or renamed in it)."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def check_apart(outputs: dict[str, str], inputs: dict[str, str]) -> None:
    """No output at or inside an input (`{name: path}`; links followed): it would change
    what the next run reads (`prepare RAW RAW/train/x` made a class of its own shards).
    An input inside an output folder is left to `folder_target`: a folder the stage
    replaces may hold only its own output."""
    sources = {name: (read, Path(read).resolve()) for name, read in inputs.items()}
    for out in outputs.values():
        written = Path(out).resolve()
        for name, (read, source) in sources.items():
            if written.is_relative_to(source):
                where = "is" if written == source else "is inside"
                raise OutputError(
                    f"{out}: {where} the input {name.upper()} ({read}); name an output outside it"
                )


def file_target(path: str | Path) -> Path:
    """An output file's path, checked before any work: not a folder, nor under a file,
    and its folder writable."""
    path = Path(path)
    _check_parents(path)
    if path.is_dir():
        raise OutputError(f"{path}: a folder, where this output is a file; name the file")
    _check_writable(_nearest(path.parent), path)  # its temporary is made beside it
    return path


def output_folder(path: str | Path, filled: bool = True) -> Path:
    """A folder that outputs are written into, checked before any work: not a file,
    nor under one, and (`filled`) writable: it, or the folder it will be made in."""
    path = Path(path)
    _check_parents(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path}: a file, where this output is a folder; name a folder")
    if filled:
        _check_writable(_nearest(path), path)
    return path


def folder_target(path: str | Path, owner: str, replaced: bool = True) -> Path:
    """The folder that stage `owner`'s output at `path` replaces (`replaced`) or fills
    (where it points, if it is a symbolic link), checked before any work:
    `output_folder`, empty or marked as `owner`'s, and if replaced not a mount point
    (which cannot be renamed)."""
    output_folder(path, filled=not replaced)
    target = link_target(Path(path))
    if replaced and os.path.ismount(target):
        raise OutputError(f"{path}: a mount point, which cannot be replaced; name a folder in it")
    if replaced:  # its temporary is made beside where it points, and renamed there
        _check_writable(_nearest(target.parent), path)
    found = mark_owner(target)
    if found is None and target.is_dir() and next(target.iterdir(), None):
        raise OutputError(_unmarked(path, target))
    if found and found != owner:
        raise OutputError(
            f"{path}: the output of alexnet's {found}, not of its {owner}; name another "
            "folder, or remove this one"
        )
    return target


def _unmarked(path: str | Path, target: Path) -> str:
    """Why a folder of files without a mark is refused: it lies inside another output
    (`pack data/prepared data/prepared`: its train/), or it is the user's."""
    for outer in target.parents:
        stage = mark_owner(outer)
        if stage is not None:  # no hint to mark it: that would let this output replace it
            whose = f"alexnet's {stage}" if stage else "alexnet"
            return f"{path}: inside {outer}, an output of {whose}; name a folder outside it"
    return (
        f"{path}: holds files and not the {OWNED} mark of the output folders that alexnet "
        "replaces or updates; name a new or empty folder, or remove this one (one alexnet "
        f"wrote before it marked them: touch {Path(path) / OWNED})"
    )


def link_target(path: Path) -> Path:
    """`path`, or where it points while it is a symbolic link. Only the last part is
    followed: the rest stays as given, which a Dask worker on another machine (the same
    file system, mounted through other links) also reaches."""
    for _ in range(40):  # the kernel's own limit on a chain of links
        if not path.is_symlink():
            return path
        path = path.parent / os.readlink(path)  # a relative link is relative to its folder
    raise OutputError(f"{path}: too many levels of symbolic links")


def _check_parents(path: Path) -> None:
    parent = _nearest(path.parent)
    if not parent.is_dir():
        raise OutputError(f"{path}: {parent} is a file, not a folder")


def _nearest(path: Path) -> Path:
    """`path` or its nearest parent that exists (where a missing folder will be made)."""
    return next(p for p in (path, *path.parents) if p.exists())


def _check_writable(folder: Path, path: Path) -> None:
    """Fail before the work, not after it, where no file can be made: a read-only mount,
    an immutable folder (which root's permission bits do not show)."""
    try:
        handle, probe = tempfile.mkstemp(prefix=".alexnet-probe-", dir=folder)
    except OSError as error:
        raise OutputError(f"{path}: cannot write in {folder} ({error.strerror or error})") from None
    os.close(handle)
    os.unlink(probe)


def claim_folder(path: str | Path, owner: str) -> Path:
    """An output folder that stage `owner` fills over several runs (prepare's, which
    resumes): checked as `folder_target`, then made and marked."""
    target = folder_target(path, owner, replaced=False)
    target.mkdir(parents=True, exist_ok=True)
    mark = target / OWNED
    if not mark.is_file() or mark.read_bytes() != owned_text(owner):
        write_bytes(mark, owned_text(owner))
    return target


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_output(path) as temporary:
        Path(temporary).write_bytes(data)


def write_json(path: str | Path, value: object) -> None:
    write_bytes(path, (json.dumps(value, indent=2, sort_keys=False) + "\n").encode())


def remove_leftovers(folder: str | Path, name: str | None = None) -> None:
    """Delete what killed runs left in `folder`: the temporaries `.NAME.tmp-HOST-PID`
    (files or folders, and the `-old` that a folder's swap sets aside: put back as NAME
    where NAME is missing) of the target
    `name`, or of any target when None, whose process on this machine is gone. Another
    machine's stay while they change (whether its process lives cannot be told from
    here), and go once untouched for `STALE_ELSEWHERE` (the machine's container was
    replaced, say: a new host name, and a raw store's ~250 GB left for good). Another
    live process's may be written now and stays (as does a dead run's whose PID an
    unrelated process has since been given: left for a later run). This process's own
    are leftovers too: it writes a target from one place at a time, so one there now is
    a dead run's whose PID it was given (a container starts the same command with the
    same PID)."""
    prefix = "." if name is None else f".{name}{TMP}"  # a cheap first look at each entry
    try:
        entries = list(os.scandir(folder))
    except OSError:  # none yet (made for the write), or not to be listed
        return
    for entry in entries:
        found = entry.name.startswith(prefix) and _TEMPORARY.fullmatch(entry.name)
        if not found or name not in (None, found["name"]) or _alive(found, entry):
            continue
        with suppress(OSError):  # best effort: a leftover never stops the write
            target = os.path.join(folder, found["name"])
            if entry.name.endswith(ASIDE) and not os.path.lexists(target):
                # killed between a folder swap's two renames: the version it set aside
                # is whole, and the only one left under a name of its own
                os.replace(entry.path, target)
            elif entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)


def _alive(temporary: re.Match, entry: os.DirEntry) -> bool:
    """Whether another process, the temporary's by its name's PID, runs now; one on
    another machine (its name's host), which cannot be told from here, is taken as
    alive while the temporary changes: its node removes it."""
    if temporary["host"] not in (None, HOST):
        try:
            return _changed_since(entry, time.time() - STALE_ELSEWHERE)
        except OSError:  # gone meanwhile (its node removed it), or not to be read
            return True
    pid = int(temporary["pid"])
    if pid == os.getpid() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # no signal: only the check that it exists
    except (ProcessLookupError, OverflowError):  # none, or past any PID
        return False
    except OSError:  # PermissionError: another user's process; anything else: keep it
        return True
    return True


def _changed_since(entry: os.DirEntry, moment: float) -> bool:
    """Whether a temporary, or anything in it, changed after `moment`: a status change
    (ctime: a write, and also a rename, which a folder swap's `-old` just had, and no
    `touch` can set back), over a folder's whole tree (a store's data.mdb grows in place,
    synth writes into class folders); the walk stops at the first such change (a live
    writer's tree is listed at every write of its target's neighbours)."""
    if entry.stat(follow_symlinks=False).st_ctime > moment:
        return True
    if entry.is_dir(follow_symlinks=False):
        for root, folders, files in os.walk(entry.path):
            for name in folders + files:
                with suppress(OSError):  # removed meanwhile
                    if os.lstat(os.path.join(root, name)).st_ctime > moment:
                        return True
    return False


def remove_swept(tree: Path) -> None:
    """`shutil.rmtree`, an entry that another node's sweep removed first being no error
    (the tree is gone, as it should be)."""
    if sys.version_info >= (3, 12):  # (`onerror` is deprecated there)
        shutil.rmtree(tree, onexc=lambda function, path, error: _gone_is_fine(error))
    else:
        shutil.rmtree(tree, onerror=lambda function, path, info: _gone_is_fine(info[1]))


def _gone_is_fine(error: BaseException) -> None:
    if not isinstance(error, FileNotFoundError):
        raise error
