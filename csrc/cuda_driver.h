// The few CUDA driver API types, constants and signatures the VMM layer uses, declared here so the
// package builds without the CUDA toolkit (cuda.h) and never links libcuda: vmm_cuda.cpp resolves
// the functions with dlopen("libcuda.so.1") + dlsym at first use. The layouts copy cuda.h (CUDA
// 13.0, unchanged since 10.2); csrc/checks/cuda_abi_check.cpp static_asserts them against the real
// header (tests/test_vmm_abi.py compiles it wherever cuda.h is installed).
#pragma once

#include <cstddef>

namespace kvpool::cu {

using CUresult = int;                                  // enum cudaError_enum; 0 is CUDA_SUCCESS
using CUdevice = int;                                  // CUdevice_v1
using CUdeviceptr = unsigned long long;                // CUdeviceptr_v2 (64-bit hosts)
using CUcontext = struct CUctx_st*;                    // opaque
using CUmemGenericAllocationHandle = unsigned long long;

constexpr CUresult CUDA_SUCCESS = 0;
constexpr int CU_MEM_ALLOCATION_TYPE_PINNED = 0x1;     // CUmemAllocationType
constexpr int CU_MEM_HANDLE_TYPE_NONE = 0x0;           // CUmemAllocationHandleType
constexpr int CU_MEM_LOCATION_TYPE_DEVICE = 0x1;       // CUmemLocationType
constexpr int CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 0x3;  // CUmemAccess_flags
constexpr int CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0x0;  // CUmemAllocationGranularity_flags

struct CUmemLocation {  // CUmemLocation_v1
  int type;             // CUmemLocationType
  int id;
};

struct CUmemAllocationProp {  // CUmemAllocationProp_v1
  int type;                   // CUmemAllocationType
  int requestedHandleTypes;   // CUmemAllocationHandleType
  CUmemLocation location;
  void* win32HandleMetaData;
  struct {
    unsigned char compressionType;
    unsigned char gpuDirectRDMACapable;
    unsigned short usage;
    unsigned char reserved[4];
  } allocFlags;
};

struct CUmemAccessDesc {  // CUmemAccessDesc_v1
  CUmemLocation location;
  int flags;              // CUmemAccess_flags
};

// Signatures (CUDAAPI is empty on Linux). The dlsym name is given where cuda.h #defines a _v2.
using cuInit_t = CUresult (*)(unsigned int flags);
using cuDeviceGet_t = CUresult (*)(CUdevice* device, int ordinal);
using cuDevicePrimaryCtxRetain_t = CUresult (*)(CUcontext* ctx, CUdevice dev);
using cuDevicePrimaryCtxRelease_t = CUresult (*)(CUdevice dev);  // "cuDevicePrimaryCtxRelease_v2"
using cuCtxPushCurrent_t = CUresult (*)(CUcontext ctx);          // "cuCtxPushCurrent_v2"
using cuCtxPopCurrent_t = CUresult (*)(CUcontext* ctx);          // "cuCtxPopCurrent_v2"
using cuCtxSynchronize_t = CUresult (*)();
using cuGetErrorString_t = CUresult (*)(CUresult error, const char** str);
using cuMemGetAllocationGranularity_t = CUresult (*)(size_t* granularity, const CUmemAllocationProp* prop,
                                                     int option);
using cuMemAddressReserve_t = CUresult (*)(CUdeviceptr* ptr, size_t size, size_t alignment, CUdeviceptr addr,
                                           unsigned long long flags);
using cuMemAddressFree_t = CUresult (*)(CUdeviceptr ptr, size_t size);
using cuMemCreate_t = CUresult (*)(CUmemGenericAllocationHandle* handle, size_t size, const CUmemAllocationProp* prop,
                                   unsigned long long flags);
using cuMemRelease_t = CUresult (*)(CUmemGenericAllocationHandle handle);
using cuMemMap_t = CUresult (*)(CUdeviceptr ptr, size_t size, size_t offset, CUmemGenericAllocationHandle handle,
                                unsigned long long flags);
using cuMemUnmap_t = CUresult (*)(CUdeviceptr ptr, size_t size);
using cuMemSetAccess_t = CUresult (*)(CUdeviceptr ptr, size_t size, const CUmemAccessDesc* desc, size_t count);

}  // namespace kvpool::cu
