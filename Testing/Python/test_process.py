"""The background worker process against real subprocesses speaking the worker's JSON lines.

The fake workers below stand for `python -m DiffDenoiseLib ... --json`; the
"launcher" variant starts the real worker as its child, as Slicer's
PythonSlicer launcher does, so cancel has to stop a process it did not start.
"""

import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from DiffDenoiseLib.process import WorkerProcess
from DiffDenoiseLib.worker_protocol import EXIT_CANCELLED

pytestmark = pytest.mark.skipif(os.name == "nt", reason="process-group checks are POSIX")

FAKE_WORKER = textwrap.dedent(
    """
    import json, os, signal, sys, time
    steps, delay, pid_file, on_term = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
    step = 0
    def say(**event):
        print(json.dumps(event), flush=True)
    def stop(*_):
        say(event="checkpoint", stage="bsn", step=step)
        sys.exit(3)
    signal.signal(signal.SIGTERM, stop if on_term == "graceful" else signal.SIG_IGN)
    # the pid file says the worker is ready for a cancel: written once SIGTERM is handled as asked (a test that
    # cancelled as soon as it appeared could otherwise kill the worker before it saved its checkpoint)
    open(pid_file, "w").write(str(os.getpid()))
    stop_file = on_term[len("stopfile:"):] if on_term.startswith("stopfile:") else ""
    say(event="log", message="worker started")
    print("a line that is not JSON", flush=True)
    sys.stderr.write("warning on stderr\\n"); sys.stderr.flush()
    for step in range(1, steps + 1):
        time.sleep(delay)
        if stop_file and os.path.exists(stop_file):
            stop()
        say(event="progress", stage="bsn", step=step, total=steps, loss=1.0 / step, eta_s=(steps - step) * delay)
    say(event="result", output="out.nrrd", seconds=steps * delay)
    """
)

FAKE_LAUNCHER = textwrap.dedent(
    """
    import signal, subprocess, sys
    signal.signal(signal.SIGTERM, signal.SIG_IGN if sys.argv[1] == "stubborn" else signal.SIG_DFL)
    sys.exit(subprocess.call([sys.executable] + sys.argv[2:]))
    """
)


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        status = Path("/proc/%d/status" % pid).read_text()
    except OSError:
        return True
    return "\nState:\tZ" not in status


def _wait_gone(pid: int, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def _wait_for_file(path: Path, seconds: float = 10.0) -> int:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return int(path.read_text())
        time.sleep(0.02)
    raise AssertionError("the worker never started")


@pytest.fixture
def scripts(tmp_path):
    worker = tmp_path / "fake_worker.py"
    worker.write_text(FAKE_WORKER)
    launcher = tmp_path / "fake_launcher.py"
    launcher.write_text(FAKE_LAUNCHER)
    return worker, launcher


def test_blocking_run_delivers_every_event_in_order_and_exit_code(scripts, tmp_path):
    worker, _ = scripts
    job = WorkerProcess([sys.executable, worker, "3", "0.01", tmp_path / "pid", "graceful"]).start()
    events, codes = [], []
    job.event.connect(events.append)
    job.finished.connect(codes.append)

    assert job.wait(timeout=30) == 0
    assert codes == [0] and not job.running

    stdout = [e for e in events if e.get("stream") != "stderr"]
    assert [e["event"] for e in stdout] == ["log", "log", "progress", "progress", "progress", "result"]
    assert stdout[1] == {"event": "log", "message": "a line that is not JSON"}
    assert [e["step"] for e in stdout if e["event"] == "progress"] == [1, 2, 3]
    assert stdout[-1]["output"] == "out.nrrd"
    assert {"event": "log", "message": "warning on stderr", "stream": "stderr"} in events
    assert list(job.stderr_tail) == ["warning on stderr"]


def test_poll_returns_at_once_and_emits_on_the_calling_thread(scripts, tmp_path):
    import threading

    worker, _ = scripts
    job = WorkerProcess([sys.executable, worker, "5", "0.1", tmp_path / "pid", "graceful"]).start()
    threads, codes = set(), []
    job.event.connect(lambda e: threads.add(threading.get_ident()))
    job.finished.connect(codes.append)

    started = time.monotonic()
    assert job.poll() is True  # still running: nothing blocks
    assert time.monotonic() - started < 0.5
    while job.poll():
        time.sleep(0.02)
    assert codes == [0]
    assert threads == {threading.get_ident()}
    assert job.poll() is False


def test_cancel_stops_a_graceful_worker_with_a_checkpoint(scripts, tmp_path):
    worker, _ = scripts
    job = WorkerProcess([sys.executable, worker, "1000", "0.05", tmp_path / "pid", "graceful"]).start()
    events = []
    job.event.connect(events.append)
    pid = _wait_for_file(tmp_path / "pid")

    job.cancel()
    assert job.wait(timeout=20) == EXIT_CANCELLED
    assert any(e["event"] == "checkpoint" for e in events)
    assert _wait_gone(pid)


def test_cancel_through_the_stop_file(scripts, tmp_path):
    """What stops a worker where no SIGTERM reaches it (Windows): the stop file, well before the kill."""
    worker, _ = scripts
    stop_file = tmp_path / "stop"
    job = WorkerProcess([sys.executable, worker, "1000", "0.05", tmp_path / "pid", "stopfile:%s" % stop_file],
                        grace_seconds=60.0, stop_file=str(stop_file)).start()
    events = []
    job.event.connect(events.append)
    pid = _wait_for_file(tmp_path / "pid")
    started = time.monotonic()
    job.cancel()
    assert job.wait(timeout=30) == EXIT_CANCELLED
    assert time.monotonic() - started < 30
    assert any(e["event"] == "checkpoint" for e in events)
    assert _wait_gone(pid)


@pytest.mark.parametrize("launcher_mode,worker_mode", [("plain", "graceful"), ("stubborn", "stubborn")])
def test_cancel_kills_the_real_worker_behind_a_launcher(scripts, tmp_path, launcher_mode, worker_mode):
    worker, launcher = scripts
    pid_file = tmp_path / "pid"
    job = WorkerProcess([sys.executable, launcher, launcher_mode, worker, "1000", "0.05", pid_file, worker_mode],
                        grace_seconds=1.0).start()
    codes = []
    job.finished.connect(codes.append)
    real_pid = _wait_for_file(pid_file)
    assert real_pid != job.pid

    job.cancel()
    assert job.wait(timeout=20) == EXIT_CANCELLED
    assert codes == [EXIT_CANCELLED]
    assert _wait_gone(job.pid)
    assert _wait_gone(real_pid), "the real worker outlived cancel"


def test_cancel_after_the_end_keeps_the_real_exit_code(scripts, tmp_path):
    worker, _ = scripts
    job = WorkerProcess([sys.executable, worker, "1", "0", tmp_path / "pid", "graceful"]).start()
    job.wait(timeout=30)
    job.cancel()
    assert job.returncode == 0 and not job.cancelled


def test_failing_worker_reports_its_exit_code_and_stderr(tmp_path):
    script = tmp_path / "bad.py"
    script.write_text("import sys, json\nprint(json.dumps({'event': 'error', 'message': 'no such file'}))\n"
                      "sys.stderr.write('details\\n')\nsys.exit(2)\n")
    job = WorkerProcess([sys.executable, script]).start()
    events = []
    job.event.connect(events.append)
    assert job.wait(timeout=30) == 2
    assert {"event": "error", "message": "no such file"} in events
    assert list(job.stderr_tail) == ["details"]
