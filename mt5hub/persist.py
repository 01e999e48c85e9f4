"""The latest state of every table, kept in a JSON file so that a restarted hub is not empty.

A dashboard that reconnects after a hub restart (deploy, crash, reboot) should find every table
as it was, offline until its EA publishes again, rather than a blank page. The hub keeps its
tables in memory (`Hub`, which does no file I/O); `StateStore` writes them to a file from a task
of its own and reads them back at startup.

- The cost of a save follows what changed, not the size of the state: the file (the base)
  holds every table as of its writing, and each save after it appends only the tables changed
  since to a log beside it (`<state_file>.log`, one JSON entry a line, fsynced). Once the log
  has grown past the base (and `COMPACT_BYTES`), the next save writes a new base and an empty
  log (a compaction): what is written stays within about twice what changed. A process's first
  save is a compaction too.
- A base is written atomically: a temporary file in the same directory, flushed and fsynced,
  then `os.replace` and an fsync of the directory. A crash at any point leaves the old file or
  the new one, never half of one. The base names its log (a random `log` id that the log's
  first line repeats), so a log left from an older base is ignored; a line cut off by a crash is
  skipped; an append that fails is cut off again (and the next save compacts).
- Writes happen in a worker thread (never on the event loop), at most once per `interval`, and
  only when an update was applied since the last write; plus one final write on shutdown,
  bounded in time so that a hung disk cannot hold up the exit.
- A file that cannot be read, is not ours, or comes from a newer format is moved aside (its name
  plus `.corrupt-<time>` or `.unsupported-<time>`) with one warning, and the hub starts empty: a
  bad file must never keep the hub down. Entries that do not check out are skipped and counted.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import trio

from .fanout import Frame
from .hub import Hub
from .state import SavedTable, encode
from .subscription import TableId

log = logging.getLogger("mt5hub")

FORMAT = "mt5hub-state"
LOG_FORMAT = "mt5hub-state-log"
COMPACT_BYTES = 1024 * 1024  # a log grows past this and past its base before a compaction
VERSION = 1  # bump when the layout changes; a hub refuses files of versions it does not know
FINAL_SAVE_TIMEOUT = 1.0  # seconds the shutdown waits for the last write (graceful_timeout is 2)

# How a blocking call leaves the event loop: a worker thread in production; tests on a MockClock
# run it inline, since the clock would jump ahead while a thread works.
InThread = Callable[[Callable[[], None]], Awaitable[None]]


async def in_worker_thread(fn: Callable[[], None]) -> None:
    """Run `fn` in a thread. A cancelled caller does not wait for it: the write is atomic, and
    `StateStore.write` never lets an abandoned older write replace a newer one."""
    await trio.to_thread.run_sync(fn, abandon_on_cancel=True)


class BadEntry(ValueError):
    """A table entry of the state file that cannot be restored; the message says why."""


class StateReader:
    """Reads a state file and its log at startup; moves aside what cannot be used."""

    def __init__(self, path: Path, wall_clock: Callable[[], float] = time.time) -> None:
        self.path, self._wall_clock = path, wall_clock
        self.log_path = path.with_name(path.name + ".log")

    def load(self) -> list[SavedTable]:
        """The tables of the file; [] (and the bad file moved aside) when it cannot be used."""
        self._remove_leftovers()
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            log.info("no state file %s yet: starting with no tables", self.path)
            return []
        except OSError as exc:
            self._set_aside("corrupt", f"cannot read it ({_describe(exc)})")
            return []
        try:
            document = json.loads(raw)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            self._set_aside("corrupt", f"not JSON ({exc})")
            return []
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            self._set_aside("corrupt", f'not an mt5hub state file (no "format": "{FORMAT}")')
            return []
        version = document.get("version")
        if version != VERSION:
            self._set_aside(
                "unsupported",
                f"format version {version!r}, and this hub reads version {VERSION} only "
                f"(written by a newer mt5hub?)",
            )
            return []
        entries = document.get("tables")
        if not isinstance(entries, list):
            self._set_aside("corrupt", '"tables" is not a list')
            return []
        tables: list[SavedTable] = []
        seen: set[tuple[str, str]] = set()
        bad: list[str] = []
        for n, entry in enumerate(entries):
            try:
                table = parse_entry(entry)
                if table.table in seen:
                    raise BadEntry(f"table {table.table} appears twice")
            except BadEntry as exc:
                bad.append(f"tables[{n}]: {exc}")
                continue
            seen.add(table.table)
            tables.append(table)
        if bad:
            log.warning(
                "state file %s: skipped %d bad table entr%s of %d (first: %s)",
                self.path,
                len(bad),
                "y" if len(bad) == 1 else "ies",
                len(entries),
                bad[0],
            )
        if isinstance(log_id := document.get("log"), str):
            tables = self._with_log(tables, log_id)
        log.info(
            "state file %s: restoring %d tables (offline until published)", self.path, len(tables)
        )
        return tables

    def _with_log(self, tables: list[SavedTable], log_id: str) -> list[SavedTable]:
        """These tables of the base, updated by the entries of its log (the higher seq wins)."""
        try:
            raw = self.log_path.read_bytes()
        except OSError:
            return tables  # no log yet (a crash right after the base), or unreadable: the base
        lines = raw.split(b"\n")
        try:
            header = json.loads(lines[0])
        except (ValueError, RecursionError):
            header = None
        if not isinstance(header, dict) or header.get("format") != LOG_FORMAT:
            log.warning("state log %s: not an mt5hub state log; ignored", self.log_path)
            return tables
        if header.get("base") != log_id:
            return tables  # a log of an older base, whose changes the base holds
        latest = {t.table: t for t in tables}
        bad = 0
        for line in lines[1:]:
            if not line:
                continue
            try:
                entry = parse_entry(json.loads(line))
            except (ValueError, RecursionError):  # BadEntry too; a line cut off by a crash
                bad += 1
                continue
            held = latest.get(entry.table)
            if held is None or entry.seq >= held.seq:
                latest[entry.table] = entry
        if bad:
            log.warning("state log %s: skipped %d bad lines", self.log_path, bad)
        return list(latest.values())

    def _set_aside(self, why: str, problem: str) -> None:
        """Move a file the hub cannot use out of the way (never overwrite it), and say so once."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._wall_clock()))
        aside = self.path.with_name(f"{self.path.name}.{why}-{stamp}")
        n = 1
        while aside.exists():
            n += 1
            aside = self.path.with_name(f"{self.path.name}.{why}-{stamp}-{n}")
        try:
            os.rename(self.path, aside)
            where = f"moved to {aside}"
        except OSError as exc:
            where = f"could not move it aside ({_describe(exc)}); the next save replaces it"
        log.warning(
            "state file %s is unusable: %s; %s; starting with no tables", self.path, problem, where
        )

    def _remove_leftovers(self) -> None:
        """Temporary files of writes cut short (a kill between write and replace)."""
        with contextlib.suppress(OSError):
            for leftover in self.path.parent.glob(f".{self.path.name}.*.tmp"):
                with contextlib.suppress(OSError):
                    leftover.unlink()


