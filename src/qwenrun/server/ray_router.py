"""Prefix-aware replica choice for Ray Serve: a custom request router (``ray.serve.request_router``).

Ray Serve runs this class inside every handle to the engine deployment (the ingress holds one) and
asks it, per request, for ranked groups of replicas; Serve itself then probes queue lengths,
picks the least-loaded replica of the first group that accepts, retries and backs off. Our part is
only the ranking:

- A request whose routing key (the conversation or prompt text, computed by the ingress) shares a
  long enough prefix with an earlier request goes first to the replica that served that one: its
  prefix cache holds the KV blocks of that prefix, so the prefill is skipped there. Prefixes are
  remembered as chained hashes of fixed-size chunks (like the engine's own block hashes, in
  characters instead of tokens), bounded in number (least recently used dropped first).
- Unless that replica is busier than the least-loaded one by more than ``imbalance`` queued
  requests: then load wins (affinity must not pile a popular system prompt onto one replica).
- Requests with no useful prefix match rank every replica together: Serve's least-loaded choice.
- A request naming a ``target`` replica (the ingress's per-replica /metrics and /health calls)
  goes to that replica only.
"""
from __future__ import annotations

import logging
import random
from collections import OrderedDict
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

log = logging.getLogger("qwenrun.server")

KEY_KW = "prefix"  # handle_http(req, prefix=...): the routing key
TARGET_KW = "target"  # metrics(target=...): one replica's unique id


def chunk_hashes(key: str, chunk_chars: int) -> list[int]:
    """Chained hashes of the key's complete chunks: entry i identifies the prefix key[:(i+1)*chunk]."""
    out, h = [], 0
    for i in range(0, len(key) - chunk_chars + 1, chunk_chars):
        h = hash((h, key[i:i + chunk_chars]))
        out.append(h)
    return out


class PrefixAffinityRouter(RequestRouter):
    def initialize_state(self, chunk_chars: int = 64, min_match_chars: int = 256, imbalance: int = 4,
                         max_entries: int = 200_000, **_: Any) -> None:
        self.chunk_chars = int(chunk_chars)
        self.min_match_chunks = max(1, int(min_match_chars) // self.chunk_chars)
        self.imbalance = int(imbalance)
        self.max_entries = int(max_entries)
        self._owner: OrderedDict[int, ReplicaID] = OrderedDict()  # prefix hash -> replica that last served it
        self.stats = {"affinity": 0, "balanced": 0, "overloaded": 0}

    def _load(self, rid: ReplicaID) -> int:
        n = self.replica_queue_len_cache.get(rid)
        return 0 if n is None else n

    @staticmethod
    def _shuffled(replicas: list[RunningReplica]) -> list[RunningReplica]:
        """Serve takes the least-loaded replica of a rank, ties in list order. A burst of requests
        arrives before any queue length is refreshed (all equal), so a fixed order would send the
        whole burst to one replica; a random order breaks the ties the way power-of-two choices
        does."""
        return random.sample(replicas, len(replicas))

    def _match(self, hashes: list[int], live: dict[ReplicaID, RunningReplica]) -> tuple[ReplicaID | None, int]:
        """The live replica holding the longest remembered prefix, and its length in chunks."""
        for n in range(len(hashes), self.min_match_chunks - 1, -1):
            rid = self._owner.get(hashes[n - 1])
            if rid is not None and rid in live:
                return rid, n
        return None, 0

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is None:
            return [candidate_replicas]
        pending_request.routing_context.should_backoff = True  # every rank tried: back off, then retry
        kw = pending_request.kwargs
        target = kw.get(TARGET_KW)
        if target is not None:
            chosen = [r for r in candidate_replicas if r.replica_id.unique_id == target]
            if not chosen:
                log.warning("replica %s is not among %s", target, [r.replica_id.unique_id for r in candidate_replicas])
            return [chosen]
        key = kw.get(KEY_KW) or ""
        live = {r.replica_id: r for r in candidate_replicas}
        rid, n = self._match(chunk_hashes(key, self.chunk_chars), live) if len(live) > 1 else (None, 0)
        if rid is None:
            self.stats["balanced"] += 1
            return [self._shuffled(candidate_replicas)]
        least = min(self._load(r) for r in live)
        if self._load(rid) - least > self.imbalance:
            self.stats["overloaded"] += 1
            return [self._shuffled(candidate_replicas)]
        self.stats["affinity"] += 1
        return [[live[rid]], [r for r in candidate_replicas if r.replica_id != rid]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        """The request went to ``replica_id``: its prefixes now live there."""
        key = pending_request.kwargs.get(KEY_KW)
        if not key:
            return
        owner = self._owner
        for h in chunk_hashes(key, self.chunk_chars):
            owner[h] = replica_id
            owner.move_to_end(h)
        while len(owner) > self.max_entries:
            owner.popitem(last=False)
