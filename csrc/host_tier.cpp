#include "host_tier.h"

#include <algorithm>
#include <string>

#include "errors.h"

namespace kvpool {

using std::to_string;

HostTier::HostTier(BlockAllocator* gpu, BlockAllocator* host)
    : gpu_(gpu), host_(host), block_size_(gpu->block_size()) {
  if (gpu == host) {
    throw InvalidArgument("HostTier: the host allocator is the GPU allocator; give the host tier its own "
                          "BlockAllocator(num_host_blocks, block_size)");
  }
  if (host->block_size() != gpu->block_size()) {
    throw InvalidArgument("HostTier: host block_size=" + to_string(host->block_size()) + " differs from the GPU's " +
                          to_string(gpu->block_size()) + "; host pages mirror the GPU shard's geometry");
  }
  if (!host->prefix_caching()) {
    throw InvalidArgument("HostTier: the host allocator has prefix caching disabled; the host tier IS a prefix "
                          "cache: build it with enable_prefix_caching=True");
  }
  in_flight_.assign(static_cast<size_t>(host->max_num_blocks()), 0);  // every id the host pool may grow to
}

int64_t HostTier::continue_hit(const uint64_t* hashes, int64_t k, const int32_t* tokens, uint64_t context,
                               int64_t gpu_hits, const int32_t* gpu_blocks, HostCursor* cursor) {
  *cursor = HostCursor{};
  ++stats_.host_queries;
  ids_.resize(static_cast<size_t>(k));
  stamps_.resize(static_cast<size_t>(k));
  bool collided = false;
  const int64_t walked = host_->probe_chain(hashes, k, tokens, k * block_size_, context, ids_.data(), stamps_.data(),
                                            &collided);
  int64_t readable_end = 0;  // a hit stops before a block whose offload is still in flight
  while (readable_end < walked && readable(ids_[static_cast<size_t>(readable_end)])) ++readable_end;
  int32_t none = 0;
  // One reference on every block of the walked chain: the blocks to reload keep theirs until their copy
  // is done, the others give it back at once, which moves a prefix in use to the host LRU's young end.
  if (walked > 0 && host_->take_cached(ids_.data(), walked, stamps_.data(), walked, 0, &none, k, collided)) {
    touch_.clear();
    fresh_.clear();
    for (int64_t j = 0; j < walked; ++j) {
      const int32_t b = ids_[static_cast<size_t>(j)];
      if (j >= gpu_hits && j < readable_end) {
        reloads_.emplace_back(b, gpu_blocks[j]);
        fresh_.push_back(gpu_blocks[j]);
      } else {
        touch_.push_back(b);
      }
    }
    gpu_->incref(fresh_.data(), static_cast<int64_t>(fresh_.size()));  // the reload's hold on its destination
    host_->free(touch_.data(), static_cast<int64_t>(touch_.size()));
    stats_.host_hit_blocks += static_cast<int64_t>(fresh_.size());
    cursor->cached = walked;
    cursor->chain = stamps_[static_cast<size_t>(walked - 1)];
    cursor->last = ids_[static_cast<size_t>(walked - 1)];
  } else {
    readable_end = 0;
  }
  // GPU hits the host lost (its LRU evicted them): offload them again, so the chain goes on.
  if (gpu_hits > cursor->cached) offload(hashes, tokens, context, gpu_blocks, gpu_hits, cursor);
  return std::max(gpu_hits, readable_end);
}

int64_t HostTier::leading_present(const uint64_t* hashes, const int32_t* tokens, uint64_t context, int64_t first,
                                  int64_t full, HostCursor* cursor) {
  int64_t j = first;
  for (; j < full; ++j) {
    int32_t id = -1;
    uint64_t stamp = 0, parent = cursor->chain;
    bool collided = false;
    if (host_->probe_anchored(hashes + j, 1, tokens + j * block_size_, block_size_, context, &parent, 1, &id, &stamp,
                              &collided) == 0) {
      break;
    }
    cursor->cached = j + 1;
    cursor->chain = stamp;
    cursor->last = id;
  }
  return j;
}

// Up to n fresh host blocks into fresh_[0, got) (fewer when in-flight copies hold the rest). The host
// block the chain goes on from is taken with them (its stamp re-checked) and given back, so the
// allocation cannot evict it: 0 when it is gone (evicted since), and the chain with it.
int64_t HostTier::take_fresh(int64_t n, HostCursor* cursor) {
  int32_t parent_refs = 1;
  if (cursor->last >= 0) host_->refcounts(&cursor->last, 1, &parent_refs);
  n = std::min(n, host_->num_free_blocks() - (parent_refs == 0 ? 1 : 0));
  if (n <= 0) return 0;
  fresh_.resize(static_cast<size_t>(n));
  if (cursor->last < 0) {
    host_->allocate(n, fresh_.data());
    return n;
  }
  if (!host_->take_cached(&cursor->last, 1, &cursor->chain, 1, n, fresh_.data(), 0, 0)) return 0;
  host_->free(&cursor->last, 1);
  return n;
}

void HostTier::offload(const uint64_t* hashes, const int32_t* tokens, uint64_t context, const int32_t* gpu_blocks,
                       int64_t full, HostCursor* cursor) {
  const int64_t first = cursor->cached;
  if (cursor->chain == kChainBroken || first >= full) return;
  const int64_t start = leading_present(hashes, tokens, context, first, full, cursor);
  stats_.skipped_blocks += start - first;
  const int64_t want = full - start;
  if (want == 0) return;
  const int64_t got = take_fresh(want, cursor);
  int64_t cached = 0;
  if (got > 0) {
    chains_.resize(static_cast<size_t>(got));
    host_->cache_blocks_chained(fresh_.data(), got, hashes + start, got, tokens + start * block_size_,
                                got * block_size_, context, cursor->chain, chains_.data());
    while (cached < got && chains_[static_cast<size_t>(cached)] != kChainBroken) ++cached;
    for (int64_t j = 0; j < cached; ++j) {
      const int32_t h = fresh_[static_cast<size_t>(j)];
      offloads_.emplace_back(gpu_blocks[start + j], h);
      in_flight_[static_cast<size_t>(h)] = 1;
    }
    gpu_->incref(gpu_blocks + start, cached);  // the copy's hold on its source
    // A collision with a held host block stops the chain: the blocks not cached go back at once.
    if (cached < got) host_->free(fresh_.data() + cached, got - cached);
  }
  stats_.offloaded_blocks += cached;
  stats_.dropped_blocks += want - cached;
  if (cached > 0) {
    cursor->cached = start + cached;
    cursor->chain = chains_[static_cast<size_t>(cached - 1)];
    cursor->last = fresh_[static_cast<size_t>(cached - 1)];
  }
  if (cached < want) cursor->chain = kChainBroken;
}

int64_t HostTier::pop(int32_t* reload_host, int32_t* reload_gpu, int32_t* offload_gpu, int32_t* offload_host) {
  if (reloads_.empty() && offloads_.empty()) return 0;
  for (size_t i = 0; i < reloads_.size(); ++i) {
    reload_host[i] = reloads_[i].first;
    reload_gpu[i] = reloads_[i].second;
  }
  for (size_t i = 0; i < offloads_.size(); ++i) {
    offload_gpu[i] = offloads_[i].first;
    offload_host[i] = offloads_[i].second;
  }
  Batch batch;
  batch.reloads.swap(reloads_);
  batch.offloads.swap(offloads_);
  batch.reloads_done = batch.reloads.empty();
  batch.offloads_done = batch.offloads.empty();
  const int64_t id = next_batch_++;
  if (!batch.reloads.empty()) unlaunched_.insert(id);
  batches_.emplace(id, std::move(batch));
  return id;
}

void HostTier::launched(int64_t batch) {
  if (batch < 1 || batch >= next_batch_) {
    throw InvalidArgument("launched(): transfer batch " + to_string(batch) + " was never returned by "
                          "pop_transfers(); pass the batch of the Transfers whose copies you enqueued");
  }
  unlaunched_.erase(batch);
}

void HostTier::complete(int64_t id, bool reloads) {
  const char* kind = reloads ? "reloads" : "offloads";
  auto it = batches_.find(id);
  if (it == batches_.end()) {
    throw InvalidArgument("complete(): no transfer batch " + to_string(id) + " is in flight (completed already, or "
                          "never returned by pop_transfers())");
  }
  Batch& batch = it->second;
  bool& done = reloads ? batch.reloads_done : batch.offloads_done;
  if (done) {
    throw InvalidArgument(std::string("complete(): the ") + kind + " of transfer batch " + to_string(id) +
                          " were completed already (or it had none)");
  }
  std::vector<int32_t> gpu, host;
  for (const auto& p : reloads ? batch.reloads : batch.offloads) {
    gpu.push_back(reloads ? p.second : p.first);
    host.push_back(reloads ? p.first : p.second);
  }
  if (!reloads) {
    for (int32_t h : host) in_flight_[static_cast<size_t>(h)] = 0;  // readable from now on
  }
  gpu_->free(gpu.data(), static_cast<int64_t>(gpu.size()));
  host_->free(host.data(), static_cast<int64_t>(host.size()));
  (reloads ? stats_.completed_reloads : stats_.completed_offloads) += static_cast<int64_t>(gpu.size());
  done = true;
  if (reloads) unlaunched_.erase(id);  // done: certainly enqueued
  if (batch.reloads_done && batch.offloads_done) batches_.erase(it);
}

bool HostTier::transfers_of(int64_t batch, std::vector<std::pair<int32_t, int32_t>>* reloads,
                            std::vector<std::pair<int32_t, int32_t>>* offloads) const {
  auto it = batches_.find(batch);
  if (it == batches_.end()) return false;
  const Batch& b = it->second;
  *reloads = b.reloads_done ? std::vector<std::pair<int32_t, int32_t>>{} : b.reloads;
  *offloads = b.offloads_done ? std::vector<std::pair<int32_t, int32_t>>{} : b.offloads;
  return true;
}

HostTierStats HostTier::stats() const {
  HostTierStats s = stats_;
  s.pending_reloads = pending_reloads();
  s.pending_offloads = pending_offloads();
  for (const auto& kv : batches_) {
    if (!kv.second.reloads_done) s.in_flight_reloads += static_cast<int64_t>(kv.second.reloads.size());
    if (!kv.second.offloads_done) s.in_flight_offloads += static_cast<int64_t>(kv.second.offloads.size());
  }
  return s;
}

}  // namespace kvpool
