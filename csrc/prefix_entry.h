// PrefixEntries: what each verified prefix-cache block holds, so a hash match can be checked against
// the real content before another request reads its KV.
//
// A block's KV depends on its own tokens, on every token before it and on the sequence's salt (LoRA
// id, tenant). An entry therefore records the block's tokens, the salt digest (`context`) and the
// stamp of the cached block before it (`parent`; kChainRoot for a sequence's first block). Stamps
// are unique for the life of the allocator (a 64-bit counter, never reused): a block that is
// evicted and cached again gets a new stamp, so an entry cached after an old incarnation of its
// parent can never be reached through a new one. Matching block i then needs: same tokens, same
// salt and parent == stamp of the verified block matched at i - 1. By induction a verified hit has
// exactly the query's tokens from the first block on, whatever the hash function does.
// Memory: block_size * 4 + 24 bytes per block, allocated with calloc (touched only when used).
#pragma once

#include <cstdint>
#include <cstring>

#include "zeroed_array.h"

namespace kvpool {

// Chain value before a sequence's first block.
constexpr uint64_t kChainRoot = 0;
// Chain value after a block that could not be cached (a collision): nothing after it is cached.
constexpr uint64_t kChainBroken = ~uint64_t{0};

class PrefixEntries {
 public:
  PrefixEntries(int32_t num_blocks, int32_t block_size, bool enabled)
      : num_blocks_(enabled ? num_blocks : 0),
        block_size_(block_size),
        meta_(make_zeroed_array<Meta>(static_cast<size_t>(num_blocks_))),
        tokens_(make_zeroed_array<int32_t>(static_cast<size_t>(num_blocks_) * static_cast<size_t>(block_size))) {}

  // True when block b has a verified entry (cached through a *_verified call).
  bool verified(int32_t b) const { return meta_[b].stamp != 0; }
  uint64_t stamp(int32_t b) const { return meta_[b].stamp; }

  // True when block b's entry holds these tokens under this salt (after whatever prefix).
  bool same_content(int32_t b, const int32_t* tokens, uint64_t context) const {
    const Meta& m = meta_[b];
    return m.stamp != 0 && m.context == context &&
           std::memcmp(block_tokens(b), tokens, sizeof(int32_t) * static_cast<size_t>(block_size_)) == 0;
  }

  // True when block b's entry is exactly (tokens[0, block_size), context) after the cached block
  // whose stamp is `parent`: then its KV is the KV these tokens have after that prefix.
  bool holds(int32_t b, const int32_t* tokens, uint64_t context, uint64_t parent) const {
    return meta_[b].parent == parent && same_content(b, tokens, context);
  }

  // Records block b's content under a fresh stamp and returns the stamp.
  uint64_t record(int32_t b, const int32_t* tokens, uint64_t context, uint64_t parent) {
    std::memcpy(block_tokens(b), tokens, sizeof(int32_t) * static_cast<size_t>(block_size_));
    meta_[b] = Meta{next_stamp_, parent, context};
    return next_stamp_++;
  }

  // Block b's cached content is gone (evicted): its stamp is retired for ever.
  void forget(int32_t b) { meta_[b].stamp = 0; }

  // Block `from`'s entry now describes block `to` (its KV was copied there), stamp and all, so the
  // entries cached after it still find their parent; `from` has none after.
  void move(int32_t from, int32_t to) {
    if (num_blocks_ == 0) return;
    std::memcpy(block_tokens(to), block_tokens(from), sizeof(int32_t) * static_cast<size_t>(block_size_));
    meta_[to] = meta_[from];
    meta_[from].stamp = 0;
  }

  int64_t bytes() const { return int64_t{num_blocks_} * (int64_t{block_size_} * 4 + int64_t{sizeof(Meta)}); }

 private:
  struct Meta {
    uint64_t stamp;    // 0 = no verified entry; else unique, >= 1
    uint64_t parent;   // stamp of the cached block before this one, or kChainRoot
    uint64_t context;  // salt digest of the sequence (0 = none)
  };

  int32_t* block_tokens(int32_t b) { return tokens_.get() + static_cast<size_t>(b) * static_cast<size_t>(block_size_); }
  const int32_t* block_tokens(int32_t b) const {
    return tokens_.get() + static_cast<size_t>(b) * static_cast<size_t>(block_size_);
  }

  int32_t num_blocks_;
  int32_t block_size_;
  ZeroedArray<Meta> meta_;
  ZeroedArray<int32_t> tokens_;
  uint64_t next_stamp_ = 1;
};

}  // namespace kvpool
