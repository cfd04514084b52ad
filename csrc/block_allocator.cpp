#include "block_allocator.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "allocator_checks.h"
#include "errors.h"

namespace kvpool {
namespace {

using std::to_string;

int32_t checked_num_blocks(int64_t num_blocks) {
  // Ids are int32 and -1 marks the end of the free list, so INT32_MAX - 1 is the largest id.
  if (num_blocks < 1 || num_blocks > std::numeric_limits<int32_t>::max() - 1) {
    throw InvalidArgument("BlockAllocator: num_blocks=" + to_string(num_blocks) +
                          " must be in [1, 2147483646]; size the pool with kvpool.plan_memory() "
                          "or kvpool.size_kv_pool()");
  }
  return static_cast<int32_t>(num_blocks);
}

int32_t checked_block_size(int64_t block_size) {
  if (block_size < 1 || block_size > std::numeric_limits<int32_t>::max()) {
    throw InvalidArgument("BlockAllocator: block_size=" + to_string(block_size) +
                          " must be in [1, 2147483647] tokens per block (typical: 16)");
  }
  return static_cast<int32_t>(block_size);
}

// Slot ids (block * block_size + offset) are int32 in slot_mapping and in every kernel.
int32_t checked_geometry(int64_t num_blocks, int64_t block_size) {
  const int32_t blocks = checked_num_blocks(num_blocks);
  const int32_t size = checked_block_size(block_size);
  if (int64_t{blocks} * size > (int64_t{1} << 31)) {
    throw InvalidArgument("BlockAllocator: num_blocks * block_size = " + to_string(int64_t{blocks} * size) +
                          " tokens exceeds 2147483648, the most slot ids an int32 slot_mapping can address; "
                          "use fewer blocks (one pool per TP shard rarely needs 2**31 tokens) or a smaller "
                          "block_size");
  }
  return blocks;
}

// The capacity: max_num_blocks (-1: num_blocks), at least num_blocks, within the same slot-id bound.
int32_t checked_capacity(int64_t num_blocks, int64_t block_size, int64_t max_num_blocks) {
  if (max_num_blocks == -1) return checked_geometry(num_blocks, block_size);
  if (max_num_blocks < num_blocks) {
    throw InvalidArgument("BlockAllocator: max_num_blocks=" + to_string(max_num_blocks) + " must be >= num_blocks=" +
                          to_string(num_blocks) + " (the capacity grow() may reach; -1 or None: num_blocks)");
  }
  return checked_geometry(max_num_blocks, block_size);
}

}  // namespace

BlockAllocator::BlockAllocator(int64_t num_blocks, int64_t block_size, bool enable_prefix_caching, HashKey hash_key,
                               int64_t max_num_blocks)
    : num_blocks_(checked_geometry(num_blocks, block_size)),
      max_num_blocks_(checked_capacity(num_blocks, block_size, max_num_blocks)),
      block_size_(checked_block_size(block_size)),
      prefix_caching_(enable_prefix_caching),
      hash_key_(hash_key),
      slots_(max_num_blocks_),
      entries_(max_num_blocks_, block_size_, enable_prefix_caching),
      seen_(make_zeroed_array<uint32_t>(max_num_blocks_)),
      count_(make_zeroed_array<int64_t>(max_num_blocks_)),
      index_(enable_prefix_caching ? max_num_blocks_ : 0) {
  // Every block starts free, in id order: allocate(3) on a fresh allocator returns 0, 1, 2. Zeroed
  // slots already link each block to its neighbours by id (block_slot.h); only the last needs an end.
  slots_.set_next(num_blocks_ - 1, -1);
  for (int i = 0; i < kPrefetchAhead; ++i) recent_[i] = std::max(num_blocks_ - kPrefetchAhead + i, -1);
  head_ = 0;
  tail_ = num_blocks_ - 1;
  num_free_ = num_blocks_;
}

int32_t BlockAllocator::num_blocks() const {
  std::lock_guard<std::mutex> lock(mu_);
  return num_blocks_;
}

int64_t BlockAllocator::num_free_blocks() const {
  std::lock_guard<std::mutex> lock(mu_);
  return num_free_;
}

int64_t BlockAllocator::num_cached_blocks() const {
  std::lock_guard<std::mutex> lock(mu_);
  return num_cached_;
}

int64_t BlockAllocator::entry_bytes() const { return entries_.bytes(); }

AllocatorStats BlockAllocator::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  AllocatorStats s = stats_;
  s.num_blocks = num_blocks_;
  s.free_blocks = num_free_;
  s.cached_blocks = num_cached_;
  return s;
}

