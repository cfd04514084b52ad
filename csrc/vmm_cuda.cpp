// The CUDA backend of VirtualRange: CUDA's virtual memory management through the driver API,
// loaded with dlopen("libcuda.so.1") at first use so the package never links libcuda and imports
// on machines without it (the constructor then throws DriverUnavailable).
//
// Context: the backend retains the device's PRIMARY context (cuDevicePrimaryCtxRetain, released in
// the destructor): the context torch and the CUDA runtime use, so the mapped memory is usable by
// their kernels. Every driver call runs between cuCtxPushCurrent(primary) and cuCtxPopCurrent, so
// the calling thread's current context is left as it was (any thread may call, torch's or not).
// Unmapping first waits for the context (cuCtxSynchronize): cuMemUnmap / cuMemRelease do not wait
// for kernels still reading the pages (PyTorch's expandable segments do the same).
#include <dlfcn.h>

#include <mutex>

#include "cuda_driver.h"
#include "vmm.h"

namespace kvpool {

namespace {

using namespace cu;

struct Driver {
  std::string error;  // empty when loaded
  cuInit_t init = nullptr;
  cuDeviceGet_t device_get = nullptr;
  cuDevicePrimaryCtxRetain_t retain = nullptr;
  cuDevicePrimaryCtxRelease_t release = nullptr;
  cuCtxPushCurrent_t push = nullptr;
  cuCtxPopCurrent_t pop = nullptr;
  cuCtxSynchronize_t synchronize = nullptr;
  cuGetErrorString_t error_string = nullptr;
  cuMemGetAllocationGranularity_t granularity = nullptr;
  cuMemAddressReserve_t address_reserve = nullptr;
  cuMemAddressFree_t address_free = nullptr;
  cuMemCreate_t create = nullptr;
  cuMemRelease_t mem_release = nullptr;
  cuMemMap_t map = nullptr;
  cuMemUnmap_t unmap = nullptr;
  cuMemSetAccess_t set_access = nullptr;
};

template <typename Fn>
bool resolve(void* lib, const char* symbol, Fn* out, std::string* error) {
  *out = reinterpret_cast<Fn>(dlsym(lib, symbol));
  if (*out == nullptr && error->empty()) {
    *error = std::string("libcuda.so.1 has no ") + symbol + " (a driver older than CUDA 11?)";
  }
  return *out != nullptr;
}

// Loaded once per process; the library stays loaded (the driver must outlive every range).
const Driver& driver() {
  static Driver d;
  static std::once_flag once;
  std::call_once(once, [] {
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) {
      const char* why = dlerror();
      d.error = why ? why : "dlopen failed";
      return;
    }
    std::string& e = d.error;
    resolve(lib, "cuInit", &d.init, &e);
    resolve(lib, "cuDeviceGet", &d.device_get, &e);
    resolve(lib, "cuDevicePrimaryCtxRetain", &d.retain, &e);
    resolve(lib, "cuDevicePrimaryCtxRelease_v2", &d.release, &e);
    resolve(lib, "cuCtxPushCurrent_v2", &d.push, &e);
    resolve(lib, "cuCtxPopCurrent_v2", &d.pop, &e);
    resolve(lib, "cuCtxSynchronize", &d.synchronize, &e);
    resolve(lib, "cuGetErrorString", &d.error_string, &e);
    resolve(lib, "cuMemGetAllocationGranularity", &d.granularity, &e);
    resolve(lib, "cuMemAddressReserve", &d.address_reserve, &e);
    resolve(lib, "cuMemAddressFree", &d.address_free, &e);
    resolve(lib, "cuMemCreate", &d.create, &e);
    resolve(lib, "cuMemRelease", &d.mem_release, &e);
    resolve(lib, "cuMemMap", &d.map, &e);
    resolve(lib, "cuMemUnmap", &d.unmap, &e);
    resolve(lib, "cuMemSetAccess", &d.set_access, &e);
  });
  if (!d.error.empty()) {
    throw DriverUnavailable("elastic pools need the CUDA driver (libcuda.so.1): " + d.error +
                            "; use backend='host' for CPU tests or a static PagedKVCache");
  }
  return d;
}

std::string describe(const Driver& d, CUresult r) {
  const char* text = nullptr;
  if (d.error_string == nullptr || d.error_string(r, &text) != CUDA_SUCCESS || text == nullptr) text = "unknown";
  return std::string(text) + " (CUresult " + std::to_string(r) + ")";
}

void check(const Driver& d, CUresult r, const std::string& call) {
  if (r != CUDA_SUCCESS) throw VirtualMemoryFailure(call + " failed: " + describe(d, r));
}

// Makes `ctx` current for the scope, restoring the thread's previous context after.
class ContextScope {
 public:
  ContextScope(const Driver& d, CUcontext ctx) : d_(d) { check(d, d.push(ctx), "cuCtxPushCurrent"); }
  ~ContextScope() {
    CUcontext popped = nullptr;
    d_.pop(&popped);
  }
  ContextScope(const ContextScope&) = delete;
  ContextScope& operator=(const ContextScope&) = delete;

