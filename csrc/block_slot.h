// BlockSlot: the hot state of one block in one 32-byte record; BlockSlots: the fixed array of them.
//
// allocate() and free() read and write a block's refcount, free-list links and hash flag together.
// As separate arrays they cost one cache miss each when the free list walks cold memory (a large
// pool whose LRU order is scattered); in one record aligned to 32 bytes they share one cache line:
// two blocks per 64-byte line, and no record straddles two lines.
//
// Walking a linked list is still one dependent miss after another, so each record also carries a
// hint, `ahead`: a block kPrefetchAhead places further along the free list when it was pushed.
// allocate() prefetches it, and the walk overlaps kPrefetchAhead misses instead of waiting for each
// in turn. A hint is never trusted for order, only for prefetching (it goes stale when blocks in
// between leave the list early); any id in range will do.
//
// Links are stored as offsets from id order (next = b + 1 + offset, prev = b - 1 + offset,
// ahead = b + kPrefetchAhead + offset, all modulo 2^32), so zeroed memory already is the initial
// free list 0, 1, 2, ...: constructing an allocator writes one slot, and calloc's zero pages are
// mapped only when blocks are first used.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>

#include "zeroed_array.h"

namespace kvpool {

// How far ahead the free-list walk prefetches: enough misses in flight to hide one's latency.
constexpr int32_t kPrefetchAhead = 16;

struct alignas(32) BlockSlot {
  uint64_t hash;          // the block's prefix-cache key, meaningful while has_hash
  int32_t refcount;       // references held; 0 = the block is on the free list
  uint32_t prev_offset;   // free-list links (-1 = none), meaningful while refcount == 0:
  uint32_t next_offset;   //   read and written through BlockSlots::prev() / next()
  uint32_t ahead_offset;  // the prefetch hint, through BlockSlots::ahead()
  uint8_t has_hash;       // 1 while the hash index maps `hash` to this block
};
static_assert(sizeof(BlockSlot) == 32, "two BlockSlots per 64-byte cache line");

// Asks the CPU to bring p's cache line in, for writing; no effect on compilers without the builtin.
inline void prefetch_for_write(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p, 1);
#else
  (void)p;
#endif
}

// num_blocks zeroed slots from calloc, aligned to a cache line; allocated once, never resized.
class BlockSlots {
 public:
  explicit BlockSlots(int32_t num_blocks) : num_blocks_(num_blocks) {
    void* raw = std::calloc(static_cast<std::size_t>(num_blocks) * sizeof(BlockSlot) + kLine, 1);
    if (raw == nullptr) throw std::bad_alloc();
    raw_.reset(static_cast<unsigned char*>(raw));
    const auto misaligned = reinterpret_cast<std::uintptr_t>(raw) % kLine;
    slots_ = reinterpret_cast<BlockSlot*>(raw_.get() + (misaligned ? kLine - misaligned : 0));
  }

  // Ids are never negative here; indexing with their uint32 value spares the free-list walk a sign
  // extension on its critical path.
  BlockSlot& operator[](int32_t b) { return slots_[static_cast<uint32_t>(b)]; }
  const BlockSlot& operator[](int32_t b) const { return slots_[static_cast<uint32_t>(b)]; }

  int32_t prev(int32_t b) const { return from_offset(int64_t{b} - 1, (*this)[b].prev_offset); }
  int32_t next(int32_t b) const { return from_offset(int64_t{b} + 1, (*this)[b].next_offset); }
  void set_prev(int32_t b, int32_t p) { (*this)[b].prev_offset = to_offset(int64_t{b} - 1, p); }
  void set_next(int32_t b, int32_t n) { (*this)[b].next_offset = to_offset(int64_t{b} + 1, n); }

  // The prefetch hint of b: an id in [0, num_blocks) (b itself where the offset points past the end).
  int32_t ahead(int32_t b) const {
    const int64_t a = from_offset(int64_t{b} + kPrefetchAhead, (*this)[b].ahead_offset);
    return a >= 0 && a < num_blocks_ ? static_cast<int32_t>(a) : b;
  }
  void set_ahead(int32_t b, int32_t a) { (*this)[b].ahead_offset = to_offset(int64_t{b} + kPrefetchAhead, a); }

 private:
  static constexpr std::size_t kLine = 64;
  static uint32_t to_offset(int64_t base, int32_t value) { return static_cast<uint32_t>(value - base); }
  static int32_t from_offset(int64_t base, uint32_t offset) {
    return static_cast<int32_t>(static_cast<uint32_t>(base) + offset);  // two's complement wrap
  }

  int32_t num_blocks_;
  ZeroedArray<unsigned char> raw_;
  BlockSlot* slots_ = nullptr;
};

}  // namespace kvpool
