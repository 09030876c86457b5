"""One writer per results directory: a lease file with an owner and a heartbeat.

Two generation runs on the same `--out` would each read the same committed sample_ids,
generate the same rows and both commit them. So a run takes `_lease.json` (run id, host,
pid, start time, last heartbeat) before it touches the directory, renews it from a
background thread, checks it is still the holder before every commit, and removes it at
the end. A second run meets the lease and stops with a message naming the holder.

A lease is stale, and may be taken over, when its heartbeat is older than its `ttl_s`
(the holder died without cleaning up: a killed driver, a lost node) or, on the same
host, when its process no longer exists (so a re-run right after Ctrl-C or `kill -9`
does not wait for the timeout).

Local disks take the lease with an exclusive create (O_EXCL). Object stores have no
exclusive create through pyarrow, so there the lease is written and read back; two runs
starting within the same instant could both write it, but only the one whose record is
in the file passes the check before each commit, so a shard is never committed by two.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass, replace

import pyarrow.fs as pafs

from pipelines.errors import InputError

LEASE_FILE = "_lease.json"
DEFAULT_TTL_S = 120.0


class LeaseHeldError(InputError):
    """Another live run holds the results directory."""


class LeaseLostError(RuntimeError):
    """This run's lease was taken over (it was stale: the run stalled longer than the ttl)."""


@dataclass(frozen=True)
class LeaseRecord:
    run_id: str
    host: str
    pid: int
    started_at: float
    heartbeat_at: float
    ttl_s: float

    def describe(self, now: float) -> str:
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started_at))
        return (f"run {self.run_id} on host {self.host} (pid {self.pid}) since {since}, "
                f"last heartbeat {max(0.0, now - self.heartbeat_at):.0f} s ago")

    def stale(self, now: float) -> bool:
        if now - self.heartbeat_at > self.ttl_s:
            return True
        return self.host == socket.gethostname() and not _pid_alive(self.pid)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:  # not a process (kill() would address a process group)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class Lease:
    """Held by one run; `check()` before each commit; `release()` at the end."""

    def __init__(self, fs: pafs.FileSystem, root: str, run_id: str, ttl_s: float = DEFAULT_TTL_S, local: bool = True):
        self.fs, self.path, self.local = fs, f"{root.rstrip('/')}/{LEASE_FILE}", local
        now = time.time()
        self.record = LeaseRecord(run_id, socket.gethostname(), os.getpid(), now, now, float(ttl_s))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None  # set by the heartbeat when another run took the lease

    # ------------------------------------------------------------------ taking it
    def acquire(self, where: str) -> LeaseRecord | None:
        """Take the lease or raise LeaseHeldError. Returns the stale record taken over, if any."""
        taken_over = None
        for _ in range(3):
            current = self._read()
            if current is not None:
                now = time.time()
                if current.run_id == self.record.run_id:
                    break
                if not current.stale(now):
                    raise LeaseHeldError(
                        f"--out {where}: in use by {current.describe(now)}; wait for it to finish or use another "
                        f"--out (a lease whose run died is taken over after {current.ttl_s:.0f} s without a "
                        f"heartbeat, or at once on the same host)")
                taken_over = current
                self._delete_if(current)
            if self._create():
                break
        mine = self._read()
        if mine is None or mine.run_id != self.record.run_id:
            holder = mine.describe(time.time()) if mine else "another run"
            raise LeaseHeldError(f"--out {where}: in use by {holder}; another run took it at the same moment")
        self._thread = threading.Thread(target=self._heartbeat, name="diffsweep-lease", daemon=True)
        self._thread.start()
        return taken_over

    def _create(self) -> bool:
        data = json.dumps(asdict(self.record)).encode()
        if self.local:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return True
        if self.fs.get_file_info(self.path).type != pafs.FileType.NotFound:
            return False
        self._write(data)
        return True

    def _write(self, data: bytes) -> None:
        if self.local:  # write-then-rename, so a reader never sees half a record
            tmp = f"{self.path}.{os.getpid()}.{threading.get_ident()}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path)
        else:
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)

    def _read(self) -> LeaseRecord | None:
        try:
            with self.fs.open_input_stream(self.path) as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        except OSError:
            if self.fs.get_file_info(self.path).type == pafs.FileType.NotFound:
                return None
            raise
        try:
            return LeaseRecord(**json.loads(raw.decode()))
        except (ValueError, TypeError):  # unreadable: treat as a dead holder's leftovers
            return LeaseRecord("unknown", "unknown", -1, 0.0, 0.0, 0.0)

    def _delete_if(self, expected: LeaseRecord) -> None:
        if self._read() == expected:
            try:
                self.fs.delete_file(self.path)
            except FileNotFoundError:
                pass

    # ------------------------------------------------------------------ holding it
    def _heartbeat(self) -> None:
        interval = max(0.5, self.record.ttl_s / 4)
        while not self._stop.wait(interval):
            try:
                self.check()
                now = time.time()
                self.record = replace(self.record, heartbeat_at=now)
                self._write(json.dumps(asdict(self.record)).encode())
            except LeaseLostError as e:
                self.lost = str(e)
                return
            except OSError:  # a transient storage error: the next beat tries again
                continue

    def check(self) -> None:
        """Raise LeaseLostError unless this run still holds the lease."""
        if self.lost:
            raise LeaseLostError(self.lost)
        current = self._read()
        if current is None or current.run_id != self.record.run_id:
            holder = current.describe(time.time()) if current else "nobody (the lease file was removed)"
            self.lost = (f"this run ({self.record.run_id}) lost its lease on the results directory; "
                         f"it is now held by {holder}")
            raise LeaseLostError(self.lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        current = self._read()
        if current is not None and current.run_id == self.record.run_id:
            try:
                self.fs.delete_file(self.path)
            except FileNotFoundError:
                pass