 private:
  const Driver& d_;
};

class CudaBackend final : public VmmBackend {
 public:
  explicit CudaBackend(int device) : d_(driver()), device_(device) {
    const CUresult r = d_.init(0);
    if (r != CUDA_SUCCESS) {
      throw DriverUnavailable("elastic pools need a usable CUDA device: cuInit failed: " + describe(d_, r) +
                              "; use backend='host' for CPU tests or a static PagedKVCache");
    }
    check(d_, d_.device_get(&dev_, device), "cuDeviceGet(" + std::to_string(device) + ")");
    check(d_, d_.retain(&ctx_, dev_), "cuDevicePrimaryCtxRetain");
    prop_ = CUmemAllocationProp{};
    prop_.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop_.requestedHandleTypes = CU_MEM_HANDLE_TYPE_NONE;
    prop_.location = CUmemLocation{CU_MEM_LOCATION_TYPE_DEVICE, device};
    try {
      ContextScope scope(d_, ctx_);
      check(d_, d_.granularity(&granularity_, &prop_, CU_MEM_ALLOC_GRANULARITY_MINIMUM),
            "cuMemGetAllocationGranularity");
    } catch (...) {
      d_.release(dev_);
      throw;
    }
  }
  ~CudaBackend() override { d_.release(dev_); }

  const char* name() const override { return "cuda"; }
  size_t granularity() const override { return granularity_; }

  uintptr_t reserve(size_t bytes) override {
    ContextScope scope(d_, ctx_);
    CUdeviceptr ptr = 0;
    check(d_, d_.address_reserve(&ptr, bytes, granularity_, 0, 0),
          "VirtualRange(): cuMemAddressReserve(" + std::to_string(bytes) + " bytes)");
    return static_cast<uintptr_t>(ptr);
  }

  void free_reservation(uintptr_t base, size_t bytes) noexcept override {
    try {
      ContextScope scope(d_, ctx_);
      d_.address_free(base, bytes);
    } catch (...) {
    }
  }

  uint64_t create_handle(size_t bytes) override {
    ContextScope scope(d_, ctx_);
    CUmemGenericAllocationHandle h = 0;
    check(d_, d_.create(&h, bytes, &prop_, 0),
          "cuMemCreate(" + std::to_string(bytes) + " bytes on device " + std::to_string(device_) + ")");
    return h;
  }

  void release_handle(uint64_t handle) noexcept override {
    try {
      ContextScope scope(d_, ctx_);
      d_.mem_release(handle);
    } catch (...) {
    }
  }

  void map_run(uintptr_t addr, const uint64_t* handles, size_t count, size_t chunk) override {
    ContextScope scope(d_, ctx_);
    size_t done = 0;
    CUresult r = CUDA_SUCCESS;
    const char* call = "cuMemMap";
    for (; done < count && r == CUDA_SUCCESS; ++done) {
      r = d_.map(addr + done * chunk, chunk, 0, handles[done], 0);
    }
    if (r == CUDA_SUCCESS) {
      // One access call for the whole run: the range may span several allocations.
      const CUmemAccessDesc access{CUmemLocation{CU_MEM_LOCATION_TYPE_DEVICE, device_},
                                   CU_MEM_ACCESS_FLAGS_PROT_READWRITE};
      r = d_.set_access(addr, count * chunk, &access, 1);
      call = "cuMemSetAccess";
    } else {
      --done;  // the failed chunk is not mapped
    }
    if (r != CUDA_SUCCESS) {
      for (size_t i = 0; i < done; ++i) d_.unmap(addr + i * chunk, chunk);
      throw VirtualMemoryFailure(std::string("map(): ") + call + " of " + std::to_string(count * chunk) +
                                 " bytes failed: " + describe(d_, r));
    }
  }

  size_t unmap_run(uintptr_t addr, size_t count, size_t chunk, std::string* error) override {
    ContextScope scope(d_, ctx_);
    CUresult r = d_.synchronize();  // kernels in flight may still read these pages
    if (r != CUDA_SUCCESS) {
      *error = "unmap(): cuCtxSynchronize failed: " + describe(d_, r);
      return 0;
    }
    for (size_t i = 0; i < count; ++i) {
      r = d_.unmap(addr + i * chunk, chunk);
      if (r != CUDA_SUCCESS) {
        *error = "unmap(): cuMemUnmap failed: " + describe(d_, r);
        return i;
      }
    }
    return count;
  }

 private:
  const Driver& d_;
  int device_;
  CUdevice dev_ = 0;
  CUcontext ctx_ = nullptr;
  CUmemAllocationProp prop_{};
  size_t granularity_ = 0;
};

}  // namespace

std::unique_ptr<VmmBackend> make_cuda_backend(int device) { return std::make_unique<CudaBackend>(device); }

}  // namespace kvpool
