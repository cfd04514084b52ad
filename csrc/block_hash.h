// Chained 64-bit hashes of full token blocks (prefix caching keys).
//
// Definition (src/kvpool/_reference.py implements the same function in Python; docs/allocator.md),
// under a 128-bit key (k0, k1) (k0 = its low 64 bits; key 0 is the public, unkeyed hash):
//   digest(block)  = d, starting at K3 ^ k0, for each token t (its 32 bits, as uint64):
//                    d = rotl64(d ^ (t * K2), 31) * K1
//   hash(block i)  = mix64((hash(block i-1) * K2) ^ digest(block i) ^ extra_key ^ k1)
//   hash(block -1) = parent_hash, or kRootHash when none is given
//   extra_key      = 0 without extra; else, with the payload bytes zero-padded to whole
//                    little-endian 64-bit words w: e = mix64(K1 ^ tag ^ k0), for each w:
//                    e = rotl64(e ^ (w * K2), 31) * K1; extra_key = mix64(e ^ len(payload) ^ k1)
// All arithmetic is modulo 2^64. mix64 is the splitmix64 finalizer. The key is what keeps an
// outsider from computing block hashes offline and crafting collisions that thrash the cache; the
// prefix cache never trusts a hash alone (block_allocator.h verifies the tokens of every hit).
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvpool {

constexpr uint64_t kHashK1 = 0x9E3779B97F4A7C15ull;
constexpr uint64_t kHashK2 = 0xC2B2AE3D27D4EB4Full;
constexpr uint64_t kHashK3 = 0x165667B19E3779F9ull;
// Parent of the first block when the caller gives none ("kvpool" in ASCII).
constexpr uint64_t kRootHash = 0x00006B76706F6F6Cull;

// The 128-bit hash key as two words; {0, 0} is the public unkeyed hash.
struct HashKey {
  uint64_t k0 = 0;
  uint64_t k1 = 0;
};

// Digest of the bytes of `extra` (a LoRA id, a salt, ...) under a type tag (the Python side uses
// 1 = bytes, 2 = str as UTF-8, 3 = int as minimal signed little-endian bytes).
uint64_t hash_extra(uint8_t tag, const uint8_t* data, std::size_t len, HashKey key);

// KV-cache groups (seq_table.h): group g > 0 keys its prefix-cache entries apart from every other group,
// since its blocks hold other layers' pages. Group 0 keeps the plain hash and salt (a one-group model
// caches exactly as before); for g > 0, with tag(g) = mix64(K3 ^ (g * K1) ^ k0):
//   group_hash(h, g)    = mix64(h ^ tag(g) ^ k1)
//   group_context(c, g) = mix64((c * K2) ^ tag(g) ^ k1)
// A verified hit compares the salt digest too, so a block never serves another group, whatever its hash.
uint64_t group_hash(uint64_t hash, int64_t group, HashKey key);
uint64_t group_context(uint64_t context, int64_t group, HashKey key);

// Number of full blocks in n_tokens tokens.
inline int64_t num_full_blocks(int64_t n_tokens, int64_t block_size) { return n_tokens / block_size; }

// Writes one chained hash per full block of tokens[0, n_tokens) to out[0, n_tokens / block_size).
// Throws InvalidArgument when block_size < 1 or n_tokens < 0.
void hash_block_tokens(const int32_t* tokens, int64_t n_tokens, int64_t block_size,
                       uint64_t parent_hash, uint64_t extra_key, HashKey key, uint64_t* out);

}  // namespace kvpool
