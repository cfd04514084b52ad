// BlockAllocator: reference-counted KV-cache blocks with an LRU free list and prefix caching.
//
// Struct-of-arrays over block ids 0..num_blocks-1:
//   refcount_[b]          references held (0 = on the free list)
//   prev_[b], next_[b]    intrusive doubly linked free list, head = least recently freed
//   hash_[b], has_hash_[b] the prefix-cache key of block b, if it has one
//   index_                hash -> block (HashIndex: flat, sized once, never allocates)
// Invariants (check_invariants() verifies all of them):
//   a block is on the free list  <=>  refcount_ == 0;  num_free_ == length of the free list;
//   has_hash_[b]  <=>  index_ maps hash_[b] to b;  num_cached_ == number of blocks with a hash.
// One std::mutex guards every public call, so calls from several threads (the Python bindings
// release the GIL) are serialised. Every call validates all of its input before changing
// anything: a bad id leaves the allocator exactly as it was. The hot paths (allocate, free,
// incref, match_prefix, cache_blocks) never allocate heap memory.
#pragma once

#include <cstdint>
#include <mutex>

#include "hash_index.h"
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
  int64_t high_water_mark = 0;      // most blocks in use (refcount > 0) at any one time
  int64_t free_blocks = 0;          // snapshot at the time of stats()
  int64_t cached_blocks = 0;        // snapshot at the time of stats()
};

class BlockAllocator {
 public:
  BlockAllocator(int64_t num_blocks, int64_t block_size, bool enable_prefix_caching);

  int32_t num_blocks() const { return num_blocks_; }
  int32_t block_size() const { return block_size_; }
  bool prefix_caching() const { return prefix_caching_; }
  int64_t num_free_blocks() const;
  int64_t num_cached_blocks() const;
  AllocatorStats stats() const;

  // Hands out n blocks (refcount 1), least recently freed first, into out[0, n).
  void allocate(int64_t n, int32_t* out);
  // Drops one reference per id; blocks reaching 0 join the free list tail in reverse order of ids.
  void free(const int32_t* ids, int64_t k);
  // Adds one reference per id; every id must be held already.
  void incref(const int32_t* ids, int64_t k);
  // out[j] = refcount of ids[j].
  void refcounts(const int32_t* ids, int64_t k, int32_t* out) const;
  // Maps hashes[j] -> ids[j] (held blocks). A hash already mapped keeps its first block.
  void cache_blocks(const int32_t* ids, int64_t k, const uint64_t* hashes, int64_t num_hashes);
  // Longest cached prefix of hashes: writes its block ids to out (capacity k), takes one reference
  // on each (reviving cached free blocks) and returns how many.
  int64_t match_prefix(const uint64_t* hashes, int64_t k, int32_t* out);

  // Throws InvariantBroken naming the first broken invariant. O(num_blocks); for tests.
  void check_invariants() const;

 private:
  void check_ids(const char* fn, const int32_t* ids, int64_t k) const;
  uint32_t next_epoch();
  void unlink(int32_t b);
  void push_tail(int32_t b);
  void forget_hash(int32_t b);
  void note_used();

  int32_t num_blocks_;
  int32_t block_size_;
  bool prefix_caching_;

  ZeroedArray<int32_t> refcount_;
  ZeroedArray<int32_t> prev_;
  ZeroedArray<int32_t> next_;
  ZeroedArray<uint64_t> hash_;
  ZeroedArray<uint8_t> has_hash_;
  // Scratch for duplicate detection within one call: seen_[b] == epoch_ marks b as seen in
  // this call, and then count_[b] holds how often (free) or where (cache_blocks).
  ZeroedArray<uint32_t> seen_;
  ZeroedArray<int64_t> count_;
  uint32_t epoch_ = 0;

  int32_t head_ = -1;
  int32_t tail_ = -1;
  int64_t num_free_ = 0;
  int64_t num_cached_ = 0;
  HashIndex index_;
  AllocatorStats stats_;
  mutable std::mutex mu_;
};

}  // namespace kvpool