// ---- free list -----------------------------------------------------------------------------

void BlockAllocator::unlink(int32_t b) {
  const int32_t p = slots_.prev(b), n = slots_.next(b);
  if (p == -1) head_ = n; else slots_.set_next(p, n);
  if (n == -1) tail_ = p; else slots_.set_prev(n, p);
  --num_free_;
}

bool BlockAllocator::drop_references(const int32_t* ids, int64_t k) {
  // The list's tail and the hint ring live in locals: stores into slots_ may alias the members, and
  // each block would otherwise wait for the previous block's stores before reading them back.
  int32_t tail = tail_;
  uint32_t pushes = pushes_;
  int32_t recent[kPrefetchAhead];
  std::copy(recent_, recent_ + kPrefetchAhead, recent);
  const uint32_t num_blocks = static_cast<uint32_t>(num_blocks_);
  int64_t j = k - 1, freed = 0;
  // Reverse order: a sequence freeing its blocks front to back leaves its tail first in line for
  // eviction, so its prefix stays cached longest.
  for (; j >= 0; --j) {
    const int32_t b = ids[j];
    // An id out of range, or one reference too many: stop, and undo the drops below.
    if (static_cast<uint32_t>(b) >= num_blocks || slots_[b].refcount == 0) break;
    if (--slots_[b].refcount != 0) continue;
    slots_.set_prev(b, tail);
    if (tail == -1) head_ = b; else slots_.set_next(tail, b);
    tail = b;
    ++freed;
    // The block pushed kPrefetchAhead pushes ago lies that far before b, unless it left the list.
    int32_t& behind = recent[pushes++ % kPrefetchAhead];
    if (behind >= 0) slots_.set_ahead(behind, b);
    behind = b;
  }
  if (tail != -1) slots_.set_next(tail, -1);
  tail_ = tail;
  num_free_ += freed;
  if (j >= 0) {  // take back the references dropped after position j: everything is as it was
    for (int64_t i = j + 1; i < k; ++i) {
      if (slots_[ids[i]].refcount++ == 0) unlink(ids[i]);
    }
    return false;
  }
  pushes_ = pushes;
  std::copy(recent, recent + kPrefetchAhead, recent_);
  stats_.frees += freed;
  return true;
}

void BlockAllocator::forget_hash(int32_t b) {
  index_.erase(slots_[b].hash);
  slots_[b].has_hash = 0;
  entries_.forget(b);
  --num_cached_;
}

void BlockAllocator::cache_one(int32_t b, uint64_t hash) {
  index_.insert(hash, b);
  slots_[b].hash = hash;
  slots_[b].has_hash = 1;
  ++num_cached_;
  ++stats_.cached_blocks_added;
}

void BlockAllocator::note_used() {
  const int64_t used = num_blocks_ - num_free_;
  if (used > stats_.high_water_mark) stats_.high_water_mark = used;
}

void BlockAllocator::pop_free(int64_t n, int32_t* out) {
  int32_t b = head_;  // a local, as in drop_references
  for (int64_t j = 0; j < n; ++j) {
    prefetch_for_write(&slots_[slots_.ahead(b)]);
    if (slots_[b].has_hash) {  // a cached free block: handing it out evicts its cached content
      forget_hash(b);
      ++stats_.evictions;
    }
    slots_[b].refcount = 1;
    out[j] = b;
    b = slots_.next(b);
  }
  head_ = b;
  if (b == -1) tail_ = -1; else slots_.set_prev(b, -1);
  num_free_ -= n;
  stats_.allocations += n;
}

