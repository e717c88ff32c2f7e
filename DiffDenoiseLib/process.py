"""The background worker process: a command-line run whose JSON lines arrive as events.

Two reader threads (stdout, stderr) put what they read on one queue; `poll()`,
called from the GUI thread by a timer, drains the queue and emits the events, so
slots run on the GUI thread and the application never waits on a pipe. `wait()`
is the blocking path for scripts and tests: the same queue, drained until the
process ends.

The worker runs in its own process group (POSIX) or process group (Windows),
because in Slicer the Python executable is a launcher that starts the real
interpreter as its child. `cancel()` asks the worker to stop (its stop file, and
SIGTERM to the whole group on POSIX: the command line saves a checkpoint and
exits 3) and kills the whole process tree if it has not exited after a grace
period, so no orphan keeps running.
"""

import os
import queue
import signal
import subprocess
import threading
from collections import deque
from typing import Dict, List, Optional, Sequence

from DiffDenoiseLib.signals import Signal
from DiffDenoiseLib.worker_protocol import EXIT_CANCELLED, parse_line

_WINDOWS = os.name == "nt"


class WorkerProcess:
    """One run of a worker command.

    Signals: `event(dict)` for every line (stderr lines as `log` events),
    `finished(int)` once with the exit code (`EXIT_CANCELLED` whenever `cancel()`
    was called, whatever the code the killed process returned).
    """

    def __init__(self, args: Sequence[str], env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None,
                 grace_seconds: float = 10.0, stop_file: Optional[str] = None):
        self.args: List[str] = [str(a) for a in args]
        self.env = env
        self.cwd = cwd
        self.grace_seconds = grace_seconds
        self.stop_file = stop_file
        self.event = Signal("event")
        self.finished = Signal("exit_code")
        self.returncode: Optional[int] = None
        self.cancelled = False
        self.stderr_tail: deque = deque(maxlen=40)
        self._proc: Optional[subprocess.Popen] = None
        self._queue: "queue.Queue" = queue.Queue()
        self._readers: List[threading.Thread] = []
        self._kill_timer: Optional[threading.Timer] = None
        self._finished_emitted = False

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and not self._finished_emitted

    def start(self) -> "WorkerProcess":
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONUNBUFFERED"] = "1"
        options = dict(stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       env=env, cwd=self.cwd, text=True, encoding="utf-8", errors="replace", bufsize=1)
        if _WINDOWS:
            options["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
        else:
            options["start_new_session"] = True
        self._proc = subprocess.Popen(self.args, **options)
        self._readers = [
            threading.Thread(target=self._read, args=(self._proc.stdout, False), daemon=True),
            threading.Thread(target=self._read, args=(self._proc.stderr, True), daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        threading.Thread(target=self._reap, daemon=True).start()
        return self

    def _read(self, stream, is_stderr: bool) -> None:
        for line in stream:
            if is_stderr:
                text = line.rstrip("\r\n")
                self.stderr_tail.append(text)
                self._queue.put({"event": "log", "message": text, "stream": "stderr"})
            else:
                self._queue.put(parse_line(line))
        stream.close()

    def _reap(self) -> None:
        code = self._proc.wait()
        for reader in self._readers:
            reader.join()
        if self.cancelled:
            # The launcher may be gone while the interpreter it started is not: sweep the group.
            self._kill_tree()
        if self._kill_timer is not None:
            self._kill_timer.cancel()
        self._queue.put(("exit", code))

    def poll(self) -> bool:
        """Emit what has arrived; return True while the process is still running (call again later)."""
        while not self._finished_emitted:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return True
            self._dispatch(item)
        return False

    def wait(self, timeout: Optional[float] = None) -> int:
        """Block until the process ends, emitting events as they arrive; return the exit code."""
        while not self._finished_emitted:
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError("the worker did not finish within %s s" % timeout)
            self._dispatch(item)
        return self.returncode

    def _dispatch(self, item) -> None:
        if isinstance(item, tuple):
            code = item[1]
            self.returncode = EXIT_CANCELLED if self.cancelled else code
            self._finished_emitted = True
            self.finished.emit(self.returncode)
        else:
            self.event.emit(item)

    def cancel(self) -> None:
        """Ask the worker to stop (it saves a checkpoint and exits); kill it after `grace_seconds`."""
        if self._proc is None or self._proc.poll() is not None:
            return  # not started, or already done: its own exit code stands
        self.cancelled = True
        if self.stop_file:
            open(self.stop_file, "a").close()
        if not _WINDOWS:
            self._signal_group(signal.SIGTERM)
        self._kill_timer = threading.Timer(self.grace_seconds, self._kill_tree)
        self._kill_timer.daemon = True
        self._kill_timer.start()

    def kill(self) -> None:
        """Stop the worker and everything it started at once."""
        if self._proc is not None:
            self.cancelled = self.cancelled or not self._finished_emitted
            self._kill_tree()

    def _kill_tree(self) -> None:
        if _WINDOWS:
            subprocess.run(["taskkill", "/PID", str(self._proc.pid), "/T", "/F"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=False)
        else:
            self._signal_group(signal.SIGKILL)

    def _signal_group(self, signum: int) -> None:
        try:
            os.killpg(self._proc.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass
