"""Leases (vgg_jax.storage, docs/architecture.md#storage): one holder at a time, atomic between processes, never
stuck after a crash; user paths as epath. The same leases on GCS are exercised end to end in tests/test_gcs.py."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
import tensorstore as ts

from vgg_jax import storage

RACER = """
import sys, time
from vgg_jax import storage
at = float(sys.argv[2])
read = storage.Lease._read

def read_then_pause(self):  # every racer reads the lease as free before any of them writes
    found = read(self)
    time.sleep(max(0.0, at + 1.0 - time.time()))
    return found

storage.Lease._read = read_then_pause
lease = storage.Lease(sys.argv[1], "racing")
while time.time() < at:
    pass
print("won" if lease.try_acquire() is None else "lost", flush=True)
sys.stdin.read()  # hold it until the test has counted
"""


def test_of_processes_racing_for_a_lease_exactly_one_gets_it(tmp_path):
    """All see it free; the conditional write lets one win, the others then see the winner's record."""
    at = time.time() + 3.0  # all started by then
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(tmp_path / "lease.json"), str(at)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = [p.stdout.readline().strip() for p in procs]
    for p in procs:
        p.communicate("")
    assert sorted(results) == ["lost", "lost", "lost", "won"], results


def test_a_lease_is_refused_while_held_and_free_once_released(tmp_path):
    first = storage.Lease(tmp_path / "lease.json", "the first job").acquire()
    with pytest.raises(storage.LeaseHeld, match=r"^The first job is already under way: .* pid \d+ since .*Stop it"):
        storage.Lease(tmp_path / "lease.json", "the second job").acquire(advice="Stop it.")
    first.release()
    storage.Lease(tmp_path / "lease.json", "the second job").acquire().release()


def test_a_crashed_holders_lease_is_taken_over_at_once_on_its_host(tmp_path):
    code = f"from vgg_jax import storage; storage.Lease({str(tmp_path / 'lease.json')!r}, 'crashing').acquire()"
    subprocess.run([sys.executable, "-c", code + "; import os; os._exit(0)"], check=True)  # never released
    assert not json.loads((tmp_path / "lease.json").read_text()).get("released")
    storage.Lease(tmp_path / "lease.json", "the rerun").acquire().release()


def _foreign_holder(path, ttl: float, stop: threading.Event) -> threading.Thread:
    """A holder on another host (as its record says) that renews every 50 ms until ``stop``."""
    store = ts.KvStore.open({"driver": "file", "path": str(path.parent) + "/"}).result()

    def renew() -> None:
        n = 0
        while not stop.is_set():
            record = dict(holder="elsewhere pid 1", host="elsewhere", pid=1, token="t", what="a job",
                          since=time.time(), renewed=time.time(), ttl=ttl, n=n)  # fmt: skip
            store.write(path.name, json.dumps(record).encode()).result()
            n += 1
            time.sleep(0.05)

    thread = threading.Thread(target=renew, daemon=True)
    thread.start()
    return thread


def test_a_holder_on_another_host_is_live_while_it_renews_and_expired_once_it_stops(tmp_path):
    path, stop = tmp_path / "lease.json", threading.Event()
    thread = _foreign_holder(path, ttl=3.0, stop=stop)
    while not path.exists():
        time.sleep(0.01)
    with pytest.raises(storage.LeaseHeld, match="elsewhere pid 1"):
        storage.Lease(path, "a second job", ttl=3.0).acquire(poll=0.1)  # sees it renewed: live
    stop.set()
    thread.join()
    started = time.monotonic()
    lease = storage.Lease(path, "a second job", ttl=3.0).acquire(poll=0.1)  # not renewed for ttl: expired
    assert time.monotonic() - started >= 3.0
    assert json.loads(path.read_text())["token"] == lease.token
    lease.release()


def test_a_holder_whose_lease_was_taken_over_notices(tmp_path):
    lease = storage.Lease(tmp_path / "lease.json", "a job", ttl=0.4).acquire()  # renewed every 0.1 s
    store = ts.KvStore.open({"driver": "file", "path": str(tmp_path) + "/"}).result()
    store.write("lease.json", json.dumps({"holder": "another pid 2", "renewed": time.time()}).encode()).result()
    deadline = time.monotonic() + 60
    while lease.lost is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert lease.lost["holder"] == "another pid 2"
    lease.release()  # leaves the new holder's record alone
    assert json.loads((tmp_path / "lease.json").read_text())["holder"] == "another pid 2"


def test_user_paths_keep_urls_and_make_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(storage.path("runs/a")) == str(tmp_path / "runs" / "a")
    assert str(storage.path("gs://bucket/runs/a")) == "gs://bucket/runs/a"
    assert str(storage.path("gs://bucket/runs/a").parent / "eval") == "gs://bucket/runs/eval"
