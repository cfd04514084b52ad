// HostTier: the bookkeeping of the host-memory tier of the prefix cache (issue 14; docs/host_tier.md).
//
// A second BlockAllocator hands out host block ids (pinned host pages of the GPU shard's geometry; the
// Python HostKVTier owns them and the copier). Its verified prefix cache is a tree of its own: a host
// entry records the stamp of the HOST block before it, so a host hit is verified from the first block
// on, exactly like a GPU hit (same tokens after the very same cached prefix, same salt, whatever the
// hash says). A hit may then take blocks [0, g) from the GPU and [g, h) from the host: both chains
// start at the root, so together they hold exactly the prompt's first h blocks.
//
// Write-through: every block a sequence offers to the GPU prefix cache is also offloaded, unless the host
// holds (or is receiving) that verified content already. An offload takes a fresh host block (the host
// LRU evicts), records its entry at once (so the chain of later blocks can name it) and holds:
//   - the GPU block (one reference): it is not handed out while the copy reads it;
//   - the host block (its allocation's reference) and an in-flight mark: a hit stops before it, so it is
//     never read before its copy lands.
// A reload (a host hit in add()) holds the host block (one reference) and the fresh GPU block (one
// reference, beside the sequence's) until its copy completes, so neither is reused early even when the
// sequence is freed first.
// Queued transfers leave in batches (pop()); complete(batch, kind) releases a batch's holds once its
// copies are done. Not thread-safe: one HostTier belongs to one SeqTable (one scheduler thread); the
// allocators it draws from lock themselves.
#pragma once

#include <cstdint>
#include <functional>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "block_allocator.h"

namespace kvpool {

// A sequence's place in the host tier's verified chain.
struct HostCursor {
  int64_t cached = 0;           // leading full blocks the host holds or is receiving
  uint64_t chain = kChainRoot;  // the host chain value after them; kChainBroken: nothing more is offloaded
  int32_t last = -1;            // host block of block cached - 1 (-1 when cached == 0)
};

struct HostTierStats {
  int64_t host_queries = 0;       // add() calls that walked the host tier
  int64_t host_hit_blocks = 0;    // blocks served by the host (queued reloads)
  int64_t offloaded_blocks = 0;   // offloads queued
  int64_t skipped_blocks = 0;     // offers the host already held (no copy)
  int64_t dropped_blocks = 0;     // offers not offloaded: host full of in-flight copies, or a collision
  int64_t completed_reloads = 0;  // reload copies completed (holds released)
  int64_t completed_offloads = 0; // offload copies completed (host blocks readable)
  int64_t pending_reloads = 0;    // snapshots at the time of stats()
  int64_t pending_offloads = 0;
  int64_t in_flight_reloads = 0;
  int64_t in_flight_offloads = 0;
};

class HostTier {
 public:
  // Refused: another block size, or a host allocator without prefix caching.
  HostTier(BlockAllocator* gpu, BlockAllocator* host);

  BlockAllocator* gpu() const { return gpu_; }
  BlockAllocator* host() const { return host_; }

  // add()'s continuation after a GPU hit of gpu_hits blocks: walks the host chain over hashes[0, k)
  // (tokens[0, k * bs)), queues a reload into gpu_blocks[j] for every readable host block j in
  // [gpu_hits, h), offloads GPU hits the host lacks, sets *cursor. Returns max(gpu_hits, h).
  int64_t continue_hit(const uint64_t* hashes, int64_t k, const int32_t* tokens, uint64_t context, int64_t gpu_hits,
                       const int32_t* gpu_blocks, HostCursor* cursor);
  // Offloads blocks [cursor->cached, full) of one sequence (their hashes, tokens and GPU blocks indexed
  // from block 0), continuing its chain; blocks the host holds are skipped.
  void offload(const uint64_t* hashes, const int32_t* tokens, uint64_t context, const int32_t* gpu_blocks,
               int64_t full, HostCursor* cursor);

  int64_t pending_reloads() const { return static_cast<int64_t>(reloads_.size()); }
  int64_t pending_offloads() const { return static_cast<int64_t>(offloads_.size()); }
  // Moves the queued transfers into a new in-flight batch (returns its id, >= 1; 0 when nothing was
  // queued): reload_host/reload_gpu [pending_reloads()], offload_gpu/offload_host [pending_offloads()].
  int64_t pop(int32_t* reload_host, int32_t* reload_gpu, int32_t* offload_gpu, int32_t* offload_host);
  // The id the transfers queued now will get from pop().
  int64_t next_batch() const { return next_batch_; }
  // The reloads of popped batch `batch` are enqueued on the compute stream (HostKVTier.run): a forward
  // enqueued from now on reads them. Refused (InvalidArgument) for a batch never popped.
  void launched(int64_t batch);
  // True when the reloads queued into batch `batch` are popped and enqueued (or completed).
  bool reloads_launched(int64_t batch) const { return batch < next_batch_ && unlaunched_.count(batch) == 0; }
  // The copies of one kind (reloads or offloads) of batch `batch` are done: release their holds and make
  // the offloaded host blocks readable. Refused (InvalidArgument, nothing changed) for an unknown batch
  // or a kind completed already.
  void complete(int64_t batch, bool reloads);
  // The copies of batch `batch` not completed yet, in pop() order (a completed kind's stay empty); false
  // when no such batch is in flight. HostKVTier.run enqueues with it a batch popped but never run, whose
  // holds would otherwise never be released.
  bool transfers_of(int64_t batch, std::vector<std::pair<int32_t, int32_t>>* reloads,
                    std::vector<std::pair<int32_t, int32_t>>* offloads) const;
  // True when host block b holds readable content (cached, its offload complete).
  bool readable(int32_t b) const { return in_flight_[static_cast<size_t>(b)] == 0; }
  HostTierStats stats() const;
  // Elastic pools (defined in seq_table_elastic.cpp): GPU ids >= low that in-flight copies read or write
  // (they cannot be renamed under a running copy), and renaming GPU ids in the queued, unpopped transfers.
  int64_t in_flight_gpu_at_or_above(int32_t low) const;
  void rename_queued_gpu(const std::function<bool(int32_t&)>& rename);

 private:
  struct Batch {
    std::vector<std::pair<int32_t, int32_t>> reloads;   // (host, gpu)
    std::vector<std::pair<int32_t, int32_t>> offloads;  // (gpu, host)
    bool reloads_done = false;
    bool offloads_done = false;
  };
  int64_t leading_present(const uint64_t* hashes, const int32_t* tokens, uint64_t context, int64_t first,
                          int64_t full, HostCursor* cursor);
  int64_t take_fresh(int64_t n, HostCursor* cursor);

  BlockAllocator* gpu_;
  BlockAllocator* host_;
  int32_t block_size_;
  std::vector<uint8_t> in_flight_;                     // [max_num_blocks]: 1 while an offload writes it
  std::vector<std::pair<int32_t, int32_t>> reloads_;   // queued (host, gpu)
  std::vector<std::pair<int32_t, int32_t>> offloads_;  // queued (gpu, host)
  std::unordered_map<int64_t, Batch> batches_;
  std::unordered_set<int64_t> unlaunched_;             // popped batches whose reloads are not enqueued yet
  int64_t next_batch_ = 1;
  HostTierStats stats_;
  // scratch
  std::vector<int32_t> ids_, fresh_, touch_;
  std::vector<uint64_t> stamps_, chains_;
};

}  // namespace kvpool
