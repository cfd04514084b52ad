// Argument checks shared by the allocator's source files (block_allocator.cpp, allocator_groups.cpp).
#pragma once

#include <cstdint>
#include <limits>
#include <string>

#include "errors.h"

namespace kvpool {

// A block's refcount never passes this (int32); a reference that would is refused.
constexpr int64_t kMaxRefcount = std::numeric_limits<int32_t>::max();

inline void check_count(const char* fn, int64_t k) {
  if (k < 0) throw InvalidArgument(std::string(fn) + ": count " + std::to_string(k) + " must be >= 0");
}

inline void check_token_count(const char* fn, int64_t num_tokens, int64_t num_blocks, int32_t block_size) {
  if (num_tokens != num_blocks * block_size) {
    throw InvalidArgument(std::string(fn) + ": got " + std::to_string(num_tokens) + " token ids for " +
                          std::to_string(num_blocks) + " blocks of " + std::to_string(block_size) +
                          "; pass the tokens of exactly those full blocks (num_blocks * block_size)");
  }
}

// `what` must hold one value per block: `count` of them for k blocks.
inline void check_per_block(const char* fn, const char* what, int64_t count, int64_t k) {
  if (count != k) {
    throw InvalidArgument(std::string(fn) + ": got " + std::to_string(k) + " blocks but " + std::to_string(count) +
                          " " + what + "; pass one per block");
  }
}

}  // namespace kvpool