void BlockAllocator::take_hits(const int32_t* ids, int64_t h) {
  for (int64_t j = 0; j < h; ++j) {
    const int32_t b = ids[j];
    if (slots_[b].refcount == 0) unlink(b);  // revive a cached free block in O(1)
    ++slots_[b].refcount;
  }
}

// ---- validation ----------------------------------------------------------------------------

void BlockAllocator::check_ids(const char* fn, const int32_t* ids, int64_t k) const {
  for (int64_t j = 0; j < k; ++j) {
    if (ids[j] < 0 || ids[j] >= num_blocks_) {
      throw BlockIndexOutOfRange(std::string(fn) + ": block id " + to_string(ids[j]) + " (position " +
                                 to_string(j) + ") is out of range [0, " + to_string(num_blocks_) +
                                 "); pass ids returned by allocate() or match_prefix()");
    }
  }
}

uint32_t BlockAllocator::next_epoch() {
  if (++epoch_ == 0) {  // wrapped after 2^32 calls: old marks could collide, clear them once
    std::memset(seen_.get(), 0, sizeof(uint32_t) * static_cast<size_t>(max_num_blocks_));
    epoch_ = 1;
  }
  return epoch_;
}

void BlockAllocator::check_new_references(const char* fn, const int32_t* ids, int64_t k) {
  // ids may repeat a block: count the references each block would gain in this call.
  const uint32_t epoch = next_epoch();
  for (int64_t j = 0; j < k; ++j) {
    const int32_t b = ids[j];
    if (seen_[b] != epoch) {
      seen_[b] = epoch;
      count_[b] = 0;
    }
    if (slots_[b].refcount + ++count_[b] > kMaxRefcount) {
      throw InvalidArgument(std::string(fn) + ": block " + to_string(b) + " (position " + to_string(j) +
                            ") already has " + to_string(slots_[b].refcount) +
                            " references; one more than 2147483647 would overflow its int32 refcount; "
                            "free references you no longer need (a leak of incref/match_prefix?)");
    }
  }
}

void BlockAllocator::check_cacheable(const char* fn, const int32_t* ids, int64_t k, const uint64_t* hashes,
                                     int64_t num_hashes) {
  check_count(fn, k);
  if (num_hashes != k) {
    throw InvalidArgument(std::string(fn) + ": got " + to_string(k) + " block ids but " + to_string(num_hashes) +
                          " hashes; pass one hash per block (hash_block_tokens() gives one per full block)");
  }
  check_ids(fn, ids, k);
  const uint32_t epoch = next_epoch();
  for (int64_t j = 0; j < k; ++j) {
    const int32_t b = ids[j];
    if (slots_[b].refcount == 0) {
      throw InvalidArgument(std::string(fn) + ": block " + to_string(b) + " (position " + to_string(j) +
                            ") is free (refcount 0); cache blocks while the sequence still holds them");
    }
    // A block's content identity cannot change while it is cached, within this call or across calls.
    uint64_t earlier = 0;
    bool has_earlier = false;
    if (slots_[b].has_hash) {
      earlier = slots_[b].hash;
      has_earlier = true;
    } else if (seen_[b] == epoch) {
      earlier = hashes[count_[b]];
      has_earlier = true;
    }
    if (has_earlier && earlier != hashes[j]) {
      throw InvalidArgument(std::string(fn) + ": block " + to_string(b) + " (position " + to_string(j) +
                            ") is already cached under hash " + to_string(earlier) + ", not " +
                            to_string(hashes[j]) + "; a block keeps one hash until it is evicted");
    }
    if (seen_[b] != epoch) {
      seen_[b] = epoch;
      count_[b] = j;  // where this block's hash sits in `hashes`
    }
  }
}

// ---- public operations ---------------------------------------------------------------------

