// BlockAllocator's calls for an elastic pool (block_allocator.h; docs/elastic.md): the live ids are
// always [0, num_blocks), inside a capacity of max_num_blocks sized once.
//
// grow(n) appends the new ids at the free list's TAIL: every free id already there (all lower) is
// handed out first, so the top of the pool tends to stay free and shrink() can give it back without
// moving anything. (The price: under load, cached free blocks are evicted before the fresh capacity
// is used; with the new ids at the head they would be handed out first and the cache kept, but a
// later shrink would have to relocate them.) When the top is held, relocate_top() moves those blocks
// to free lower ids, so that shrink() can proceed after the caller copied their contents.
#include <string>
#include <vector>

#include "allocator_checks.h"
#include "block_allocator.h"
#include "errors.h"

namespace kvpool {

using std::to_string;

void BlockAllocator::check_top(const char* fn, int64_t n) const {
  if (n < 0 || n > num_blocks_) {
    throw InvalidArgument(std::string(fn) + ": n=" + to_string(n) + " must be in [0, num_blocks=" +
                          to_string(num_blocks_) + "] (the number of top block ids)");
  }
}

void BlockAllocator::grow(int64_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  if (n < 0 || n > int64_t{max_num_blocks_} - num_blocks_) {
    throw InvalidArgument("grow(): n=" + to_string(n) + " must be in [0, " +
                          to_string(int64_t{max_num_blocks_} - num_blocks_) + "]: the pool has " +
                          to_string(num_blocks_) + " of max_num_blocks=" + to_string(max_num_blocks_) +
                          " blocks (build the allocator with a larger max_num_blocks to grow further)");
  }
  if (n == 0) return;
  const int32_t first = num_blocks_, last = static_cast<int32_t>(num_blocks_ + n - 1);
  for (int32_t b = first; b <= last; ++b) {  // slots above the top are free and uncached (invariant)
    slots_.set_prev(b, b == first ? tail_ : b - 1);
    slots_.set_next(b, b == last ? -1 : b + 1);
    slots_.set_ahead(b, b + kPrefetchAhead);  // a hint only; ahead() clamps it to the capacity
  }
  if (tail_ == -1) head_ = first; else slots_.set_next(tail_, first);
  tail_ = last;
  num_free_ += n;
  num_blocks_ = last + 1;
}

int64_t BlockAllocator::held_in_top(int64_t n) const {
  std::lock_guard<std::mutex> lock(mu_);
  check_top("held_in_top()", n);
  int64_t held = 0;
  for (int32_t b = static_cast<int32_t>(num_blocks_ - n); b < num_blocks_; ++b) held += slots_[b].refcount != 0;
  return held;
}

int64_t BlockAllocator::free_top_blocks() const {
  std::lock_guard<std::mutex> lock(mu_);
  int32_t b = num_blocks_;
  while (b > 0 && slots_[b - 1].refcount == 0) --b;
  return num_blocks_ - b;
}

void BlockAllocator::shrink(int64_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  check_top("shrink()", n);
  const int32_t low = static_cast<int32_t>(num_blocks_ - n);
  int64_t held = 0;
  for (int32_t b = low; b < num_blocks_; ++b) held += slots_[b].refcount != 0;
  if (held > 0) {
    int32_t top = num_blocks_;
    while (top > 0 && slots_[top - 1].refcount == 0) --top;
    throw OutOfBlocks("shrink(): " + to_string(held) + " of the top " + to_string(n) + " blocks [" +
                          to_string(low) + ", " + to_string(num_blocks_) + ") are held; move them to free lower "
                          "ids first (BlockTables.relocate_top(n), then copy_blocks), or shrink by at most " +
                          to_string(num_blocks_ - top) + " now; nothing was released",
                      n, num_blocks_ - top);
  }
  for (int32_t b = low; b < num_blocks_; ++b) {
    unlink(b);
    if (slots_[b].has_hash) {  // its memory goes away: the cached content with it
      forget_hash(b);
      ++stats_.evictions;
    }
  }
  num_blocks_ = low;
}

int64_t BlockAllocator::relocate_top(int64_t n, int32_t* src, int32_t* dst) {
  std::lock_guard<std::mutex> lock(mu_);
  check_top("relocate_top()", n);
  const int32_t low = static_cast<int32_t>(num_blocks_ - n);
  int64_t m = 0;
  for (int32_t b = low; b < num_blocks_; ++b) {
    if (slots_[b].refcount != 0) src[m++] = b;
  }
  int64_t found = 0;  // free ids below the top, least recently freed first
  for (int32_t b = head_; b != -1 && found < m; b = slots_.next(b)) {
    if (b < low) dst[found++] = b;
  }
  if (found < m) {
    int64_t below = 0;
    for (int32_t b = head_; b != -1; b = slots_.next(b)) below += b < low;
    throw OutOfBlocks("relocate_top(): " + to_string(m) + " held blocks in the top " + to_string(n) +
                          " ids need free ids below " + to_string(low) + " but only " + to_string(below) +
                          " are free there, so " + to_string(below) + " could move; free or preempt sequences, "
                          "or shrink by less; nothing changed",
                      m, below);
  }
  for (int64_t j = 0; j < m; ++j) {
    const int32_t s = src[j], d = dst[j];
    unlink(d);
    if (slots_[d].has_hash) {
      forget_hash(d);
      ++stats_.evictions;
    }
    slots_[d].refcount = slots_[s].refcount;
    slots_[s].refcount = 0;
    if (slots_[s].has_hash) {  // the cached content moves with the KV: same hash, same stamp
      index_.erase(slots_[s].hash);
      index_.insert(slots_[s].hash, d);
      slots_[d].hash = slots_[s].hash;
      slots_[d].has_hash = 1;
      slots_[s].has_hash = 0;
      entries_.move(s, d);
    }
    slots_.set_prev(s, tail_);  // the vacated id joins the free list tail
    slots_.set_next(s, -1);
    if (tail_ == -1) head_ = s; else slots_.set_next(tail_, s);
    tail_ = s;
    ++num_free_;
  }
  return m;
}

// Ids in [num_blocks, max_num_blocks) are outside the pool: no reference, no hash, no entry.
void BlockAllocator::check_invariants_above_top() const {
  for (int32_t b = num_blocks_; b < max_num_blocks_; ++b) {
    if (slots_[b].refcount != 0 || slots_[b].has_hash || (prefix_caching_ && entries_.verified(b))) {
      throw InvariantBroken("BlockAllocator invariant broken: block " + to_string(b) + " above num_blocks=" +
                            to_string(num_blocks_) + " holds a reference, a hash or an entry");
    }
  }
}

}  // namespace kvpool
