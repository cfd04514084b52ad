// Compile-only check (never built into the package): csrc/cuda_driver.h matches the real cuda.h.
//   g++ -std=c++17 -fsyntax-only -I/usr/local/cuda/include -Icsrc csrc/checks/cuda_abi_check.cpp
// tests/test_vmm_abi.py runs it wherever cuda.h is installed.
#include <cuda.h>

#include <cstddef>
#include <type_traits>

#include "cuda_driver.h"

namespace k = kvpool::cu;

#define SAME_LAYOUT(ours, theirs)                                   \
  static_assert(sizeof(ours) == sizeof(theirs), #ours " size");     \
  static_assert(alignof(ours) == alignof(theirs), #ours " alignment")
#define SAME_OFFSET(ours, theirs, field) \
  static_assert(offsetof(ours, field) == offsetof(theirs, field), #ours "." #field " offset")

SAME_LAYOUT(k::CUresult, CUresult);
SAME_LAYOUT(k::CUdevice, CUdevice);
SAME_LAYOUT(k::CUdeviceptr, CUdeviceptr);
SAME_LAYOUT(k::CUcontext, CUcontext);
SAME_LAYOUT(k::CUmemGenericAllocationHandle, CUmemGenericAllocationHandle);
SAME_LAYOUT(k::CUmemLocation, CUmemLocation);
SAME_OFFSET(k::CUmemLocation, CUmemLocation, type);
SAME_OFFSET(k::CUmemLocation, CUmemLocation, id);
SAME_LAYOUT(k::CUmemAllocationProp, CUmemAllocationProp);
SAME_OFFSET(k::CUmemAllocationProp, CUmemAllocationProp, type);
SAME_OFFSET(k::CUmemAllocationProp, CUmemAllocationProp, requestedHandleTypes);
SAME_OFFSET(k::CUmemAllocationProp, CUmemAllocationProp, location);
SAME_OFFSET(k::CUmemAllocationProp, CUmemAllocationProp, win32HandleMetaData);
SAME_OFFSET(k::CUmemAllocationProp, CUmemAllocationProp, allocFlags);
SAME_LAYOUT(k::CUmemAccessDesc, CUmemAccessDesc);
SAME_OFFSET(k::CUmemAccessDesc, CUmemAccessDesc, location);
SAME_OFFSET(k::CUmemAccessDesc, CUmemAccessDesc, flags);
static_assert(sizeof(CUmemAllocationType) == sizeof(int) && sizeof(CUmemAccess_flags) == sizeof(int) &&
              sizeof(CUmemLocationType) == sizeof(int) && sizeof(CUmemAllocationGranularity_flags) == sizeof(int),
              "driver enums are int-sized");

static_assert(k::CUDA_SUCCESS == CUDA_SUCCESS);
static_assert(k::CU_MEM_ALLOCATION_TYPE_PINNED == CU_MEM_ALLOCATION_TYPE_PINNED);
static_assert(k::CU_MEM_HANDLE_TYPE_NONE == CU_MEM_HANDLE_TYPE_NONE);
static_assert(k::CU_MEM_LOCATION_TYPE_DEVICE == CU_MEM_LOCATION_TYPE_DEVICE);
static_assert(k::CU_MEM_ACCESS_FLAGS_PROT_READWRITE == CU_MEM_ACCESS_FLAGS_PROT_READWRITE);
static_assert(k::CU_MEM_ALLOC_GRANULARITY_MINIMUM == CU_MEM_ALLOC_GRANULARITY_MINIMUM);

// The function signatures match parameter by parameter in ABI terms: the same count, and each pair
// the same size and kind (pointer, or integer / enum: C enums travel as ints). Our CUresult is int
// where cuda.h has an enum, and our CUctx_st is a distinct opaque struct, hence no is_same.
template <typename A, typename B>
constexpr bool same_abi_arg() {
  return sizeof(A) == sizeof(B) && std::is_pointer_v<A> == std::is_pointer_v<B> &&
         (std::is_integral_v<A> || std::is_enum_v<A>) == (std::is_integral_v<B> || std::is_enum_v<B>);
}
template <typename F, typename G>
struct SameAbi : std::false_type {};
template <typename R1, typename... A, typename R2, typename... B>
struct SameAbi<R1 (*)(A...), R2 (*)(B...)> {
  static constexpr bool value = [] {
    if constexpr (sizeof...(A) != sizeof...(B)) {
      return false;
    } else {
      return same_abi_arg<R1, R2>() && (same_abi_arg<A, B>() && ...);
    }
  }();
};
#define SAME_FN(ours, theirs) static_assert(SameAbi<k::ours##_t, decltype(&theirs)>::value, #theirs " signature")

SAME_FN(cuInit, cuInit);
SAME_FN(cuDeviceGet, cuDeviceGet);
SAME_FN(cuDevicePrimaryCtxRetain, cuDevicePrimaryCtxRetain);
SAME_FN(cuDevicePrimaryCtxRelease, cuDevicePrimaryCtxRelease_v2);
SAME_FN(cuCtxPushCurrent, cuCtxPushCurrent_v2);
SAME_FN(cuCtxPopCurrent, cuCtxPopCurrent_v2);
SAME_FN(cuCtxSynchronize, cuCtxSynchronize);
SAME_FN(cuGetErrorString, cuGetErrorString);
SAME_FN(cuMemGetAllocationGranularity, cuMemGetAllocationGranularity);
SAME_FN(cuMemAddressReserve, cuMemAddressReserve);
SAME_FN(cuMemAddressFree, cuMemAddressFree);
SAME_FN(cuMemCreate, cuMemCreate);
SAME_FN(cuMemRelease, cuMemRelease);
SAME_FN(cuMemMap, cuMemMap);
SAME_FN(cuMemUnmap, cuMemUnmap);
SAME_FN(cuMemSetAccess, cuMemSetAccess);