class StateFile:
    """One state file and its log: read at startup, written from a worker thread."""

    def __init__(
        self, path: str | os.PathLike[str], wall_clock: Callable[[], float] = time.time
    ) -> None:
        self.path = Path(path)  # relative: to the working directory, like hub.toml
        self._wall_clock = wall_clock
        # Writes abandoned by a cancelled caller may still run in their thread: this lock and
        # the newest generation written keep an older snapshot from replacing a newer one.
        self._write_lock = threading.Lock()
        self._written = 0
        self._log_id: str | None = None  # the log that appends go to; None: compact next
        self._base_bytes = 0
        self._log_bytes = 0

    @property
    def log_path(self) -> Path:
        """The append log beside the base file."""
        return self.path.with_name(self.path.name + ".log")

    def load(self) -> list[SavedTable]:
        """The tables of the file; [] (and the bad file moved aside) when it cannot be used."""
        return StateReader(self.path, self._wall_clock).load()

    # -- the file -----------------------------------------------------------------------------

    def write(self, tables: Sequence[SavedTable], generation: int) -> None:
        """Replace the file with these tables, atomically (blocking: call it from a thread).

        `generation` orders snapshots (`Hub.changes`): a write older than one already done is
        skipped, so that a write abandoned by a cancelled caller cannot undo a newer one.
        """
        with self._write_lock:
            if generation <= self._written:
                return
            self._log_id = None  # until both files are in place, appends would go nowhere
            log_id = secrets.token_hex(8)
            body = self.dumps(tables, log_id)
            header = encode({"format": LOG_FORMAT, "version": VERSION, "base": log_id}) + "\n"
            self._replace(self.path, body)  # a log of the old base is now ignored
            self._replace(self.log_path, header.encode())
            self._written = generation
            self._log_id, self._base_bytes, self._log_bytes = log_id, len(body), len(header)

    def append(self, tables: Sequence[SavedTable], generation: int) -> None:
        """Add these tables to the log (blocking: call it from a thread); see `write`.

        An append that fails is cut off again where it began, and the next save compacts.
        """
        with self._write_lock:
            if generation <= self._written:
                return
            log_id = self._log_id
            if log_id is None:
                raise OSError(errno.EIO, "no state log to append to")
            lines = "".join(encode(_entry(t)) + "\n" for t in tables).encode()
            self._log_id = None  # compact next, unless this append completes
            with open(self.log_path, "ab") as file:
                start = file.tell()
                try:
                    file.write(lines)
                    file.flush()
                    os.fsync(file.fileno())
                except BaseException:
                    with contextlib.suppress(OSError):
                        file.truncate(start)
                    raise
                self._log_bytes = start + len(lines)
            self._written = generation
            self._log_id = log_id

    def _replace(self, path: Path, body: bytes) -> None:
        """Replace this file with `body`, atomically, and fsync it and its directory."""
        directory = path.parent
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(body)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        _fsync_directory(directory)  # the rename itself survives a power cut

    def dumps(self, tables: Sequence[SavedTable], log_id: str | None = None) -> bytes:
        document: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "saved": round(self._wall_clock(), 3),
            "tables": [_entry(t) for t in tables],
        }
        if log_id is not None:
            document["log"] = log_id
        return encode(document).encode()


