// A fixed-size heap array obtained from calloc. Large calloc'd regions come straight from the
// kernel as zero pages that are only touched on first use, so building a 1,000,000-block
// allocator does not pay to zero arrays whose slots it may never read.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <memory>
#include <new>

namespace kvpool {

struct FreeDeleter {
  void operator()(void* p) const noexcept { std::free(p); }
};

template <typename T>
using ZeroedArray = std::unique_ptr<T[], FreeDeleter>;

template <typename T>
ZeroedArray<T> make_zeroed_array(std::size_t n) {
  void* p = std::calloc(n == 0 ? 1 : n, sizeof(T));
  if (p == nullptr) throw std::bad_alloc();
  return ZeroedArray<T>(static_cast<T*>(p));
}

}  // namespace kvpool
