// SeqTable::add()'s prefix hit across KV-cache groups (vLLM's rule; docs/allocator.md "Hybrid models").
//
// A hit of h blocks needs, in every full group, blocks 0..h-1 verified as a chain (today's rule), and
// in a group of window W only the blocks of tokens [max(0, h * bs - W + 1), h * bs) (the rest lies before
// the window and is never allocated). A windowed group's entry for block i records as its parent the
// stamp of the reference group's (the first full group's) block i - 1, so the reference chain proves
// the prefix and the windowed block needs nothing cached before it. Without a full group every group
// chains on its own blocks. h is the largest value every group can serve:
//   1. each chained group walks its chain, up to the smallest h found so far;
//   2. the anchored groups are checked from h down: a miss at block i of any group rules out every
//      h' in (i, h] (block i lies in their windows), so h becomes i and the check goes on;
//   3. take_cached() takes the hits and the fresh blocks in one locked call, all or nothing.
// Probes take no lock across calls, so take_cached() re-checks every block's stamp; if another thread
// evicted one in between, the search runs again (a few rounds, then no hit: always correct).
#include <algorithm>

#include "block_hash.h"
#include "seq_table.h"
#include "seq_table_internal.h"

namespace kvpool {

using namespace seq_table_detail;

namespace {
constexpr int kProbeRounds = 4;  // searches before settling for no hit (only other threads can force a retry)
}  // namespace

int64_t SeqTable::add_across_groups(Seq& s, const int32_t* tokens, int64_t n) {
  const int64_t matchable = (n - 1) / block_size_;  // the last token is always recomputed (its logits)
  HitSearch hs;
  hs.ids.assign(static_cast<size_t>(num_groups_), std::vector<int32_t>(static_cast<size_t>(matchable)));
  hs.stamps.assign(static_cast<size_t>(num_groups_), std::vector<uint64_t>(static_cast<size_t>(matchable)));
  for (int round = 0; round < kProbeRounds; ++round) {
    hs.h = matchable;
    hs.collisions = 0;
    probe_chained(hs, s, tokens);
    probe_windows(hs, s, tokens);
    if (take_hits(hs, s, matchable)) return hs.h;
  }
  hs.h = 0;
  hs.collisions = 0;
  take_hits(hs, s, matchable);  // no hit: nothing to re-check, so it cannot be refused
  return 0;
}

void SeqTable::probe_chained(HitSearch& hs, const Seq& s, const int32_t* tokens) {
  for (int32_t g : chained_) {
    if (hs.h == 0) return;
    const int64_t k = hs.h;
    bool collided = false;
    hs.h = allocator_->probe_chain(group_hashes(s, g, 0, k), k, tokens, k * block_size_,
                                   group_context(s.context, g, key_), hs.ids[g].data(), hs.stamps[g].data(),
                                   &collided);
    hs.collisions += collided;
  }
}

void SeqTable::probe_windows(HitSearch& hs, const Seq& s, const int32_t* tokens) {
  if (anchored_.empty()) return;
  const std::vector<uint64_t>& anchors = hs.stamps[static_cast<size_t>(reference_)];  // valid below hs.h
  // Group anchored_[a] has blocks [verified[a], h) verified so far (empty at first).
  std::vector<int64_t> verified(anchored_.size(), hs.h);
  const int64_t bs = block_size_;
  for (size_t a = 0; a < anchored_.size() && hs.h > 0;) {
    const int32_t g = anchored_[a];
    const int64_t lo = released_before(g, hs.h * bs);
    verified[a] = std::min(verified[a], hs.h);
    if (lo >= verified[a]) {
      ++a;
      continue;
    }
    const int64_t k = verified[a] - lo;
    parents_.resize(static_cast<size_t>(k));
    for (int64_t j = 0; j < k; ++j) parents_[j] = lo + j == 0 ? kChainRoot : anchors[static_cast<size_t>(lo + j - 1)];
    bool collided = false;
    verified[a] -= allocator_->probe_anchored(group_hashes(s, g, lo, k), k, tokens + lo * bs, k * bs,
                                              group_context(s.context, g, key_), parents_.data(), k,
                                              hs.ids[g].data() + lo, hs.stamps[g].data() + lo, &collided);
    if (verified[a] > lo) {  // a miss at block verified[a] - 1: no h above it; check every group again
      hs.collisions += collided;
      hs.h = verified[a] - 1;
      a = 0;
    } else {
      ++a;
    }
  }
}

// Takes the hits of hs.h and the fresh blocks; false (nothing changed) when a probed block was evicted.
bool SeqTable::take_hits(HitSearch& hs, Seq& s, int64_t matchable) {
  const int64_t h = hs.h, bs = block_size_, G = num_groups_;
  const int64_t total = num_positions_of(s);
  int64_t lo[kMaxGroups];
  for (int32_t g = 0; g < num_groups_; ++g) lo[g] = released_before(g, h * bs);
  gathered_.clear();
  masked_.clear();
  for (int64_t j = 0; j < h; ++j) {
    for (int32_t g = 0; g < num_groups_; ++g) {
      if (j < lo[g]) continue;  // before the window: never allocated
      gathered_.push_back(hs.ids[g][static_cast<size_t>(j)]);
      masked_.push_back(hs.stamps[g][static_cast<size_t>(j)]);
    }
  }
  const int64_t k = static_cast<int64_t>(gathered_.size());
  fresh_.resize(static_cast<size_t>(G * (total - h)));
  if (!allocator_->take_cached(gathered_.data(), k, masked_.data(), k, G * (total - h), fresh_.data(),
                               G * matchable, hs.collisions)) {
    return false;
  }
  int64_t hit = 0, fresh = 0;
  for (int64_t j = 0; j < total; ++j) {  // position-major, as everywhere
    for (int32_t g = 0; g < num_groups_; ++g) {
      int32_t& block = s.blocks[static_cast<size_t>(j * G + g)];
      block = j >= h ? fresh_[static_cast<size_t>(fresh++)] : j < lo[g] ? kReleased : gathered_[static_cast<size_t>(hit++)];
    }
  }
  s.num_cached = h;  // the window's early positions are released: released_before(g, h * bs) = lo[g]
  for (int32_t g : chained_) chain_of(s, g) = h > 0 ? hs.stamps[g][static_cast<size_t>(h - 1)] : kChainRoot;
  if (reference_ >= 0 && !anchored_.empty()) {
    s.anchors.assign(hs.stamps[reference_].begin(), hs.stamps[reference_].begin() + h);
  }
  return true;
}

}  // namespace kvpool