class StateStore(StateFile):
    """A state file kept current while serving: loaded at startup, saved every `interval`
    after a change, and written once more at shutdown."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        interval: float = 1.0,
        in_thread: InThread = in_worker_thread,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(path, wall_clock)
        self.interval = interval
        self._in_thread = in_thread
        self._lock = trio.Lock()  # one save at a time from this event loop
        self._saved_changes = 0  # Hub.changes as of the last successful save
        self._failing = False  # a save failed and nothing has been saved since: log once
        self.problem = ""  # why the last save failed, while saves fail (for /healthz)
        self._saved: dict[TableId, tuple[int, str]] = {}  # (seq, clientId) on disk, per table

    # -- while serving ------------------------------------------------------------------------

    async def run(self, hub: Hub, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Save every `interval` while something changed; runs until cancelled."""
        task_status.started()
        while True:
            await trio.sleep(self.interval)
            await self.save(hub)

    async def save(self, hub: Hub) -> bool:
        """Write what changed since the last save, if anything did; False if the write failed.

        Appends the changed tables to the log, or compacts (see the module docstring). A
        failure (disk full, permissions) is counted and logged once, and retried at the next
        interval: the hub serves on, only its restart would lose what was not saved.
        """
        async with self._lock:
            changes = hub.changes
            if changes == self._saved_changes:
                return True
            saved = self._saved
            changed = [
                SavedTable(s.table, s.seq, s.client_id, s.update.text)
                for s in hub.tables.values()
                if s.update is not None and saved.get(s.table) != (s.seq, s.client_id)
            ]
            compact = (
                self._log_id is None
                or self._log_bytes > max(COMPACT_BYTES, self._base_bytes)
                or not changed  # only possible after a restore: nothing to append
            )
            tables = saved_tables(hub) if compact else changed
            write = self.write if compact else self.append
            try:
                await self._in_thread(lambda: write(tables, changes))
            except OSError as exc:
                hub.metrics.state_save_errors.inc()
                if not self._failing:
                    log.warning(
                        "cannot save the tables to %s: %s; retrying every %s s",
                        self.path,
                        _describe(exc),
                        self.interval,
                    )
                self._failing = True
                self.problem = f"cannot write {self.path}: {_describe(exc)}"
                return False
            self._saved_changes = changes
            for table in tables:
                saved[table.table] = (table.seq, table.client_id)
            hub.metrics.state_saves.inc()
            if self._failing:
                log.info("saved the tables to %s again", self.path)
                self._failing = False
                self.problem = ""
            return True

    async def final_save(self, hub: Hub, timeout: float = FINAL_SAVE_TIMEOUT) -> None:
        """The last save, at shutdown: shielded from the shutdown's cancellation, bounded."""
        with trio.CancelScope(deadline=trio.current_time() + timeout, shield=True) as scope:
            await self.save(hub)
        if scope.cancelled_caught:
            log.warning(
                "the final save to %s did not finish within %s s: it holds the state of the "
                "last save before it",
                self.path,
                timeout,
            )


