// SeqTable's side of the host tier (host_tier.h): add() continues a GPU prefix hit on the host, blocks offered
// to the GPU prefix cache are offloaded, and the queued transfers leave in batches.
#include <string>

#include "errors.h"
#include "seq_table.h"
#include "seq_table_internal.h"

namespace kvpool {

using namespace seq_table_detail;

void SeqTable::attach_host_tier(HostTier* tier) {
  if (host_ != nullptr) throw InvalidArgument("attach_host_tier(): this table has a host tier already");
  if (tier->gpu() != allocator_) {
    throw InvalidArgument("attach_host_tier(): the host tier was built for another GPU allocator; give each "
                          "BlockTables its own HostKVTier");
  }
  if (num_groups_ != 1 || any_window_) {
    throw InvalidArgument("host tier: " + std::to_string(num_groups_) + " KV-cache group(s) with a sliding window or "
                          "several groups; the host tier supports one full-attention group only: build BlockTables "
                          "without host_tier for hybrid models");
  }
  if (!prefix_caching_) {
    throw InvalidArgument("host tier: prefix caching is disabled; the host tier extends the prefix cache: build the "
                          "allocator and BlockTables with enable_prefix_caching=True");
  }
  if (!index_.empty()) {
    throw InvalidArgument("attach_host_tier(): the table holds " + std::to_string(index_.size()) +
                          " sequences; attach the host tier before the first add()");
  }
  host_ = tier;
}

int64_t SeqTable::continue_on_host(Seq& s, const int32_t* tokens, int64_t matchable, int64_t gpu_hits) {
  const int64_t before = host_->pending_reloads();
  const int64_t hits = host_->continue_hit(allocator_hashes(s, 0, matchable), matchable, tokens, s.context, gpu_hits,
                                           s.blocks.data(), &s.host);
  if (host_->pending_reloads() > before) s.reload_batch = host_->next_batch();
  return hits;
}

void SeqTable::offload_to_host(Seq& s, int64_t full) {
  if (s.host.chain == kChainBroken || s.host.cached >= full) return;
  host_->offload(allocator_hashes(s, 0, full), s.tokens.data(), s.context, s.blocks.data(), full, &s.host);
}

int64_t SeqTable::pop_transfers(int32_t* reload_host, int32_t* reload_gpu, int32_t* offload_gpu,
                                int32_t* offload_host) {
  return host_->pop(reload_host, reload_gpu, offload_gpu, offload_host);
}

}  // namespace kvpool
