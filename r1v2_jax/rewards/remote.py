"""A client for a reward model served over HTTP (e.g. Skywork-VL-Reward-7B behind an endpoint).

Protocol (JSON over POST): request ``{"inputs": [{"prompt": str, "response": str,
"images": [str, ...]}, ...]}``, response ``{"scores": [float, ...]}`` in the same order.

Requests are batched (``batch_size`` items), each with a ``timeout``; timeouts, connection
errors and 5xx answers are retried with exponential backoff (``retries`` times); a 4xx answer
or a malformed body is not retried. When a batch finally fails its items score None, and
:meth:`RemoteScorer.score_groups` skips (returns None for) every group that has one — the
caller drops the group and the counters say how many and why. Nothing is raised.
"""

from __future__ import annotations

import collections
import json
import logging
import time
import urllib.error
import urllib.request
from typing import Sequence

log = logging.getLogger("r1v2_jax.rewards")


class RemoteScorer:
    def __init__(self, url: str, *, batch_size: int = 16, timeout: float = 30.0, retries: int = 3,
                 backoff: float = 0.5, max_backoff: float = 8.0):
        self.url, self.batch_size, self.timeout = url, batch_size, timeout
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self.stats: collections.Counter = collections.Counter()

    def _post(self, items: list[dict]) -> list[float] | None:
        body = json.dumps({"inputs": items}).encode()
        delay = self.backoff
        for attempt in range(self.retries + 1):
            self.stats["requests"] += 1
            if attempt:
                self.stats["retries"] += 1
            try:
                req = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    out = json.loads(resp.read())
                scores = out["scores"]
                if len(scores) != len(items) or not all(isinstance(x, (int, float)) for x in scores):
                    self.stats["malformed"] += 1
                    log.warning("reward server %s: malformed answer for %d items", self.url, len(items))
                    return None
                return [float(x) for x in scores]
            except urllib.error.HTTPError as e:
                if 400 <= e.code < 500:
                    self.stats["client_errors"] += 1
                    log.warning("reward server %s: HTTP %d, not retried", self.url, e.code)
                    return None
                self.stats["server_errors"] += 1
            except (TimeoutError, OSError) as e:  # URLError, connection refused, socket timeout
                reason = getattr(e, "reason", e)
                self.stats["timeouts" if "timed out" in str(reason) else "connection_errors"] += 1
            except (json.JSONDecodeError, KeyError, TypeError):
                self.stats["malformed"] += 1
                return None
            if attempt < self.retries:
                time.sleep(delay)
                delay = min(delay * 2, self.max_backoff)
        self.stats["failed_batches"] += 1
        log.warning("reward server %s: gave up after %d attempts", self.url, self.retries + 1)
        return None

    def score(self, items: Sequence[dict]) -> list[float | None]:
        """Scores in order; None for items whose batch failed."""
        out: list[float | None] = []
        for i in range(0, len(items), self.batch_size):
            chunk = list(items[i:i + self.batch_size])
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
            s = scores[k:k + len(g)]
            k += len(g)
            if any(x is None for x in s):
                self.stats["skipped_groups"] += 1
                out.append(None)
            else:
                out.append(s)
        return out
