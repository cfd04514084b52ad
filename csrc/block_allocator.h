// BlockAllocator: reference-counted KV-cache blocks with an LRU free list and prefix caching.
//
// State over block ids 0..num_blocks-1, hot fields together and cold ones apart:
//   slots_[b]             hot: one 32-byte BlockSlot per block (block_slot.h), two per cache line:
//     .refcount             references held (0 = on the free list)
//     .prev, .next          intrusive doubly linked free list, head = least recently freed
//     .hash, .has_hash      the prefix-cache key of block b, if it has one
//     .ahead                a prefetch hint for walking the free list (set as blocks join the list)
//   index_                hash -> block (HashIndex: flat, sized once, never allocates)
//   entries_              cold: a verified entry, what block b holds (prefix_entry.h)
//   seen_, count_         cold: per-call scratch to validate repeated ids (incref, cache_blocks, hits)
// allocate() and free() of one block touch one cache line, its slot, however cold the free list:
// allocate() prefetches ahead along the list, free() validates without scratch (a pass that stops
// at the first bad id and undoes what it did).
// Invariants (check_invariants() verifies all of them):
//   a block is on the free list  <=>  refcount == 0;  num_free_ == length of the free list;
//   has_hash  <=>  index_ maps hash to b;  num_cached_ == number of blocks with a hash.
// The prefix cache is a tree of blocks whose hash is only an index into it: a verified cached block
// records its exact tokens, the salt of its sequence and the stamp (unique, never reused) of the
// cached block before it, so a hit by the *_verified calls requires the same tokens after the very
// same cached prefix, whatever the hash. match_prefix() alone trusts hashes (for callers who verify).
// One std::mutex guards every public call, so calls from several threads (the Python bindings
// release the GIL) are serialised. Every call validates all of its input before changing
// anything: a bad id leaves the allocator exactly as it was. The hot paths (allocate, free,
// incref, match_prefix, cache_blocks) never allocate heap memory.
#pragma once

#include <cstdint>
#include <mutex>

#include "block_hash.h"
#include "block_slot.h"
#include "hash_index.h"
#include "prefix_entry.h"
#include "zeroed_array.h"

namespace kvpool {

struct AllocatorStats {
  int64_t allocations = 0;          // blocks handed out by allocate()
  int64_t frees = 0;                // blocks whose refcount reached 0 in free()
  int64_t increfs = 0;              // references added by incref()
  int64_t prefix_queries = 0;       // match_prefix() calls
  int64_t prefix_query_blocks = 0;  // hashes passed to match_prefix()
  int64_t prefix_hit_blocks = 0;    // blocks returned by match_prefix()
  int64_t cached_blocks_added = 0;  // hashes newly mapped by cache_blocks()
  int64_t evictions = 0;            // cached free blocks re-allocated (their hash forgotten)
  int64_t hash_collisions = 0;      // verified lookups whose hash matched a block holding other tokens
  int64_t high_water_mark = 0;      // most blocks in use (refcount > 0) at any one time
  int64_t num_blocks = 0;           // snapshot at the time of stats()
  int64_t free_blocks = 0;          // snapshot at the time of stats()
  int64_t cached_blocks = 0;        // snapshot at the time of stats()
};

class BlockAllocator {
 public:
  // Refused: num_blocks outside [1, 2^31 - 2], block_size < 1, or num_blocks * block_size > 2^31
  // (slot ids block * block_size + offset are int32 in every kernel).
  // max_num_blocks (-1: num_blocks) is the capacity grow() may reach: every array is sized for it
  // once (zeroed pages, touched only when used), so growing never reallocates.
  BlockAllocator(int64_t num_blocks, int64_t block_size, bool enable_prefix_caching, HashKey hash_key,
                 int64_t max_num_blocks = -1);

  int32_t num_blocks() const;
  int32_t max_num_blocks() const { return max_num_blocks_; }
  int32_t block_size() const { return block_size_; }
  bool prefix_caching() const { return prefix_caching_; }
  HashKey hash_key() const { return hash_key_; }
  // Host bytes that hold verified entries (tokens, stamps, salts); 0 without prefix caching.
  int64_t entry_bytes() const;
  int64_t num_free_blocks() const;
  int64_t num_cached_blocks() const;
  AllocatorStats stats() const;

