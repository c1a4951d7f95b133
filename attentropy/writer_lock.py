"""The writer lock of a run directory (DIR/writer.lock): one process writes a run at a time, a second is refused
with who holds it, and a lock whose holder died is taken over."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from .store import RunDirectoryError

LOCK_NAME = "writer.lock"
HEARTBEAT_S = 30.0  # the holder refreshes its lock this often
STALE_AFTER_S = 600.0  # a lock of another host without a heartbeat for this long is taken over


def _process_start(pid: int) -> str | None:
    """The start time of a process (Linux: field 22 of /proc/PID/stat), to tell a pid reused from the same pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _holder_alive(holder: dict, mtime: float) -> bool:
    if holder.get("host") != socket.gethostname():
        return time.time() - mtime < STALE_AFTER_S
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return time.time() - mtime < STALE_AFTER_S
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    start = holder.get("pid_start")
    return start is None or start == _process_start(pid)


@contextmanager
def writer_lock(run_dir: str | Path, command: str, name: str = LOCK_NAME):
    """Hold DIR/writer.lock while writing a run directory, so that it has one writer at a time. The lock file is
    created exclusively and names its holder (host, pid, command, since when); a second writer is refused with a
    RunDirectoryError that says who holds it. A lock whose holder is gone is taken over: on the same host when its
    process no longer runs (kill -9 included), from another host (a shared file system) when its heartbeat, the
    file's modification time refreshed every 30 s, is older than 10 minutes. The data-parallel runs take this one
    lock in their driver; its workers write batches under it."""
    path = Path(run_dir) / name
    me = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
          "command": command, "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": os.urandom(8).hex()}
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder, mtime = json.loads(path.read_text() or "{}"), path.stat().st_mtime
            except (OSError, json.JSONDecodeError):  # being written, or gone since: look again
                time.sleep(0.1)
                continue
            if _holder_alive(holder, mtime):
                raise RunDirectoryError(
                    f"{run_dir} is being written by another process: {holder.get('command')} (host "
                    f"{holder.get('host')}, pid {holder.get('pid')}, since {holder.get('since')}); wait for it to "
                    f"finish or stop it. A lock left by a killed process is taken over automatically") from None
            try:  # stale: move it out of the way atomically (one taker wins), then try again
                os.replace(path, path.with_name(f"{name}.stale-{me['token']}"))
                os.unlink(path.with_name(f"{name}.stale-{me['token']}"))
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
            f.flush()
            os.fsync(f.fileno())
        break
    else:
        raise RunDirectoryError(f"could not take the lock {path}")
    stop = threading.Event()

    def heartbeat():
        while not stop.wait(HEARTBEAT_S):
            try:
                os.utime(path)
            except OSError:
                return

    beat = threading.Thread(target=heartbeat, daemon=True)
    beat.start()
    try:
        yield path
    finally:
        stop.set()
        try:
            if json.loads(path.read_text()).get("token") == me["token"]:
                path.unlink()
        except (OSError, json.JSONDecodeError):
            pass
