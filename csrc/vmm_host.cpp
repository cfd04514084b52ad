// The host backend of VirtualRange: the same semantics as CUDA's VMM with mmap, so the elastic pool
// is tested on CPU. Reserve: mmap(PROT_NONE, MAP_NORESERVE) (address space only, no memory).
// Map: mmap(MAP_FIXED, PROT_READ | PROT_WRITE) over the chunk, fresh zero-filled pages. Unmap:
// mmap(MAP_FIXED, PROT_NONE, MAP_NORESERVE) over it, which drops the pages and keeps the addresses
// reserved (munmap would free them for the next mmap of anyone). A "handle" is only a token.
#include <sys/mman.h>

#include <cerrno>
#include <cstring>

#include "vmm.h"

namespace kvpool {

namespace {

std::string os_error(const char* call, size_t bytes) {
  return std::string(call) + " of " + std::to_string(bytes) + " bytes failed: " + std::strerror(errno);
}

class HostBackend final : public VmmBackend {
 public:
  const char* name() const override { return "host"; }
  size_t granularity() const override { return kHostGranularity; }

  uintptr_t reserve(size_t bytes) override {
    // Over-reserve by one chunk and trim, so the base is granularity-aligned like cuMemAddressReserve's.
    const size_t total = bytes + kHostGranularity;
    void* p = mmap(nullptr, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw VirtualMemoryFailure("VirtualRange(): " + os_error("mmap(PROT_NONE)", total));
    const auto raw = reinterpret_cast<uintptr_t>(p);
    const uintptr_t base = (raw + kHostGranularity - 1) & ~(uintptr_t{kHostGranularity} - 1);
    if (base > raw) munmap(p, base - raw);
    const uintptr_t end = base + bytes;
    if (raw + total > end) munmap(reinterpret_cast<void*>(end), raw + total - end);
    return base;
  }

  void free_reservation(uintptr_t base, size_t bytes) noexcept override {
    munmap(reinterpret_cast<void*>(base), bytes);
  }

  uint64_t create_handle(size_t) override { return ++next_handle_; }
  void release_handle(uint64_t) noexcept override {}

  void map_run(uintptr_t addr, const uint64_t*, size_t count, size_t chunk) override {
    const size_t bytes = count * chunk;
    void* p = mmap(reinterpret_cast<void*>(addr), bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    if (p == MAP_FAILED) {
      const std::string message = "map(): " + os_error("mmap(MAP_FIXED, PROT_READ | PROT_WRITE)", bytes);
      drop(addr, bytes);  // a failed MAP_FIXED may have unmapped the old PROT_NONE pages: reserve them again
      throw VirtualMemoryFailure(message);
    }
  }

  size_t unmap_run(uintptr_t addr, size_t count, size_t chunk, std::string* error) override {
    if (drop(addr, count * chunk)) return count;
    *error = "unmap(): " + os_error("mmap(MAP_FIXED, PROT_NONE)", count * chunk);
    return 0;
  }

 private:
  static bool drop(uintptr_t addr, size_t bytes) {
    void* p = mmap(reinterpret_cast<void*>(addr), bytes, PROT_NONE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
    return p != MAP_FAILED;
  }

  uint64_t next_handle_ = 0;
};

}  // namespace

std::unique_ptr<VmmBackend> make_host_backend() { return std::make_unique<HostBackend>(); }

}  // namespace kvpool
