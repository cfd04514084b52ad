// BlockAllocator's calls for prefix caching across KV-cache groups (block_allocator.h; the algorithm that
// uses them is SeqTable's, seq_table_prefix.cpp; docs/allocator.md "Hybrid models").
//
// A hybrid model's hit is the longest h every group can serve, decided before any block is taken:
// read-only probes (a verified chain walk, or blocks each verified against a given parent stamp), then
// one locked take_cached() that takes the hits and the fresh blocks together, all or nothing. Stamps
// are never reused, so take_cached() knows a probed block still holds what was verified.
#include <string>

#include "allocator_checks.h"
#include "block_allocator.h"
#include "errors.h"

namespace kvpool {

using std::to_string;

int64_t BlockAllocator::probe_chain(const uint64_t* hashes, int64_t k, const int32_t* tokens, int64_t num_tokens,
                                    uint64_t context, int32_t* ids, uint64_t* stamps, bool* collided) const {
  std::lock_guard<std::mutex> lock(mu_);
  const char* fn = "probe_chain()";
  check_count(fn, k);
  check_token_count(fn, num_tokens, k, block_size_);
  *collided = false;
  return prefix_caching_ ? walk_verified(hashes, k, tokens, context, ids, collided, stamps) : 0;
}

int64_t BlockAllocator::probe_anchored(const uint64_t* hashes, int64_t k, const int32_t* tokens, int64_t num_tokens,
                                       uint64_t context, const uint64_t* parents, int64_t num_parents, int32_t* ids,
                                       uint64_t* stamps, bool* collided) const {
  std::lock_guard<std::mutex> lock(mu_);
  const char* fn = "probe_anchored()";
  check_count(fn, k);
  check_token_count(fn, num_tokens, k, block_size_);
  check_per_block(fn, "parents", num_parents, k);
  *collided = false;
  if (!prefix_caching_) return 0;
  int64_t j = k - 1;
  for (; j >= 0; --j) {
    const int32_t b = index_.find(hashes[j]);
    if (b < 0) break;
    const int32_t* t = tokens + j * int64_t{block_size_};
    if (!entries_.holds(b, t, context, parents[j])) {
      *collided = entries_.verified(b) && !entries_.same_content(b, t, context);
      break;
    }
    ids[j] = b;
    stamps[j] = entries_.stamp(b);
  }
  return k - 1 - j;
}

bool BlockAllocator::take_cached(const int32_t* ids, int64_t k, const uint64_t* stamps, int64_t num_stamps, int64_t n,
                                 int32_t* out, int64_t query_blocks, int64_t collisions) {
  std::lock_guard<std::mutex> lock(mu_);
  const char* fn = "take_cached()";
  check_count(fn, k);
  if (n < 0) throw InvalidArgument(std::string(fn) + ": n=" + to_string(n) + " must be >= 0 (fresh blocks wanted)");
  check_per_block(fn, "stamps", num_stamps, k);
  if (query_blocks < 0 || collisions < 0) {
    throw InvalidArgument(std::string(fn) + ": query_blocks=" + to_string(query_blocks) + " and collisions=" +
                          to_string(collisions) + " must be >= 0");
  }
  check_ids(fn, ids, k);
  const uint32_t epoch = next_epoch();
  for (int64_t j = 0; j < k; ++j) {
    const int32_t b = ids[j];
    if (seen_[b] == epoch) {
      throw InvalidArgument(std::string(fn) + ": block " + to_string(b) + " (position " + to_string(j) +
                            ") is listed twice; a sequence takes each cached block once");
    }
    seen_[b] = epoch;
  }
  int64_t revived = 0;
  for (int64_t j = 0; j < k; ++j) {
    const int32_t b = ids[j];
    // Evicted (and maybe cached again) since the probe: its stamp changed. Nothing has changed here.
    if (!prefix_caching_ || !slots_[b].has_hash || stamps[j] == 0 || entries_.stamp(b) != stamps[j]) return false;
    if (slots_[b].refcount >= kMaxRefcount) {
      throw InvalidArgument(std::string(fn) + ": block " + to_string(b) + " (position " + to_string(j) +
                            ") already has 2147483647 references; one more would overflow its int32 refcount");
    }
    revived += slots_[b].refcount == 0;
  }
  const int64_t available = num_free_ - revived;
  if (n > available) {
    throw OutOfBlocks(std::string(fn) + ": " + to_string(k) + " blocks are cached, the other " + to_string(n) +
                          " need new blocks but only " + to_string(available) + " are free; free finished "
                          "sequences (or preempt one) and retry, or build a larger pool",
                      n, available);
  }
  take_hits(ids, k);
  pop_free(n, out);
  ++stats_.prefix_queries;
  stats_.prefix_query_blocks += query_blocks;
  stats_.prefix_hit_blocks += k;
  stats_.hash_collisions += collisions;
  note_used();
  return true;
}

uint64_t BlockAllocator::cache_blocks_chained(const int32_t* ids, int64_t k, const uint64_t* hashes,
                                              int64_t num_hashes, const int32_t* tokens, int64_t num_tokens,
                                              uint64_t context, uint64_t parent, uint64_t* chains) {
  std::lock_guard<std::mutex> lock(mu_);
  const char* fn = "cache_blocks_chained()";
  check_cacheable(fn, ids, k, hashes, num_hashes);
  check_token_count(fn, num_tokens, k, block_size_);
  if (!prefix_caching_) {
    for (int64_t j = 0; j < k; ++j) chains[j] = kChainBroken;
    return kChainBroken;
  }
  return cache_chain(ids, k, hashes, tokens, context, parent, chains);
}

void BlockAllocator::cache_blocks_anchored(const int32_t* ids, int64_t k, const uint64_t* hashes, int64_t num_hashes,
                                           const int32_t* tokens, int64_t num_tokens, uint64_t context,
                                           const uint64_t* parents, int64_t num_parents) {
  std::lock_guard<std::mutex> lock(mu_);
  const char* fn = "cache_blocks_anchored()";
  check_count(fn, k);
  check_per_block(fn, "parents", num_parents, k);  // the counts first, then the blocks
  check_cacheable(fn, ids, k, hashes, num_hashes);
  check_token_count(fn, num_tokens, k, block_size_);
  if (!prefix_caching_) return;
  for (int64_t j = 0; j < k; ++j) {
    // Without its anchor (the reference chain broke there) a block cannot be verified later: skip it.
    // A block cached already is a hit of this sequence (or of its fork twin): its entry stays.
    if (parents[j] == kChainBroken || slots_[ids[j]].has_hash) continue;
    cache_verified_one(ids[j], hashes[j], tokens + j * int64_t{block_size_}, context, parents[j]);
  }
}

}  // namespace kvpool