void BlockAllocator::allocate(int64_t n, int32_t* out) {
  std::lock_guard<std::mutex> lock(mu_);
  if (n < 0) {
    throw InvalidArgument("allocate(): n=" + to_string(n) + " must be >= 0 (the number of blocks wanted)");
  }
  if (n > num_free_) {
    throw OutOfBlocks("allocate(): requested " + to_string(n) + " blocks but only " + to_string(num_free_) +
                          " of " + to_string(num_blocks_) +
                          " are free; free finished sequences (or preempt one) and retry, or build a "
                          "larger pool",
                      n, num_free_);
  }
  pop_free(n, out);
  note_used();
}

void BlockAllocator::free(const int32_t* ids, int64_t k) {
  std::lock_guard<std::mutex> lock(mu_);
  check_count("free()", k);
  // An id may appear several times (one per reference the caller drops), but never more often
  // than its refcount. drop_references() checks ids as it goes (one pass, one cache line per block,
  // no scratch array) and undoes everything at the first bad one; the error is then looked for in
  // order, range first, as the other calls report it.
  if (!drop_references(ids, k)) {
    check_ids("free()", ids, k);
    refuse_free(ids, k);
  }
}

void BlockAllocator::refuse_free(const int32_t* ids, int64_t k) {
  // Find the first id in order that would drop a reference the block does not hold, by dropping
  // them one by one (the references are restored before the error is thrown).
  int64_t j = 0;
  while (j < k && slots_[ids[j]].refcount > 0) --slots_[ids[j++]].refcount;
  for (int64_t i = 0; i < j; ++i) ++slots_[ids[i]].refcount;
  if (j == k) throw InvariantBroken("free(): refused ids that all hold a reference");  // unreachable
  const int32_t b = ids[j];
  const int32_t held = slots_[b].refcount;  // ids[0, j) hold b `held` times: this is once more
  if (held == 0) {
    throw InvalidArgument("free(): block " + to_string(b) + " (position " + to_string(j) +
                          ") has refcount 0: it is already free (double free?); free each block once "
                          "per reference taken by allocate(), incref() or match_prefix()");
  }
  throw InvalidArgument("free(): block " + to_string(b) + " appears " + to_string(int64_t{held} + 1) +
                        " times but has only " + to_string(held) +
                        " reference(s); free it at most as often as it is referenced");
}

void BlockAllocator::incref(const int32_t* ids, int64_t k) {
  std::lock_guard<std::mutex> lock(mu_);
  check_count("incref()", k);
  check_ids("incref()", ids, k);
  for (int64_t j = 0; j < k; ++j) {
    if (slots_[ids[j]].refcount == 0) {
      throw InvalidArgument("incref(): block " + to_string(ids[j]) + " (position " + to_string(j) +
                            ") is free (refcount 0); only held blocks can be shared; take cached free "
                            "blocks with match_prefix() or new ones with allocate()");
    }
  }
  check_new_references("incref()", ids, k);
  for (int64_t j = 0; j < k; ++j) ++slots_[ids[j]].refcount;
  stats_.increfs += k;
}

void BlockAllocator::refcounts(const int32_t* ids, int64_t k, int32_t* out) const {
  std::lock_guard<std::mutex> lock(mu_);
  check_count("refcounts()", k);
  check_ids("refcounts()", ids, k);
  for (int64_t j = 0; j < k; ++j) out[j] = slots_[ids[j]].refcount;
}

void BlockAllocator::cache_blocks(const int32_t* ids, int64_t k, const uint64_t* hashes, int64_t num_hashes) {
  std::lock_guard<std::mutex> lock(mu_);
  check_cacheable("cache_blocks()", ids, k, hashes, num_hashes);
  if (!prefix_caching_) return;  // validated, but nothing is cached with caching disabled
  for (int64_t j = 0; j < k; ++j) {
    const int32_t b = ids[j];
    if (slots_[b].has_hash) continue;  // same hash again: nothing to do
    // First writer wins: a hash already mapped to another block keeps that block, and this
    // block stays uncached (it is freed like any other block).
    if (index_.find(hashes[j]) < 0) cache_one(b, hashes[j]);
  }
}

