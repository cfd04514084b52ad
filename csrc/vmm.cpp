// VirtualRange: validation and per-chunk bookkeeping shared by the host and CUDA backends.
#include "vmm.h"

#include <algorithm>
#include <utility>

#include "errors.h"

namespace kvpool {

namespace {

std::string bytes_str(int64_t v) { return std::to_string(v); }

// Calls fn(first, count) for each maximal run of chunks with flags[i] != 0.
template <typename Fn>
void for_each_run(const std::vector<uint8_t>& flags, Fn fn) {
  size_t i = 0;
  while (i < flags.size()) {
    if (!flags[i]) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < flags.size() && flags[j]) ++j;
    fn(i, j - i);
    i = j;
  }
}

}  // namespace

VirtualRange::VirtualRange(int64_t nbytes, const std::string& backend, int device, int64_t chunk_bytes) {
  if (nbytes <= 0) {
    throw InvalidArgument("VirtualRange(): nbytes=" + bytes_str(nbytes) +
                          " must be > 0 (the bytes of address space to reserve)");
  }
  if (device < 0) {
    throw InvalidArgument("VirtualRange(): device=" + std::to_string(device) + " must be a device ordinal >= 0");
  }
  if (chunk_bytes < 0) {
    throw InvalidArgument("VirtualRange(): chunk_bytes=" + bytes_str(chunk_bytes) +
                          " must be >= 0 (0: the device's granularity)");
  }
  if (backend == "host") {
    backend_ = make_host_backend();
  } else if (backend == "cuda") {
    backend_ = make_cuda_backend(device);
  } else {
    throw InvalidArgument("VirtualRange(): backend='" + backend + "' must be 'host' or 'cuda'");
  }
  const size_t device_granularity = backend_->granularity();
  granularity_ = chunk_bytes == 0 ? device_granularity : static_cast<size_t>(chunk_bytes);
  if (granularity_ % device_granularity != 0) {
    throw InvalidArgument("VirtualRange(): chunk_bytes=" + bytes_str(chunk_bytes) + " must be a multiple of the " +
                          std::string(backend_->name()) + " granularity " + std::to_string(device_granularity));
  }
  const size_t n = static_cast<size_t>(nbytes);
  const size_t chunks = n / granularity_ + (n % granularity_ != 0);
  reserved_ = chunks * granularity_;
  base_ = backend_->reserve(reserved_);
  handles_.assign(chunks, 0);
  mapped_.assign(chunks, 0);
}

VirtualRange::~VirtualRange() {
  std::lock_guard<std::mutex> lock(mutex_);
  std::string error;
  for_each_run(mapped_, [&](size_t first, size_t count) {
    backend_->unmap_run(base_ + first * granularity_, count, granularity_, &error);
    for (size_t c = first; c < first + count; ++c) backend_->release_handle(handles_[c]);
  });
  for (uint64_t h : prepared_) backend_->release_handle(h);
  backend_->free_reservation(base_, reserved_);
}

size_t VirtualRange::mapped_bytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return mapped_chunks_ * granularity_;
}

size_t VirtualRange::prepared_bytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return prepared_.size() * granularity_;
}

bool VirtualRange::asleep() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return asleep_;
}

bool VirtualRange::is_mapped(int64_t offset) const {
  if (offset < 0 || static_cast<size_t>(offset) >= reserved_) {
    throw InvalidArgument("is_mapped(): offset=" + bytes_str(offset) + " is outside the reserved range [0, " +
                          std::to_string(reserved_) + ")");
  }
  std::lock_guard<std::mutex> lock(mutex_);
  return mapped_[static_cast<size_t>(offset) / granularity_] != 0;
}

// The first chunk of [offset, offset + nbytes), validated: aligned, non-negative, inside the range.
size_t VirtualRange::chunk_index(int64_t offset, int64_t nbytes, const char* fn) const {
  const auto g = static_cast<int64_t>(granularity_);
  if (offset < 0 || nbytes < 0) {
    throw InvalidArgument(std::string(fn) + ": offset=" + bytes_str(offset) + " and nbytes=" + bytes_str(nbytes) +
                          " must be >= 0");
  }
  if (offset % g != 0 || nbytes % g != 0) {
    throw InvalidArgument(std::string(fn) + ": offset=" + bytes_str(offset) + " and nbytes=" + bytes_str(nbytes) +
                          " must be multiples of the granularity " + bytes_str(g) +
                          " (round them to chunk boundaries)");
  }
  if (offset > static_cast<int64_t>(reserved_) || nbytes > static_cast<int64_t>(reserved_) - offset) {
    throw InvalidArgument(std::string(fn) + ": [offset, offset + nbytes) = [" + bytes_str(offset) + ", " +
                          std::to_string(static_cast<uint64_t>(offset) + static_cast<uint64_t>(nbytes)) +
                          ") exceeds the reserved range [0, " + std::to_string(reserved_) + ")");
  }
  return static_cast<size_t>(offset / g);
}

void VirtualRange::check_awake(const char* fn) const {
  if (asleep_) {
    throw InvalidArgument(std::string(fn) + ": the range is asleep (release_all() was called); call remap_all() first");
  }
}