def saved_tables(hub: Hub) -> list[SavedTable]:
    """The latest state of every table, to be kept where it outlives this process."""
    return [
        SavedTable(s.table, s.seq, s.client_id, s.update.text)
        for s in hub.tables.values()
        if s.update is not None
    ]


def restore(hub: Hub, saved: Iterable[SavedTable]) -> int:
    """Put back tables saved by an earlier run, before anyone publishes; how many.

    They come back offline (no connection publishes them yet) with their seq, so that a
    returning publisher's next update continues the numbering viewers already know. A table
    the hub already has is left as it is: what it holds is newer than any file.
    """
    restored = 0
    for entry in saved:
        if entry.table in hub.tables:
            continue
        state = hub.table_state(entry.table)
        state.seq = entry.seq
        state.client_id = entry.client_id
        hub.capacity.replaced(state.update, entry.text)
        state.update = Frame(entry.text, ("update", *entry.table), seq=entry.seq)
        restored += 1
    hub.snapshots.changed()
    return restored


def _entry(t: SavedTable) -> dict[str, Any]:
    """One table as the base file and the log hold it."""
    return {"key": t.table[0], "src": t.table[1], "seq": t.seq, "clientId": t.client_id,
            "update": t.text}  # fmt: skip


def parse_entry(entry: Any) -> SavedTable:
    """One table of the file, checked as the hub will serve it; BadEntry says what is wrong."""
    if not isinstance(entry, dict):
        raise BadEntry("not an object")
    key, src = _string(entry, "key"), _string(entry, "src")
    client_id, text = _string(entry, "clientId"), _string(entry, "update")
    if not key or not src:
        raise BadEntry("key and src must not be empty")
    seq = entry.get("seq")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise BadEntry("seq: expected a positive integer")
    try:
        update = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise BadEntry(f"update: not JSON ({exc})") from None
    if not isinstance(update, dict):
        raise BadEntry("update: not a JSON object")
    if update.get("type") != "update":
        raise BadEntry('update: "type" is not "update"')
    if (update.get("key"), update.get("src")) != (key, src):
        raise BadEntry("update: its key and src are not the entry's")
    if "online" in update:
        raise BadEntry('update: holds "online", which the hub adds itself')
    # The hub splices `online` in before the closing brace and strips the seq for a backplane
    # resync (TableState.published_text): the text must end exactly as the hub writes it.
    if update.get("seq") != seq or not text.endswith(f',"seq":{seq}}}'):
        raise BadEntry(f'update: does not end with the entry\'s ,"seq":{seq}}}')
    return SavedTable((key, src), seq, client_id, text)


def _string(entry: dict[str, Any], name: str) -> str:
    value = entry.get(name)
    if not isinstance(value, str):
        raise BadEntry(f"{name}: expected a string")
    return value


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):  # file systems that cannot
            raise
    finally:
        os.close(fd)


def _describe(exc: OSError) -> str:
    """`No space left on device`, without the path the log line names already."""
    return exc.strerror or str(exc) or type(exc).__name__
