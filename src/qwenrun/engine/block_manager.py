"""KV block manager with prefix caching (pure Python, no torch).

Blocks hold ``block_size`` tokens of KV. A block is shared by reference count. A *full* block whose
KV has been computed is registered in the prefix cache under a chained hash
``hash((parent_hash, tokens))``; a later sequence with the same leading tokens reuses it, after its
token ids are compared (a hash match alone is never trusted). Free blocks sit in one LRU queue:
never-cached blocks at the front (handed out first), cached ones appended at the back as they are
released, so the least recently used cached block is evicted first and only unreferenced blocks
are ever evicted."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set while registered in the prefix cache
    parent_hash: int | None = None
    token_ids: tuple[int, ...] | None = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("the KV pool must hold at least one block")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block_id
        # Statistics for /metrics.
        self.prefix_queries = 0  # tokens looked up
        self.prefix_hits = 0  # tokens found

    # -- queries ------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by live sequences (cached-but-free blocks count as free)."""
        return 1.0 - len(self.free) / len(self.blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @staticmethod
    def chain_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
        return hash((parent, tokens))

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding seq's leading tokens. At least one token is always left to
        compute, so the last prompt token's logits exist and no shared block is written."""
        if not self.enable_prefix_caching or seq.wants_prompt_logprobs:
            return []
        bs = self.block_size
        max_blocks = (seq.num_tokens - 1) // bs
        hits, parent = [], None
        for i in range(max_blocks):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = self.chain_hash(parent, tokens)
            bid = self.cached.get(h)
            if bid is None:
                break
            b = self.blocks[bid]
            if b.token_ids != tokens or b.parent_hash != parent:
                break  # hash collision: never trust a hash alone
            hits.append(bid)
            parent = h
        self.prefix_queries += seq.num_tokens
        self.prefix_hits += len(hits) * bs
        return hits

    def can_allocate(self, seq: Sequence, num_new_tokens: int, hits: list[int] = ()) -> bool:
        """Whether seq can hold ``num_new_tokens`` more computed tokens (after taking ``hits``)."""
        have = len(seq.block_table) + len(hits)
        base = seq.num_computed_tokens if not hits else len(hits) * self.block_size
        need = self.blocks_needed(base + num_new_tokens) - have
        # Hits sitting in the free queue are taken from it, so they reduce what is free.
        hits_free = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return need <= len(self.free) - hits_free

    # -- mutations ----------------------------------------------------------------------------
    def allocate(self, seq: Sequence, num_new_tokens: int, hits: list[int] = ()) -> None:
        """Give seq the blocks for ``num_new_tokens`` more tokens; ``hits`` come first (admission)."""
        if hits:
            assert not seq.block_table, "prefix hits are only taken at admission"
            parent = None
            for bid in hits:
                b = self.blocks[bid]
                if b.ref_count == 0:
                    del self.free[bid]
                b.ref_count += 1
                seq.block_table.append(bid)
                seq.block_hashes.append(b.hash)
                parent = b.hash
            seq.num_hashed_blocks = len(hits)
            seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if need > len(self.free):
            raise RuntimeError("allocate() called without can_allocate()")
        for _ in range(need):
            bid, _ = self.free.popitem(last=False)
            b = self.blocks[bid]
            if b.hash is not None:  # evict: it stops being findable
                if self.cached.get(b.hash) == bid:
                    del self.cached[b.hash]
                b.hash = b.parent_hash = b.token_ids = None
            b.ref_count = 1
            seq.block_table.append(bid)

    def commit(self, seq: Sequence) -> None:
        """Register seq's newly completed full blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = min(seq.num_computed_tokens, seq.num_tokens) // bs
        while seq.num_hashed_blocks < full:
            i = seq.num_hashed_blocks
            parent = seq.block_hashes[i - 1] if i else None
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = self.chain_hash(parent, tokens)
            b = self.blocks[seq.block_table[i]]
            if b.hash is None and h not in self.cached:
                b.hash, b.parent_hash, b.token_ids = h, parent, tokens
                self.cached[h] = b.block_id
            # else: an identical block is already cached (computed concurrently): keep that one.
            seq.block_hashes.append(h)
            seq.num_hashed_blocks += 1

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Keep only the blocks that positions [0, num_tokens) need; release the tail (speculative
        decoding rolls back the slots of rejected tokens). Their KV is never read: a slot past
        ``num_computed_tokens`` is rewritten before any attention sees it, and only blocks full
        of computed tokens are ever registered in the prefix cache."""
        keep = self.blocks_needed(num_tokens)
        assert keep >= seq.num_hashed_blocks, "cannot truncate into prefix-cached blocks"
        while len(seq.block_table) > keep:
            self._release(seq.block_table.pop())

    def _release(self, bid: int) -> None:
        """Drop one reference to block ``bid``; at zero it joins the free list (uncached blocks at
        the front: handed out before any cached block is evicted)."""
        b = self.blocks[bid]
        b.ref_count -= 1
        assert b.ref_count >= 0, f"block {bid} released twice"
        if b.ref_count == 0:
            self.free[bid] = None
            if b.hash is None:
                self.free.move_to_end(bid, last=False)

    def free_seq(self, seq: Sequence) -> None:
        """Release all of seq's blocks. Tail blocks are released first so that, among a
        sequence's cached blocks, the deepest (least reusable) are evicted first."""
        for bid in reversed(seq.block_table):
            self._release(bid)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_hashed_blocks = 0

    def reset_prefix_cache(self) -> None:
        """Forget every unreferenced cached block. They become plain free blocks and, like any
        uncached block, move to the front of the queue: reused before never-touched blocks, whose
        memory a CPU pool has not even mapped yet (a 4B model's first touch of fp32 KV costs ~0.4
        ms per token on a VM)."""
        for h, bid in list(self.cached.items()):
            b = self.blocks[bid]
            if b.ref_count == 0:
                del self.cached[h]
                b.hash = b.parent_hash = b.token_ids = None
                self.free.move_to_end(bid, last=False)
