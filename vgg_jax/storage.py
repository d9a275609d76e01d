"""A user's storage, local or gs://: ``path`` (every user-given location goes through etils.epath) and ``Lease``
(one holder at a time of a workdir or a data_dir, atomic on local disks and on GCS).

docs/architecture.md#storage
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from absl import logging
from etils import epath

from vgg_jax.errors import UserError

PathLike = str | os.PathLike


def path(location: PathLike) -> epath.Path:
    """A user-given location as an ``epath.Path``: a local path made absolute (orbax needs that), a URL
    (``gs://bucket/dir``) kept as it is. Read and write it through the Path's methods only."""
    text = os.fspath(location)
    return epath.Path(text) if "://" in text else epath.Path(text).absolute()


# ----------------------------------------------------------------------------------------------
# Leases. A lease is one small JSON object (a file, or a GCS object) naming its holder. It is taken and
# renewed only by conditional writes (tensorstore kvstore ``if_equal``: on GCS the request carries
# ``ifGenerationMatch``, so the object store itself lets one writer win; the ``file`` driver does the same
# with a lock and an atomic rename), so two processes can never both hold it. The holder renews it every
# ``ttl / 4`` seconds from a background thread; a lease not renewed for ``ttl`` is expired and may be taken
# over, so a crashed holder never leaves it stuck. On the holder's own host a dead holder is seen at once
# (its process is gone); from another host, by the lease not changing for ``ttl`` seconds.

TTL = 60.0  # seconds without a renewal after which a lease is expired
HOST = socket.gethostname()


class LeaseHeld(UserError):
    """Another live process holds the lease; the message names it."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kvstore(directory: epath.Path) -> Any:
    import tensorstore as ts

    text = os.fspath(directory).rstrip("/") + "/"
    if text.startswith("gs://"):
        return ts.KvStore.open(text).result()
    if "://" in text:
        raise UserError(f"{text}: leases (the workdir and data preparation locks) need a local path or gs://.")
    return ts.KvStore.open({"driver": "file", "path": text}).result()


class Lease:
    """``with Lease(path, 'what it guards').acquire(wait=s):`` holds the lease at ``path`` (released at the end);
    ``LeaseHeld`` names the holder if another live process keeps it for more than ``wait`` seconds."""

    def __init__(self, location: PathLike, what: str, ttl: float = TTL):
        self.path = path(location)
        self.what = what
        self.ttl = ttl
        self.token = uuid.uuid4().hex
        self.lost: dict[str, Any] | None = None  # the record that replaced ours, if the lease was taken over
        self._store = _kvstore(self.path.parent)
        self._generation: bytes | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._since = time.time()

    # -- the record

    def _read(self) -> tuple[dict[str, Any] | None, bytes]:
        result = self._store.read(self.path.name).result()
        if result.state != "value":
            return None, result.stamp.generation
        try:
            record = json.loads(result.value)
        except ValueError:
            record = {"released": True}  # unreadable: nobody can be holding it
        return record, result.stamp.generation

    def _write(self, if_equal: bytes, **fields: Any) -> bytes | None:
        record = dict(
            holder=f"{HOST} pid {os.getpid()}", host=HOST, pid=os.getpid(), token=self.token, what=self.what,
            since=self._since, renewed=time.time(), ttl=self.ttl, **fields,
        )  # fmt: skip
        stamp = self._store.write(self.path.name, json.dumps(record).encode(), if_equal=if_equal).result()
        return stamp.generation or None  # an empty generation: the condition failed, nothing was written

    def _free(self, record: dict[str, Any] | None) -> bool | None:
        """True: nobody holds it; False: a live process does; None: cannot tell yet (a holder on another host
        whose lease has not expired: watch whether it is renewed)."""
        if record is None or record.get("released"):
            return True
        if time.time() - float(record.get("renewed", 0)) > 2 * float(record.get("ttl", self.ttl)):
            return True  # expired even if the clocks of the two hosts differ by up to ttl
        if record.get("host") == HOST:
            return not _alive(int(record.get("pid", 0)))
        return None

    def holder(self) -> dict[str, Any] | None:
        """The record of the process that holds the lease now (or may: on another host, not yet lapsed); None
        if it is free. Only reads."""
        record, _ = self._read()
        return None if self._free(record) is True else record

    def describe(self, record: dict[str, Any]) -> str:
        age = max(0.0, time.time() - float(record.get("renewed", 0)))
        since = time.ctime(float(record.get("since", 0)))
        return f"{record.get('holder', '?')} since {since} (lease {self.path}, renewed {age:.0f} s ago)"

    # -- taking, renewing, releasing

    def try_acquire(self, watched: dict[bytes, float] | None = None) -> dict[str, Any] | None:
        """Takes the lease if nobody holds it (None); else the holder's record, with ``unknown`` set while a holder
        on another host may be dead. ``watched`` (generation -> when first seen), kept across calls by a caller
        that polls, tells: a lease renewed meanwhile is live, one unchanged for ``ttl`` seconds is expired."""
        watched = {} if watched is None else watched
        while True:
            record, generation = self._read()
            free = self._free(record)
            if free is None:
                first = watched.setdefault(generation, time.monotonic())
                if len(watched) > 1:
                    return record  # renewed while we watched: live
                if time.monotonic() - first <= self.ttl:
                    return {**record, "unknown": True}
                free = True
            if not free:
                return record
            self._since = time.time()
            written = self._write(generation)
            if written:
                if record is not None and not record.get("released"):
                    logging.warning("Took over the expired lease of %s for %s.", self.describe(record), self.what)
                self._generation = written
                self._stop.clear()
                self._thread = threading.Thread(target=self._renew, name=f"lease {self.path}", daemon=True)
                self._thread.start()
                return None
            # Another process wrote it between our read and our write: read again.

    def acquire(self, wait: float = 0.0, advice: str = "", poll: float = 1.0) -> Lease:
        """Takes the lease, waiting up to ``wait`` seconds for a live holder to let go; else LeaseHeld naming the
        holder, then ``advice``."""
        started, watched, logged = time.monotonic(), {}, -60.0
        while True:
            holder = self.try_acquire(watched)
            if holder is None:
                return self
            waited = time.monotonic() - started
            if not holder.get("unknown"):
                if waited >= wait:
                    after = f" (waited {waited / 60:.0f} min)" if wait else ""
                    what = str(holder.get("what") or self.what)
                    raise LeaseHeld(
                        f"{what[0].upper()}{what[1:]} is already under way: {self.describe(holder)}{after}. "
                        f"{advice} A crashed holder's lease lapses {self.ttl:.0f} s after its last renewal (at once "
                        "on its own host)."
                    )
                if time.monotonic() - logged >= 60:
                    logging.warning("Waiting for %s: %s.", holder.get("what") or self.what, self.describe(holder))
                    logged = time.monotonic()
            time.sleep(poll)

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                written = self._write(self._generation)
            except Exception as e:  # a storage hiccup: try again at the next beat (the lease lasts ttl)
                logging.warning("Could not renew the lease %s (%s); retrying.", self.path, e)
                continue
            if written is None:
                self.lost = self._read()[0] or {}
                logging.error(
                    "Lost the lease %s for %s: %s took it over (this process stalled for over %.0f s).",
                    self.path,
                    self.what,
                    self.lost.get("holder", "another process"),
                    self.ttl,
                )
                return
            self._generation = written

    def release(self) -> None:
        """Ends the heartbeat and marks the lease released (if it is still ours)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        if self.lost is None:
            self._write(self._generation, released=True)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
