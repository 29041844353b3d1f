"""A client for a reward model served over HTTP (e.g. Skywork-VL-Reward-7B behind an endpoint).

Protocol (JSON over POST): request ``{"inputs": [{"prompt": str, "response": str,
"images": [str, ...]}, ...]}``, response ``{"scores": [float, ...]}`` in the same order.

Requests are batched (``batch_size`` items). Each attempt has a **total deadline**
(``deadline`` seconds, default ``timeout``) covering connect, send, headers and body: a
watchdog shuts the socket at the deadline, so a server that trickles one byte a second
cannot hold a request longer (``timeout`` alone bounds each socket operation). Timeouts,
deadline overruns (both counted as ``timeouts``, the latter also as ``deadline_exceeded``),
transport errors (refused or reset connections, ``IncompleteRead``, a
bad status line...) and 5xx answers are retried with exponential backoff (``retries``
times); a 4xx answer or a malformed body (not JSON, wrong length, a score that is not a
finite number: NaN and ±inf are refused) is not retried. When a batch finally fails its
items score None, and :meth:`RemoteScorer.score_groups` skips (returns None for) every group
that has one: the caller drops the group and ``stats`` say how many and why.

**Circuit breaker**: after ``breaker_after`` failed batches in a row the scorer stops calling
the server for ``breaker_cooldown`` seconds (those batches fail at once, counted as
``short_circuited``); then one trial batch is sent, and its success closes the breaker.
Nothing is raised.
"""

from __future__ import annotations

import collections
import http.client
import json
import logging
import math
import socket
import threading
import time
import urllib.parse
from typing import Sequence

log = logging.getLogger("r1v2_jax.rewards")


class _Fail(Exception):
    """One attempt's failure: ``kind`` is the stats counter, ``retry`` whether to try again."""

    def __init__(self, kind: str, detail: str, retry: bool, deadline: bool = False):
        super().__init__(detail)
        self.kind, self.retry, self.deadline = kind, retry, deadline