int64_t BlockAllocator::match_prefix(const uint64_t* hashes, int64_t k, int32_t* out) {
  std::lock_guard<std::mutex> lock(mu_);
  check_count("match_prefix()", k);
  int64_t hits = 0;
  if (prefix_caching_) {
    for (; hits < k; ++hits) {
      const int32_t b = index_.find(hashes[hits]);
      if (b < 0) break;
      out[hits] = b;
    }
  }
  check_new_references("match_prefix()", out, hits);  // before anything changes
  take_hits(out, hits);
  ++stats_.prefix_queries;
  stats_.prefix_query_blocks += k;
  stats_.prefix_hit_blocks += hits;
  note_used();
  return hits;
}

// ---- verified prefix caching ----------------------------------------------------------------

int64_t BlockAllocator::walk_verified(const uint64_t* hashes, int64_t k, const int32_t* tokens, uint64_t context,
                                      int32_t* out, bool* collided, uint64_t* stamps) const {
  uint64_t parent = kChainRoot;
  int64_t i = 0;
  for (; i < k; ++i) {
    const int32_t b = index_.find(hashes[i]);
    if (b < 0) break;
    const int32_t* t = tokens + i * int64_t{block_size_};
    if (!entries_.holds(b, t, context, parent)) {
      // Other tokens (or salt) under our hash: a collision, counted. Same tokens after another
      // incarnation of the prefix (evicted and cached again) is an ordinary miss.
      *collided = entries_.verified(b) && !entries_.same_content(b, t, context);
      break;
    }
    out[i] = b;
    parent = entries_.stamp(b);
    if (stamps != nullptr) stamps[i] = parent;
  }
  return i;
}

int64_t BlockAllocator::allocate_with_prefix(int64_t n, const uint64_t* hashes, int64_t k, const int32_t* tokens,
                                             int64_t num_tokens, uint64_t context, int32_t* out, uint64_t* chain) {
  std::lock_guard<std::mutex> lock(mu_);
  const char* fn = "allocate_with_prefix()";
  if (n < 0) throw InvalidArgument(std::string(fn) + ": n=" + to_string(n) + " must be >= 0 (blocks wanted)");
  check_count(fn, k);
  check_token_count(fn, num_tokens, k, block_size_);
  bool collided = false;
  const int64_t h = prefix_caching_ ? walk_verified(hashes, k < n ? k : n, tokens, context, out, &collided) : 0;
  check_new_references(fn, out, h);
  int64_t revived = 0;
  for (int64_t j = 0; j < h; ++j) revived += slots_[out[j]].refcount == 0;
  const int64_t fresh = n - h, available = num_free_ - revived;
  if (fresh > available) {
    throw OutOfBlocks(std::string(fn) + ": " + to_string(h) + " of " + to_string(n) +
                          " blocks are cached, the other " + to_string(fresh) + " need new blocks but only " +
                          to_string(available) + " are free; free finished sequences (or preempt one) and "
                          "retry, or build a larger pool",
                      fresh, available);
  }
  take_hits(out, h);
  pop_free(fresh, out + h);
  ++stats_.prefix_queries;
  stats_.prefix_query_blocks += k;
  stats_.prefix_hit_blocks += h;
  stats_.hash_collisions += collided;
  note_used();
  *chain = h ? entries_.stamp(out[h - 1]) : kChainRoot;
  return h;
}

uint64_t BlockAllocator::cache_blocks_verified(const int32_t* ids, int64_t k, const uint64_t* hashes,
                                               int64_t num_hashes, const int32_t* tokens, int64_t num_tokens,
                                               uint64_t context, uint64_t parent) {
  std::lock_guard<std::mutex> lock(mu_);
  const char* fn = "cache_blocks_verified()";
  check_cacheable(fn, ids, k, hashes, num_hashes);
  check_token_count(fn, num_tokens, k, block_size_);
  if (!prefix_caching_) return kChainBroken;
  return cache_chain(ids, k, hashes, tokens, context, parent, nullptr);
}

