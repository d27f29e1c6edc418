"""A multi-process run whose process dies, is lost with its host, or hangs (SIGSTOP) stops everywhere, cleanly.

A collective with a dead peer fails (gloo: "connection closed") or waits until the framework gives up (JAX's
coordination service: a fatal abort with a C++ stack trace after `heartbeat_timeout_seconds`; torch: the
process group's timeout, an hour here). Instead, `PeerWatch` runs two threads in every process: one bumps
this process's counter in the job's key-value store (JAX's coordination service, torch's TCPStore) every
second and reads the others'; one ends the process when a peer's counter has not moved for `timeout`
seconds, or the store itself has not answered for that long (it lives in process 0, or torchrun's agent):

    error: process 1 of 2 stopped responding (no heartbeat for 20 s: killed, lost with its host, or
    stopped). Newest checkpoint: step 8 (.../checkpoints). Run the same command again to resume from it.

and exit status 75 (EX_TEMPFAIL: worth retrying), so a cluster's restart policy, torchrun --max-restarts
or a shell loop restarts the job, which resumes from that checkpoint. Nothing is left half-written that the
next start does not clean up: checkpoint files are written under temporary names and renamed when complete
(orbax's temporary step directories and our `.tmp` files are removed at start). The framework's own
timeouts are set longer, as a backstop.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable, Protocol

EXIT_PEER_LOST = 75          # EX_TEMPFAIL (sysexits.h): a temporary failure, the job may be restarted
INTERVAL = 1.0               # seconds between heartbeats
_DONE = "done"


class KeyValueStore(Protocol):
    """The job's key-value store, as an engine exposes it (every process sees the same keys)."""

    def set(self, key: str, value: str) -> None: ...
    def get(self, key: str) -> str | None: ...       # None: no such key (yet); raises when the store is gone


class PeerWatch:
    """While active (a context manager), ends this process when a peer stops responding (see the module doc).

    index, count: this process and the process count; timeout: seconds without a peer's heartbeat (or an
    answer of the store) before giving up; describe_checkpoint(): the newest checkpoint, for the message.
    """

    def __init__(self, store: KeyValueStore, index: int, count: int, timeout: float,
                 describe_checkpoint: Callable[[], str], exit: Callable[[int], None] = os._exit):
        self.store, self.index, self.count, self.timeout = store, index, count, timeout
        self.describe_checkpoint, self._exit = describe_checkpoint, exit
        self.missing: int | None = None        # the process found missing (the store's host: its index)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _key(self, process: int) -> str:
        return f"vdm/heartbeat/{process}"

    def __enter__(self) -> "PeerWatch":
        now = time.monotonic()
        self._seen = {p: (None, now) for p in range(self.count) if p != self.index}   # process -> (value, when)
        self._store_ok = now
        self._threads = [threading.Thread(target=loop, daemon=True, name=f"vdm-peer-watch-{loop.__name__}")
                         for loop in (self._beat, self._judge)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        """Tells the peers this process is done (a peer finishing later must not take it for lost)."""
        self._stop.set()
        for thread in self._threads:
            thread.join()
        try:
            self.store.set(self._key(self.index), _DONE)
        except Exception:  # the store's host may have finished first: nothing left to tell
            pass

    def settle(self) -> None:
        """Called by the main thread with an error in hand (a collective failed): waits as long as the judge
        may take to find a missing peer (it then ends the process); returns when none is missing, so that
        the caller raises the error after all."""
        deadline = time.monotonic() + self.timeout + 3 * INTERVAL
        while time.monotonic() < deadline and self.missing is None:
            time.sleep(INTERVAL / 4)
        while self.missing is not None:          # the judge is ending the process
            time.sleep(INTERVAL)

    def _beat(self) -> None:
        counter = 0
        while not self._stop.wait(INTERVAL):
            try:
                counter += 1
                self.store.set(self._key(self.index), str(counter))
                values = {p: self.store.get(self._key(p)) for p in self._seen}
            except Exception:  # the store is gone (its host died) or does not answer: the judge decides
                continue
            now = time.monotonic()
            self._store_ok = now
            for p, value in values.items():
                if value != self._seen[p][0]:
                    self._seen[p] = (value, now)

    def _judge(self) -> None:
        while not self._stop.wait(INTERVAL):
            now = time.monotonic()
            if now - self._store_ok > self.timeout:
                self._fire(0, now - self._store_ok, "the job's key-value store (process 0 or the launcher) "
                           "stopped answering")
                return
            for p, (value, when) in sorted(self._seen.items()):
                if value != _DONE and now - when > self.timeout:
                    self._fire(p, now - when, "stopped responding")
                    return

    def _fire(self, process: int, silent: float, what: str) -> None:
        self.missing = process
        subject = f"process {process} of {self.count}" if "store" not in what else ""
        print(f"\nerror: {subject}{' ' if subject else ''}{what} (no heartbeat for {silent:.0f} s: killed, lost "
              f"with its host, or stopped). Newest checkpoint: {self.describe_checkpoint()}. Run the same "
              f"command again to resume from it.", file=sys.stderr, flush=True)
        sys.stdout.flush()
        if self.index == 0:
            time.sleep(2 * INTERVAL)    # process 0 hosts JAX's coordination service: let the others go first
        self._exit(EXIT_PEER_LOST)
