// A reserved virtual address range whose physical memory is mapped and unmapped in chunks: the
// storage of an elastic KV pool. Framework-free (no torch, no pybind11, no cuda.h).
//
// Two backends with the same semantics:
//   cuda: cuMemAddressReserve / cuMemCreate + cuMemMap + cuMemSetAccess / cuMemUnmap + cuMemRelease,
//         the driver loaded with dlopen("libcuda.so.1") at first use (never linked, see vmm_cuda.cpp);
//   host: mmap(PROT_NONE) reserves, mmap(MAP_FIXED, PROT_READ | PROT_WRITE) maps zero-filled pages,
//         mmap(MAP_FIXED, PROT_NONE) drops them again (see vmm_host.cpp); CPU tests use it.
// The address (`ptr()`) never changes while the range lives, so tensors viewing it and CUDA graphs
// captured over them stay valid across map / unmap / release_all / remap_all.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace kvpool {

// A driver or operating-system call of the VMM layer failed (out of device memory, ...).
struct VirtualMemoryFailure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The CUDA backend was asked for where the driver (libcuda.so.1) cannot be loaded.
struct DriverUnavailable : VirtualMemoryFailure {
  using VirtualMemoryFailure::VirtualMemoryFailure;
};

// What one backend does with the address space and physical memory. A "handle" is one chunk of
// physical memory (granularity bytes): a CUmemGenericAllocationHandle, or a token on the host.
class VmmBackend {
 public:
  virtual ~VmmBackend() = default;
  virtual const char* name() const = 0;
  virtual size_t granularity() const = 0;  // the device's: chunks are multiples of it
  // Reserves `bytes` (a multiple of granularity) of address space aligned to granularity.
  virtual uintptr_t reserve(size_t bytes) = 0;
  virtual void free_reservation(uintptr_t base, size_t bytes) noexcept = 0;
  virtual uint64_t create_handle(size_t bytes) = 0;  // one chunk of physical memory
  virtual void release_handle(uint64_t handle) noexcept = 0;
  // Maps `count` consecutive chunks at `addr` (read/write for the device); on failure nothing of
  // the run stays mapped and it throws VirtualMemoryFailure.
  virtual void map_run(uintptr_t addr, const uint64_t* handles, size_t count, size_t chunk) = 0;
  // Unmaps them (after the device finished the work that may use them); returns how many leading
  // chunks were unmapped, with the reason in *error when fewer than `count`.
  virtual size_t unmap_run(uintptr_t addr, size_t count, size_t chunk, std::string* error) = 0;
};

std::unique_ptr<VmmBackend> make_host_backend();
std::unique_ptr<VmmBackend> make_cuda_backend(int device);  // throws DriverUnavailable without libcuda

// Host granularity: 2 MiB, CUDA's usual one, so CPU tests exercise the same arithmetic.
constexpr size_t kHostGranularity = size_t{2} << 20;

class VirtualRange {
 public:
  // Reserves round_up(nbytes, granularity) bytes; `backend` is "host" or "cuda". The chunk, the unit
  // of map/unmap called granularity() here, is chunk_bytes (0: the device's granularity, 2 MiB
  // usually), a multiple of the device's: larger chunks mean fewer driver calls per GiB (wake time).
  VirtualRange(int64_t nbytes, const std::string& backend, int device, int64_t chunk_bytes = 0);
  ~VirtualRange();
  VirtualRange(const VirtualRange&) = delete;
  VirtualRange& operator=(const VirtualRange&) = delete;

  uintptr_t ptr() const { return base_; }
  size_t reserved_bytes() const { return reserved_; }
  size_t granularity() const { return granularity_; }
  size_t device_granularity() const { return backend_->granularity(); }
  const char* backend() const { return backend_->name(); }
  size_t mapped_bytes() const;
  size_t prepared_bytes() const;
  bool asleep() const;
  bool is_mapped(int64_t offset) const;

  // Maps / unmaps the chunks covering [offset, offset + nbytes): both multiples of granularity,
  // inside the range; every chunk must be unmapped (map) or mapped (unmap). All or nothing.
  void map(int64_t offset, int64_t nbytes);
  void unmap(int64_t offset, int64_t nbytes);
  // Creates physical chunks ahead of time for the next maps (off the hot path); they hold memory.
  void prepare(int64_t nbytes);
  void drop_prepared();
  // Sleep: unmaps every chunk (contents dropped) and drops prepared ones; the reservation stays.
  void release_all();
  // Wake: maps again, at the same addresses, the chunks mapped at release_all (zero-filled on host).
  void remap_all();

 private:
  size_t chunk_index(int64_t offset, int64_t nbytes, const char* fn) const;
  void map_chunks(size_t first, size_t count);  // caller holds mutex_, chunks known unmapped
  void unmap_chunks(size_t first, size_t count);
  void check_awake(const char* fn) const;

  std::unique_ptr<VmmBackend> backend_;
  size_t granularity_ = 0;
  size_t reserved_ = 0;
  uintptr_t base_ = 0;
  mutable std::mutex mutex_;
  std::vector<uint64_t> handles_;    // per chunk: its physical handle while mapped
  std::vector<uint8_t> mapped_;      // per chunk: 1 while mapped
  std::vector<uint64_t> prepared_;   // created ahead of time, not mapped
  std::vector<uint8_t> asleep_map_;  // per chunk, while asleep: mapped at release_all
  bool asleep_ = false;
  size_t mapped_chunks_ = 0;
};

}  // namespace kvpool