uint64_t BlockAllocator::cache_chain(const int32_t* ids, int64_t k, const uint64_t* hashes, const int32_t* tokens,
                                     uint64_t context, uint64_t parent, uint64_t* chains) {
  uint64_t chain = parent;
  for (int64_t j = 0; j < k; ++j) {
    const int32_t b = ids[j];
    const int32_t* t = tokens + j * int64_t{block_size_};
    if (chain == kChainBroken) {
      // nothing after a block that could not be cached is cached
    } else if (slots_[b].has_hash) {  // cached already: a verified hit of this sequence, or a fork twin's block
      chain = entries_.holds(b, t, context, chain) ? entries_.stamp(b) : kChainBroken;
    } else {
      chain = cache_verified_one(b, hashes[j], t, context, chain);
    }
    if (chains != nullptr) chains[j] = chain;
  }
  return chain;
}

uint64_t BlockAllocator::cache_verified_one(int32_t b, uint64_t hash, const int32_t* tokens, uint64_t context,
                                            uint64_t parent) {
  const int32_t q = index_.find(hash);
  if (q >= 0 && entries_.holds(q, tokens, context, parent)) return entries_.stamp(q);  // cached in block q
  if (q >= 0) {
    stats_.hash_collisions += entries_.verified(q) && !entries_.same_content(q, tokens, context);
    if (slots_[q].refcount != 0) return kChainBroken;  // a held block keeps its hash
    forget_hash(q);  // a free block under our hash holds another prefix: ours replaces it
  }
  cache_one(b, hash);
  return entries_.record(b, tokens, context, parent);
}

void BlockAllocator::check_invariants() const {
  std::lock_guard<std::mutex> lock(mu_);
  auto fail = [](const std::string& what) { throw InvariantBroken("BlockAllocator invariant broken: " + what); };
  int64_t on_list = 0;
  int32_t prev = -1;
  for (int32_t b = head_; b != -1; b = slots_.next(b)) {
    if (b < 0 || b >= num_blocks_) fail("free list holds id " + to_string(b));
    if (slots_.prev(b) != prev) fail("the prev link of block " + to_string(b) + " is " + to_string(slots_.prev(b)));
    if (slots_[b].refcount != 0) fail("block " + to_string(b) + " is on the free list with refcount " + to_string(slots_[b].refcount));
    if (++on_list > num_blocks_) fail("free list has a cycle");
    prev = b;
  }
  if (prev != tail_) fail("tail_ is " + to_string(tail_) + ", last listed block is " + to_string(prev));
  if (on_list != num_free_) fail("num_free_ is " + to_string(num_free_) + " but " + to_string(on_list) + " blocks are listed");
  int64_t zero = 0, cached = 0;
  for (int32_t b = 0; b < num_blocks_; ++b) {
    if (slots_[b].refcount < 0) fail("block " + to_string(b) + " has refcount " + to_string(slots_[b].refcount));
    zero += slots_[b].refcount == 0;
    if (slots_[b].has_hash) {
      ++cached;
      if (index_.find(slots_[b].hash) != b) fail("block " + to_string(b) + "'s hash maps elsewhere");
    } else if (prefix_caching_ && entries_.verified(b)) {
      fail("block " + to_string(b) + " has a verified entry but no hash");
    }
  }
  if (zero != num_free_) fail(to_string(zero) + " blocks have refcount 0 but num_free_ is " + to_string(num_free_));
  if (index_.size() != num_cached_) fail("the hash index holds " + to_string(index_.size()) + " entries, num_cached_ is " + to_string(num_cached_));
  if (cached != num_cached_) fail("num_cached_ is " + to_string(num_cached_) + " but " + to_string(cached) + " blocks have a hash");
  check_invariants_above_top();
}

}  // namespace kvpool