// Maps chunks [first, first + count), all unmapped: prepared handles first, new ones for the rest.
void VirtualRange::map_chunks(size_t first, size_t count) {
  std::vector<uint64_t> handles;
  handles.reserve(count);
  const size_t from_cache = std::min(count, prepared_.size());
  handles.assign(prepared_.end() - static_cast<std::ptrdiff_t>(from_cache), prepared_.end());
  prepared_.resize(prepared_.size() - from_cache);
  try {
    while (handles.size() < count) handles.push_back(backend_->create_handle(granularity_));
    backend_->map_run(base_ + first * granularity_, handles.data(), count, granularity_);
  } catch (...) {
    // Nothing was mapped: the prepared handles go back to the cache, the new ones are released.
    for (size_t i = 0; i < handles.size(); ++i) {
      if (i < from_cache) {
        prepared_.push_back(handles[i]);
      } else {
        backend_->release_handle(handles[i]);
      }
    }
    throw;
  }
  for (size_t i = 0; i < count; ++i) {
    handles_[first + i] = handles[i];
    mapped_[first + i] = 1;
  }
  mapped_chunks_ += count;
}

// Unmaps chunks [first, first + count), all mapped, and releases their physical memory.
void VirtualRange::unmap_chunks(size_t first, size_t count) {
  std::string error;
  const size_t done = backend_->unmap_run(base_ + first * granularity_, count, granularity_, &error);
  for (size_t c = first; c < first + done; ++c) {
    backend_->release_handle(handles_[c]);
    handles_[c] = 0;
    mapped_[c] = 0;
  }
  mapped_chunks_ -= done;
  if (done < count) throw VirtualMemoryFailure(error);
}

void VirtualRange::map(int64_t offset, int64_t nbytes) {
  const size_t first = chunk_index(offset, nbytes, "map()");
  const size_t count = static_cast<size_t>(nbytes) / granularity_;
  std::lock_guard<std::mutex> lock(mutex_);
  check_awake("map()");
  for (size_t c = first; c < first + count; ++c) {
    if (mapped_[c]) {
      throw InvalidArgument("map(): the chunk at offset " + std::to_string(c * granularity_) +
                            " is mapped already (unmap it first, or map only the unmapped chunks); nothing was mapped");
    }
  }
  if (count > 0) map_chunks(first, count);
}

void VirtualRange::unmap(int64_t offset, int64_t nbytes) {
  const size_t first = chunk_index(offset, nbytes, "unmap()");
  const size_t count = static_cast<size_t>(nbytes) / granularity_;
  std::lock_guard<std::mutex> lock(mutex_);
  check_awake("unmap()");
  for (size_t c = first; c < first + count; ++c) {
    if (!mapped_[c]) {
      throw InvalidArgument("unmap(): the chunk at offset " + std::to_string(c * granularity_) +
                            " is not mapped (unmap only mapped chunks); nothing was unmapped");
    }
  }
  if (count > 0) unmap_chunks(first, count);
}

void VirtualRange::prepare(int64_t nbytes) {
  if (nbytes < 0) throw InvalidArgument("prepare(): nbytes=" + bytes_str(nbytes) + " must be >= 0");
  const size_t chunks = static_cast<size_t>(nbytes) / granularity_ + (static_cast<size_t>(nbytes) % granularity_ != 0);
  std::lock_guard<std::mutex> lock(mutex_);
  check_awake("prepare()");
  const size_t room = handles_.size() - mapped_chunks_;  // never more than the range could map
  if (chunks > room) {
    throw InvalidArgument("prepare(): nbytes=" + bytes_str(nbytes) + " is more than the " +
                          std::to_string(room * granularity_) + " unmapped bytes of the range");
  }
  std::vector<uint64_t> fresh;
  try {
    while (prepared_.size() + fresh.size() < chunks) fresh.push_back(backend_->create_handle(granularity_));
  } catch (...) {
    for (uint64_t h : fresh) backend_->release_handle(h);
    throw;
  }
  prepared_.insert(prepared_.end(), fresh.begin(), fresh.end());
}

void VirtualRange::drop_prepared() {
  std::lock_guard<std::mutex> lock(mutex_);
  for (uint64_t h : prepared_) backend_->release_handle(h);
  prepared_.clear();
}

void VirtualRange::release_all() {
  std::lock_guard<std::mutex> lock(mutex_);
  check_awake("release_all()");
  const std::vector<uint8_t> was_mapped = mapped_;
  for (uint64_t h : prepared_) backend_->release_handle(h);
  prepared_.clear();
  // A failed unmap leaves the range awake, with the chunks it could not unmap still mapped.
  for_each_run(was_mapped, [&](size_t first, size_t count) { unmap_chunks(first, count); });
  asleep_map_ = was_mapped;
  asleep_ = true;
}

void VirtualRange::remap_all() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!asleep_) throw InvalidArgument("remap_all(): the range is awake; call release_all() first");
  std::vector<std::pair<size_t, size_t>> done;
  try {
    for_each_run(asleep_map_, [&](size_t first, size_t count) {
      map_chunks(first, count);
      done.emplace_back(first, count);
    });
  } catch (...) {
    for (const auto& run : done) unmap_chunks(run.first, run.second);  // stays asleep, nothing mapped
    throw;
  }
  asleep_ = false;
  asleep_map_.clear();
}

}  // namespace kvpool
