"""ServerProcess.stop on real process groups (plain Python processes standing in for vLLM's API
server and engine core; no vLLM here, so this is unit tier).

vLLM's API server exits within a second of SIGTERM while its engine core is still shutting down
(and a profiling executor flushes its last trace rows there); stop must let the rest of the group
finish within the grace, and still leave nothing alive after it.
"""
from __future__ import annotations

import io
import sys
import time
from pathlib import Path

from gateway.launch import STRAGGLER_GRACE_S, ServerProcess, group_members

#: Leader exits on SIGTERM at once (default action); its forked child handles SIGTERM by
#: finishing some work (``DELAY`` s) and writing ``DONE_FILE``, or ignores it (``DELAY`` < 0).
_GROUP = r"""
import os, signal, sys, time
delay, done = float(sys.argv[1]), sys.argv[2]
if os.fork() == 0:
    def on_term(*_):
        if delay < 0:
            return
        time.sleep(delay)
        open(done, "w").write("flushed")
        os._exit(0)
    signal.signal(signal.SIGTERM, on_term)
    print("child ready", flush=True)
    while True:
        time.sleep(0.05)
time.sleep(3600)
"""


def _started(tmp_path: Path, delay_s: float) -> tuple[ServerProcess, Path]:
    done = tmp_path / "done"
    p = ServerProcess("grp", [sys.executable, "-c", _GROUP, str(delay_s), str(done)], env={}, log=io.StringIO())
    p.start()
    for _ in range(200):
        if "child ready" in p.tail:
            break
        time.sleep(0.05)
    assert "child ready" in p.tail
    return p, done


def test_stop_lets_the_engine_core_finish_its_shutdown_after_the_api_server_exits(tmp_path):
    p, done = _started(tmp_path, delay_s=0.3)
    pgid = p.pid
    assert len(group_members({pgid})) == 2
    p.stop(grace_s=20)
    assert done.read_text() == "flushed"  # killed at the leader's exit before: no file
    assert group_members({pgid}) == []


def test_stop_still_kills_a_member_that_ignores_sigterm(tmp_path):
    p, done = _started(tmp_path, delay_s=-1)
    pgid = p.pid
    p.stop(grace_s=0.5)  # less than STRAGGLER_GRACE_S: the grace bounds the wait
    assert STRAGGLER_GRACE_S > 0.5
    assert group_members({pgid}) == [] and not done.exists()