  // Hands out n blocks (refcount 1), least recently freed first, into out[0, n).
  void allocate(int64_t n, int32_t* out);
  // Drops one reference per id; blocks reaching 0 join the free list tail in reverse order of ids.
  void free(const int32_t* ids, int64_t k);
  // Adds one reference per id; every id must be held already and stay <= kMaxRefcount.
  void incref(const int32_t* ids, int64_t k);
  // out[j] = refcount of ids[j].
  void refcounts(const int32_t* ids, int64_t k, int32_t* out) const;
  // Maps hashes[j] -> ids[j] (held blocks). A hash already mapped keeps its first block.
  void cache_blocks(const int32_t* ids, int64_t k, const uint64_t* hashes, int64_t num_hashes);
  // Longest cached prefix of hashes: writes its block ids to out (capacity k), takes one reference
  // on each (reviving cached free blocks) and returns how many. Trusts the hashes: no verification.
  int64_t match_prefix(const uint64_t* hashes, int64_t k, int32_t* out);

  // ---- verified prefix caching: one sequence's blocks as a chain (prefix_entry.h) -----------
  // Caches ids[0, k), consecutive full blocks of one sequence, as verified entries: hashes[j], the
  // block's tokens tokens[j * block_size, (j + 1) * block_size), the sequence's salt `context`, and
  // `parent`, the chain value of the block before ids[0] (kChainRoot for a sequence's first block).
  // A block whose hash is cached already with the same content is not cached twice (the chain goes
  // on through the cached one); with other content it is a counted collision and caching stops.
  // Returns the chain value after the last block, to pass as `parent` next time (kChainBroken when
  // nothing further can be cached). Validation as cache_blocks().
  uint64_t cache_blocks_verified(const int32_t* ids, int64_t k, const uint64_t* hashes, int64_t num_hashes,
                                 const int32_t* tokens, int64_t num_tokens, uint64_t context, uint64_t parent);
  // Verified prefix hit followed by allocation, all or nothing: the longest prefix of hashes[0, k)
  // whose blocks hold exactly tokens[0, k * block_size) after the same cached prefix (and salt)
  // gives h blocks (h <= min(k, n)), then n - h fresh blocks follow; out[0, n) gets them all.
  // Returns h and writes the chain value after the hits to *chain. OutOfBlocks (nothing changed,
  // statistics included) when the fresh blocks do not fit.
  int64_t allocate_with_prefix(int64_t n, const uint64_t* hashes, int64_t k, const int32_t* tokens,
                               int64_t num_tokens, uint64_t context, int32_t* out, uint64_t* chain);

  // ---- prefix caching across KV-cache groups (SeqTable; docs/allocator.md "Hybrid models") -------
  // A hit of a hybrid model is decided over several groups before any block is taken, so it is
  // found by read-only probes and then taken, all or nothing, by take_cached(), which re-checks every
  // block's stamp (a block evicted and cached again in between has a new one).
  //
  // Chained probe: the verified walk of allocate_with_prefix() over hashes[0, k) (tokens[0, k *
  // block_size)), without taking anything: returns h, the blocks to ids[0, h), their stamps to
  // stamps[0, h); *collided tells whether the walk stopped at a block holding other content.
  int64_t probe_chain(const uint64_t* hashes, int64_t k, const int32_t* tokens, int64_t num_tokens,
                      uint64_t context, int32_t* ids, uint64_t* stamps, bool* collided) const;
  // Anchored probe: block j of hashes[0, k) is verified on its own against parents[j] (the chain
  // value its entry must record), from j = k - 1 down, stopping at the first miss. Returns r, the
  // verified blocks at the end (j in [k - r, k)), written to ids[j] and stamps[j]; *collided as above.
  int64_t probe_anchored(const uint64_t* hashes, int64_t k, const int32_t* tokens, int64_t num_tokens,
                         uint64_t context, const uint64_t* parents, int64_t num_parents, int32_t* ids,
                         uint64_t* stamps, bool* collided) const;
  // One reference on each of ids[0, k) (cached blocks, free or held, each still under stamps[j]) and
  // n fresh blocks into out[0, n), all or nothing. Returns false, with nothing changed, when a block
  // no longer holds the probed entry (another thread evicted it: probe again); OutOfBlocks (nothing
  // changed) when the fresh blocks do not fit next to the revived ones. Counts one prefix query of
  // `query_blocks` hashes that met `collisions` collisions and k hit blocks (probes count nothing,
  // so a refused call leaves the statistics as they were).
  bool take_cached(const int32_t* ids, int64_t k, const uint64_t* stamps, int64_t num_stamps, int64_t n,
                   int32_t* out, int64_t query_blocks, int64_t collisions);
  // cache_blocks_verified() that also writes the chain value after each block to chains[0, k)
  // (kChainBroken from where caching stopped): the anchors of the anchored groups.
  uint64_t cache_blocks_chained(const int32_t* ids, int64_t k, const uint64_t* hashes, int64_t num_hashes,
                                const int32_t* tokens, int64_t num_tokens, uint64_t context, uint64_t parent,
                                uint64_t* chains);
  // Caches each block ids[j] on its own as a verified entry whose parent is parents[j] (skipped when
  // kChainBroken). Same content cached already under the same parent: not cached twice; other content
  // under the hash: a counted collision, a free block replaced, a held one kept (this block uncached).
  void cache_blocks_anchored(const int32_t* ids, int64_t k, const uint64_t* hashes, int64_t num_hashes,
                             const int32_t* tokens, int64_t num_tokens, uint64_t context, const uint64_t* parents,
                             int64_t num_parents);