class RemoteScorer:
    def __init__(
        self,
        url: str,
        *,
        batch_size: int = 16,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        deadline: float | None = None,
        breaker_after: int = 5,
        breaker_cooldown: float = 60.0,
    ):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"reward server url: expected http(s)://host[:port]/path, got {url!r}")
        for name, v in (
            ("timeout", timeout),
            ("backoff", backoff),
            ("max_backoff", max_backoff),
            ("breaker_cooldown", breaker_cooldown),
        ) + ((("deadline", deadline),) if deadline else ()):
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"RemoteScorer.{name}: must be a finite number >= 0, got {v!r}")
        if batch_size < 1 or retries < 0 or breaker_after < 0:
            raise ValueError(
                f"RemoteScorer: need batch_size >= 1, retries >= 0, breaker_after >= 0 (0: no breaker), "
                f"got {batch_size}, {retries}, {breaker_after}"
            )
        self.url, self._parts = url, parts
        self.batch_size, self.timeout, self.deadline = batch_size, timeout, deadline or timeout
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self.breaker_after, self.breaker_cooldown = breaker_after, breaker_cooldown
        self.stats: collections.Counter = collections.Counter()
        self._failed_in_a_row = 0
        self._open_until: float | None = None  # the breaker is open until then

    # -- one HTTP exchange under a total deadline ----------------------------------------------
    def _request(self, body: bytes) -> bytes:
        p = self._parts
        conn_cls = http.client.HTTPSConnection if p.scheme == "https" else http.client.HTTPConnection
        conn = conn_cls(p.hostname, p.port, timeout=min(self.timeout, self.deadline))
        expired = threading.Event()

        def shut():  # the deadline: unblock whatever recv/send the exchange is in
            expired.set()
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        watchdog = threading.Timer(self.deadline, shut)
        watchdog.daemon = True
        watchdog.start()
        try:
            path = p.path or "/"
            conn.request(
                "POST",
                path + (f"?{p.query}" if p.query else ""),
                body=body,
                headers={"Content-Type": "application/json"},
            )
            resp = conn.getresponse()
            data = resp.read()
            if expired.is_set():
                raise _Fail("timeouts", f"over the {self.deadline:g} s deadline", True, deadline=True)
            if 500 <= resp.status:
                raise _Fail("server_errors", f"HTTP {resp.status}", True)
            if resp.status >= 400:
                raise _Fail("client_errors", f"HTTP {resp.status}", False)
            return data
        except _Fail:
            raise
        except (OSError, http.client.HTTPException) as e:  # timeouts, refused/reset, IncompleteRead, ...
            if expired.is_set():
                raise _Fail("timeouts", f"over the {self.deadline:g} s deadline", True, deadline=True) from None
            timed_out = isinstance(e, TimeoutError) or "timed out" in str(e)
            raise _Fail("timeouts" if timed_out else "connection_errors", f"{type(e).__name__}: {e}", True) from None
        finally:
            watchdog.cancel()
            conn.close()

    def _parse(self, data: bytes, n: int) -> list[float]:
        try:
            scores = json.loads(data)["scores"]
        except (ValueError, KeyError, TypeError) as e:  # not JSON (or not UTF-8), no "scores"
            raise _Fail("malformed", f"unreadable answer ({type(e).__name__})", False) from None
        if not isinstance(scores, list) or len(scores) != n:
            raise _Fail("malformed", f"expected {n} scores", False)
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in scores):
            raise _Fail("malformed", "a score is not a number", False)
        if not all(math.isfinite(x) for x in scores):
            raise _Fail("non_finite", "a score is NaN or infinite", False)
        return [float(x) for x in scores]

    # -- one batch: retries, breaker ------------------------------------------------------------
    def _post(self, items: list[dict]) -> list[float] | None:
        now = time.monotonic()
        if self._open_until is not None and now < self._open_until:
            self.stats["short_circuited"] += 1
            return None
        try:
            body = json.dumps({"inputs": items}, allow_nan=False).encode()
        except (TypeError, ValueError) as e:
            self.stats["unserializable"] += 1
            self.stats["failed_batches"] += 1
            log.warning("reward server %s: the batch cannot be sent as JSON (%s)", self.url, e)
            return None
        delay = self.backoff
        for attempt in range(self.retries + 1):
            self.stats["requests"] += 1
            if attempt:
                self.stats["retries"] += 1
            try:
                scores = self._parse(self._request(body), len(items))
            except _Fail as f:
                self.stats[f.kind] += 1
                if f.deadline:
                    self.stats["deadline_exceeded"] += 1
                if not f.retry:
                    log.warning("reward server %s: %s, not retried", self.url, f)
                    break
                if attempt < self.retries:
                    time.sleep(delay)
                    delay = min(delay * 2, self.max_backoff)
                continue
            self._failed_in_a_row, self._open_until = 0, None
            return scores
        self.stats["failed_batches"] += 1
        self._failed_in_a_row += 1
        log.warning("reward server %s: batch of %d failed after %d attempt(s)", self.url, len(items), attempt + 1)
        if self.breaker_after and self._failed_in_a_row >= self.breaker_after:
            self._open_until = time.monotonic() + self.breaker_cooldown
            self.stats["breaker_opened"] += 1
            log.warning(
                "reward server %s: %d failed batches in a row, not called for %g s",
                self.url,
                self._failed_in_a_row,
                self.breaker_cooldown,
            )
        return None

    @property
    def breaker_open(self) -> bool:
        return self._open_until is not None and time.monotonic() < self._open_until

    def score(self, items: Sequence[dict]) -> list[float | None]:
        """Scores in order; None for items whose batch failed."""
        out: list[float | None] = []
        for i in range(0, len(items), self.batch_size):
            chunk = list(items[i : i + self.batch_size])
            res = self._post(chunk)
            out.extend(res if res is not None else [None] * len(chunk))
        self.stats["items"] += len(items)
        self.stats["items_failed"] += sum(x is None for x in out)
        return out

    def score_groups(self, groups: Sequence[Sequence[dict]]) -> list[list[float] | None]:
        """Score groups (e.g. the G samples of a prompt); a group with any failed item is None."""
        flat = [it for g in groups for it in g]
        scores = self.score(flat)
        out, k = [], 0
        for g in groups:
            s = scores[k : k + len(g)]
            k += len(g)
            if any(x is None for x in s):
                self.stats["skipped_groups"] += 1
                out.append(None)
            else:
                out.append(s)
        return out
