// SeqTable's half of shrinking an elastic pool whose top blocks are held (docs/elastic.md): the
// allocator moves the references, hashes and verified entries to free lower ids; this file renames
// the moved blocks wherever the tables name them. The caller copies each block's KV src -> dst
// (copy_blocks) before anything reads the new ids, then shrinks the allocator and unmaps the top.
#include <string>
#include <vector>

#include "errors.h"
#include "host_tier.h"
#include "seq_table.h"
#include "seq_table_internal.h"

namespace kvpool {

int64_t HostTier::in_flight_gpu_at_or_above(int32_t low) const {
  int64_t count = 0;
  for (const auto& kv : batches_) {
    const Batch& b = kv.second;
    for (const auto& r : b.reloads) count += !b.reloads_done && r.second >= low;
    for (const auto& o : b.offloads) count += !b.offloads_done && o.first >= low;
  }
  return count;
}

void HostTier::rename_queued_gpu(const std::function<bool(int32_t&)>& rename) {
  for (auto& r : reloads_) rename(r.second);
  for (auto& o : offloads_) rename(o.first);
}

// A host tier's in-flight copies name GPU blocks that cannot be renamed under them: refused, nothing changed.
void SeqTable::check_no_copy_in_flight(int64_t n) const {
  const int64_t top = allocator_->num_blocks();
  if (host_ == nullptr || n < 0 || n > top) return;  // the allocator refuses a bad n
  const int64_t busy = host_->in_flight_gpu_at_or_above(static_cast<int32_t>(top - n));
  if (busy > 0) {
    throw InvalidArgument("relocate_top(): " + std::to_string(busy) + " host-tier copies in flight read or write "
                          "blocks among the top " + std::to_string(n) + " ids; complete them first "
                          "(HostKVTier.run / poll) and retry; nothing changed");
  }
}

int64_t SeqTable::relocate_top(int64_t n, int32_t* src, int32_t* dst) {
  check_no_copy_in_flight(n);
  const int64_t m = allocator_->relocate_top(n, src, dst);  // validates n; throws with nothing changed
  if (m == 0) return 0;
  // src ascends: every moved id lies in [src[0], src[m - 1]] (read from the result, not from num_blocks,
  // which another thread sharing the allocator may change meanwhile)
  const int32_t low = src[0];
  std::vector<int32_t> moved_to(static_cast<size_t>(src[m - 1] - low + 1), -1);
  for (int64_t j = 0; j < m; ++j) moved_to[static_cast<size_t>(src[j] - low)] = dst[j];
  auto rename = [&](int32_t& b) -> bool {
    if (b < low || b - low >= static_cast<int32_t>(moved_to.size())) return false;  // kReleased (-1) too
    const int32_t to = moved_to[static_cast<size_t>(b - low)];
    if (to < 0) return false;
    b = to;
    return true;
  };
  for (auto& kv : index_) {
    Seq& s = kv.second;
    bool changed = false;
    for (int32_t& b : s.blocks) changed = rename(b) || changed;
    if (changed) ++s.version;  // its decode-step rows are rewritten in full next time
  }
  for (auto& copy : copies_) {
    rename(copy.first);
    rename(copy.second);
  }
  std::unordered_map<int32_t, int32_t> queued;
  for (const auto& kv : queued_) {
    int32_t b = kv.first;
    rename(b);
    queued[b] += kv.second;
  }
  queued_.swap(queued);
  if (host_ != nullptr) host_->rename_queued_gpu(rename);
  return m;
}

}  // namespace kvpool
