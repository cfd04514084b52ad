// Exception types of the C++ core. bindings.cpp translates each one into the matching class of
// kvpool.errors; the core itself knows nothing of Python.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace kvpool {

// A bad argument value: negative count, mismatched lengths, double free, freeing a free block.
struct InvalidArgument : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// A block id outside [0, num_blocks).
struct BlockIndexOutOfRange : std::out_of_range {
  using std::out_of_range::out_of_range;
};

// allocate(n) with fewer than n free blocks; nothing was allocated.
struct OutOfBlocks : std::runtime_error {
  OutOfBlocks(const std::string& message, int64_t requested_blocks, int64_t available_blocks)
      : std::runtime_error(message), requested(requested_blocks), available(available_blocks) {}
  int64_t requested;
  int64_t available;
};

}  // namespace kvpool

namespace kvpool {

// check_invariants() found corrupted state (a bug in kvpool, never bad user input).
struct InvariantBroken : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace kvpool