  // ---- elastic pools (allocator_elastic.cpp; docs/elastic.md) -------------------------------------
  // The live ids are always [0, num_blocks): grow() appends ids at the top, shrink() removes the top.
  // Adds ids [num_blocks, num_blocks + n) to the free list TAIL: the free ids already there (the low
  // ones) are handed out first, so the top stays free and a later shrink() is cheap.
  void grow(int64_t n);
  // Removes the top n ids, which must all be free (OutOfBlocks naming how many are held otherwise,
  // nothing changed); their cached hashes and verified entries are evicted.
  void shrink(int64_t n);
  // How many of the top n ids are held (refcount > 0).
  int64_t held_in_top(int64_t n) const;
  // Length of the run of free ids at the top: the most shrink() can release now.
  int64_t free_top_blocks() const;
  // Moves every held block of the top n ids to a free id below num_blocks - n (taken in free-list
  // order, least recently freed first; a cached one is evicted): refcount, hash and verified entry
  // (same stamp) go along; the vacated top ids join the free list tail in id order. Writes the moved
  // pairs, ascending by src, to src[0, m) / dst[0, m) (capacity n) and returns m. OutOfBlocks, nothing
  // changed, when fewer than m free ids lie below. The caller copies the blocks' contents and fixes
  // every table that names a src id (SeqTable::relocate_top does both halves for its tables).
  int64_t relocate_top(int64_t n, int32_t* src, int32_t* dst);

  // Throws InvariantBroken naming the first broken invariant. O(num_blocks); for tests.
  void check_invariants() const;

 private:
  void check_ids(const char* fn, const int32_t* ids, int64_t k) const;
  void check_cacheable(const char* fn, const int32_t* ids, int64_t k, const uint64_t* hashes, int64_t num_hashes);
  void check_new_references(const char* fn, const int32_t* ids, int64_t k);
  [[noreturn]] void refuse_free(const int32_t* ids, int64_t k);
  int64_t walk_verified(const uint64_t* hashes, int64_t k, const int32_t* tokens, uint64_t context, int32_t* out,
                        bool* collided, uint64_t* stamps = nullptr) const;
  uint64_t cache_chain(const int32_t* ids, int64_t k, const uint64_t* hashes, const int32_t* tokens, uint64_t context,
                       uint64_t parent, uint64_t* chains);
  // Caches held block b (uncached) under hash as a verified entry after `parent`, unless the same entry
  // is cached already; returns the chain value after b (kChainBroken when a held block keeps the hash).
  uint64_t cache_verified_one(int32_t b, uint64_t hash, const int32_t* tokens, uint64_t context, uint64_t parent);
  void take_hits(const int32_t* ids, int64_t h);
  void pop_free(int64_t n, int32_t* out);
  void cache_one(int32_t b, uint64_t hash);
  uint32_t next_epoch();
  void unlink(int32_t b);
  // free()'s single pass: false, with everything as it was, at the first bad id (from the end).
  bool drop_references(const int32_t* ids, int64_t k);
  void forget_hash(int32_t b);
  void note_used();
  void check_top(const char* fn, int64_t n) const;
  void check_invariants_above_top() const;

  int32_t num_blocks_;
  int32_t max_num_blocks_;
  int32_t block_size_;
  bool prefix_caching_;
  HashKey hash_key_;

  BlockSlots slots_;
  PrefixEntries entries_;
  // Scratch for duplicate detection within one call: seen_[b] == epoch_ marks b as seen in this
  // call, and then count_[b] holds how often (new references) or where (cache_blocks).
  ZeroedArray<uint32_t> seen_;
  ZeroedArray<int64_t> count_;
  uint32_t epoch_ = 0;

  int32_t head_ = -1;
  int32_t tail_ = -1;
  // The last kPrefetchAhead blocks pushed onto the free list (-1: none). The oldest, at
  // recent_[pushes_ % kPrefetchAhead], gets the next block pushed as its `ahead` hint.
  int32_t recent_[kPrefetchAhead];
  uint32_t pushes_ = 0;
  int64_t num_free_ = 0;
  int64_t num_cached_ = 0;
  HashIndex index_;
  AllocatorStats stats_;
  mutable std::mutex mu_;
};

}  // namespace kvpool
