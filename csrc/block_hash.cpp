#include "block_hash.h"

#include <cstring>
#include <string>

#include "errors.h"

namespace kvpool {
namespace {

inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

// splitmix64's finalizer: every input bit flips about half of the output bits.
inline uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 27;
  x *= 0x94D049BB133111EBull;
  x ^= x >> 31;
  return x;
}

// One multiply-rotate-multiply step per input word.
inline uint64_t absorb(uint64_t state, uint64_t word) { return rotl64(state ^ (word * kHashK2), 31) * kHashK1; }

}  // namespace

uint64_t hash_extra(uint8_t tag, const uint8_t* data, std::size_t len, HashKey key) {
  uint64_t e = mix64(kHashK1 ^ tag ^ key.k0);
  for (std::size_t pos = 0; pos < len; pos += 8) {
    uint64_t word = 0;
    for (std::size_t b = 0; b < 8 && pos + b < len; ++b) word |= uint64_t{data[pos + b]} << (8 * b);
    e = absorb(e, word);
  }
  return mix64(e ^ static_cast<uint64_t>(len) ^ key.k1);
}

namespace {
uint64_t group_tag(int64_t group, HashKey key) { return mix64(kHashK3 ^ (static_cast<uint64_t>(group) * kHashK1) ^ key.k0); }
}  // namespace

uint64_t group_hash(uint64_t hash, int64_t group, HashKey key) {
  return group == 0 ? hash : mix64(hash ^ group_tag(group, key) ^ key.k1);
}

uint64_t group_context(uint64_t context, int64_t group, HashKey key) {
  return group == 0 ? context : mix64((context * kHashK2) ^ group_tag(group, key) ^ key.k1);
}

void hash_block_tokens(const int32_t* tokens, int64_t n_tokens, int64_t block_size,
                       uint64_t parent_hash, uint64_t extra_key, HashKey key, uint64_t* out) {
  if (block_size < 1) {
    throw InvalidArgument("hash_block_tokens(): block_size=" + std::to_string(block_size) +
                          " must be >= 1; pass the allocator's block size (e.g. 16)");
  }
  if (n_tokens < 0) {
    throw InvalidArgument("hash_block_tokens(): n_tokens=" + std::to_string(n_tokens) + " must be >= 0");
  }
  const int64_t n_blocks = n_tokens / block_size;
  uint64_t parent = parent_hash;
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int32_t* block = tokens + b * block_size;
    uint64_t d = kHashK3 ^ key.k0;
    for (int64_t t = 0; t < block_size; ++t) d = absorb(d, static_cast<uint32_t>(block[t]));
    parent = mix64((parent * kHashK2) ^ d ^ extra_key ^ key.k1);
    out[b] = parent;
  }
}

}  // namespace kvpool
