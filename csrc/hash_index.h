// HashIndex: block hash -> block id, open addressing with linear probing over two flat arrays.
//
// The allocator maps at most one hash per block, so the table never holds more than
// num_blocks entries; it is sized once (load factor <= 1/2) and never grows. Inserts and
// erases therefore never touch the heap, unlike std::unordered_map which allocates a node
// per insert. Erase uses backward-shift deletion, so there are no tombstones and probe
// chains stay short however long the allocator runs.
#pragma once

#include <cstdint>

#include "zeroed_array.h"

namespace kvpool {

class HashIndex {
 public:
  explicit HashIndex(int64_t max_entries) {
    int bits = 4;
    while ((int64_t{1} << bits) < 2 * max_entries) ++bits;
    shift_ = 64 - bits;
    mask_ = (uint64_t{1} << bits) - 1;
    keys_ = make_zeroed_array<uint64_t>(mask_ + 1);
    slots_ = make_zeroed_array<int32_t>(mask_ + 1);  // block id + 1; 0 = empty
  }

  // Block cached under `key`, or -1.
  int32_t find(uint64_t key) const {
    for (uint64_t i = home(key);; i = (i + 1) & mask_) {
      if (slots_[i] == 0) return -1;
      if (keys_[i] == key) return slots_[i] - 1;
    }
  }

  // Maps key -> block unless key is mapped already (then nothing changes and it returns false).
  bool insert(uint64_t key, int32_t block) {
    uint64_t i = home(key);
    for (; slots_[i] != 0; i = (i + 1) & mask_) {
      if (keys_[i] == key) return false;
    }
    keys_[i] = key;
    slots_[i] = block + 1;
    ++size_;
    return true;
  }

  // Removes key, which must be present.
  void erase(uint64_t key) {
    uint64_t hole = home(key);
    while (keys_[hole] != key || slots_[hole] == 0) hole = (hole + 1) & mask_;
    // Backward shift: pull later entries of the probe chain into the hole when their home slot
    // does not lie cyclically in (hole, j], so every entry stays reachable from its home.
    for (uint64_t j = (hole + 1) & mask_; slots_[j] != 0; j = (j + 1) & mask_) {
      uint64_t from_home = (j - home(keys_[j])) & mask_;
      uint64_t from_hole = (j - hole) & mask_;
      if (from_home >= from_hole) {
        keys_[hole] = keys_[j];
        slots_[hole] = slots_[j];
        hole = j;
      }
    }
    slots_[hole] = 0;
    --size_;
  }

  int64_t size() const { return size_; }

 private:
  // Fibonacci hashing: user-chosen hashes (e.g. 1, 2, 3 or multiples of a power of two) still
  // spread over the table.
  uint64_t home(uint64_t key) const { return (key * 0x9E3779B97F4A7C15ull) >> shift_; }

  int shift_;
  uint64_t mask_;
  int64_t size_ = 0;
  ZeroedArray<uint64_t> keys_;
  ZeroedArray<int32_t> slots_;
};

}  // namespace kvpool
