#include "seq_table.h"

#include <algorithm>
#include <bitset>
#include <cstring>
#include <limits>
#include <string>

#include "block_hash.h"
#include "errors.h"
#include "seq_table_internal.h"

namespace kvpool {

using std::to_string;
using namespace seq_table_detail;

namespace {
int32_t log2_if_power_of_two(int32_t n) {
  int32_t shift = 0;
  while ((int64_t{1} << shift) < n) ++shift;
  return (int64_t{1} << shift) == n ? shift : -1;
}
}  // namespace

SeqTable::SeqTable(BlockAllocator* allocator, int32_t max_seqs, int32_t max_blocks_per_seq, bool prefix_caching,
                   uint64_t hash_mask, const std::vector<int64_t>& group_windows)
    : allocator_(allocator),
      block_size_(allocator->block_size()),
      block_shift_(log2_if_power_of_two(block_size_)),
      max_seqs_(max_seqs),
      max_blocks_(max_blocks_per_seq),
      prefix_caching_(prefix_caching && allocator->prefix_caching()),
      key_(allocator->hash_key()),
      hash_mask_(hash_mask),
      num_groups_(static_cast<int32_t>(std::min<size_t>(group_windows.size(), kMaxGroups + 1))),
      windows_(group_windows) {
  if (max_seqs < 1) throw InvalidArgument("SeqTable: max_seqs=" + to_string(max_seqs) + " must be >= 1");
  if (max_blocks_per_seq < 1) {
    throw InvalidArgument("SeqTable: max_blocks_per_seq=" + to_string(max_blocks_per_seq) + " must be >= 1");
  }
  if (group_windows.empty() || group_windows.size() > static_cast<size_t>(kMaxGroups)) {
    throw InvalidArgument("SeqTable: " + to_string(group_windows.size()) + " KV-cache groups; need 1.." +
                          to_string(kMaxGroups) + " (one per attention kind: kvpool.plan.kv_groups)");
  }
  for (int32_t g = 0; g < num_groups_; ++g) {
    if (windows_[g] < 0) {
      throw InvalidArgument("SeqTable: group_windows[" + to_string(g) + "]=" + to_string(windows_[g]) +
                            " must be 0 (full attention) or a window >= 1 in tokens");
    }
    if (windows_[g] == 0 && reference_ < 0) reference_ = g;
    any_window_ = any_window_ || windows_[g] != 0;
    if (windows_[g] != 0) windowed_.push_back(g);
  }
  // Full groups chain their cache entries on their own blocks; windowed ones anchor on the first full
  // group's chain (a hit then needs only the window's blocks), or chain on their own without one.
  for (int32_t g = 0; g < num_groups_; ++g) (windows_[g] == 0 || reference_ < 0 ? chained_ : anchored_).push_back(g);
  const int64_t entries = int64_t{num_groups_} * max_seqs * max_blocks_per_seq;
  if (entries > std::numeric_limits<int32_t>::max()) {
    throw InvalidArgument("SeqTable: the decode-step table of " + to_string(num_groups_) + " groups x max_seqs=" +
                          to_string(max_seqs) + " x max_blocks_per_seq=" + to_string(max_blocks_per_seq) + " = " +
                          to_string(entries) + " entries exceeds 2**31 - 1; pass max_blocks_per_seq=ceil("
                          "max_model_len / block_size)");
  }
  step_table_.assign(static_cast<size_t>(entries), kTablePad);
  step_io_.assign(static_cast<size_t>(num_groups_ + 2) * static_cast<size_t>(max_seqs) + 1, 0);
  row_owner_.assign(max_seqs, 0);
  row_version_.assign(max_seqs, 0);
  row_len_.assign(max_seqs, 0);
  row_released_.assign(static_cast<size_t>(num_groups_) * static_cast<size_t>(max_seqs), 0);
}

// ---- lookup and validation -------------------------------------------------------------------

SeqTable::Seq& SeqTable::seq(int64_t id) {
  auto it = index_.find(id);
  if (it == index_.end()) {
    throw BlockIndexOutOfRange("unknown seq_id " + id_text(id) + ": add() it first (or it was already freed)");
  }
  return it->second;
}

const SeqTable::Seq& SeqTable::seq(int64_t id) const { return const_cast<SeqTable*>(this)->seq(id); }

std::vector<SeqTable::Seq*> SeqTable::lookup(const char* fn, const int64_t* ids, int64_t b) {
  if (++epoch_ == 0) {  // wrapped: clear the old marks once
    for (auto& kv : index_) kv.second.mark = 0;
    epoch_ = 1;
  }
  std::vector<Seq*> seqs(static_cast<size_t>(b));
  for (int64_t i = 0; i < b; ++i) {
    Seq& s = seq(ids[i]);
    if (s.mark == epoch_) {
      throw InvalidArgument(std::string(fn) + ": seq_id " + id_text(ids[i]) + " is listed twice; list each "
                            "sequence once per call");
    }
    s.mark = epoch_;
    seqs[i] = &s;
  }
  return seqs;
}

void SeqTable::check_width(const char* fn, const Seq& s, int64_t tokens) const {
  // A width of the whole pool or more is no limit when a full-attention group holds a block at every
  // position (more than that is the allocator's OutOfBlocks). Windowed groups alone release what leaves
  // the window, so positions may outgrow the pool: the decode table's width then always binds.
  // The pool's size (which grow()/shrink() change, read under the allocator's lock) is consulted only
  // past the width: this runs once per sequence per decode step.
  const int64_t blocks = cdiv(tokens, block_size_);
  if (blocks <= max_blocks_) return;
  const bool pool_bounds = reference_ >= 0 && max_blocks_ >= allocator_->num_blocks();
  if (!pool_bounds) {
    throw InvalidArgument(std::string(fn) + ": seq_id " + id_text(s.id) + " would hold " + to_string(tokens) +
                          " tokens = " + to_string(cdiv(tokens, block_size_)) + " blocks, more than "
                          "max_blocks_per_seq=" + to_string(max_blocks_) + "; build BlockTables with "
                          "max_blocks_per_seq=ceil(max_model_len / block_size)");
  }
}

// Group g's shared partial tails of s that must be copied before a write (bit g set), given the
// copy-on-write references this call has already moved to the queue.
uint64_t SeqTable::shared_tails_to_copy(const Seq& s, std::vector<std::pair<int32_t, int32_t>>& moved) const {
  uint64_t mask = 0;
  const size_t last = s.blocks.size() - static_cast<size_t>(num_groups_);
  for (int32_t g = 0; g < num_groups_; ++g) {
    const int32_t block = s.blocks[last + static_cast<size_t>(g)];
    int32_t refs = 0;
    allocator_->refcounts(&block, 1, &refs);
    auto q = queued_.find(block);
    int64_t holders = refs - (q == queued_.end() ? 0 : q->second);
    for (const auto& m : moved) holders -= m.first == block ? m.second : 0;
    if (holders > 1) {  // a shared block must not be written in place
      mask |= uint64_t{1} << g;
      moved.emplace_back(block, 1);
    }
  }
  return mask;
}

// Plans n more tokens for each sequence (in order, as sequential appends would) and returns the new
// blocks they need in all. Nothing changes here.
int64_t SeqTable::plan_growth(const char* fn, const std::vector<Seq*>& seqs, int64_t n) {
  plan_.clear();
  std::vector<std::pair<int32_t, int32_t>> moved;  // copy-on-write references moved to the queue so far
  int64_t total = 0;
  for (Seq* s : seqs) {
    check_width(fn, *s, s->num_tokens + n);
    const bool partial = s->num_tokens % block_size_ != 0;
    const uint64_t copy = partial && s->shared_tail ? shared_tails_to_copy(*s, moved) : 0;
    const int64_t positions = cdiv(s->num_tokens + n, block_size_) - num_positions_of(*s);
    const int64_t blocks = positions * num_groups_ + (copy == 0 ? 0 : static_cast<int64_t>(std::bitset<64>(copy).count()));
    plan_.push_back(Grow{s, positions, blocks, copy});
    total += blocks;
  }
  return total;
}

// ---- sequence operations -----------------------------------------------------------------------

int64_t SeqTable::add(int64_t id, const int32_t* tokens, int64_t n, uint64_t context) {
  if (contains(id)) throw InvalidArgument("seq_id " + id_text(id) + " already exists: free() it or use a new id");
  if (n < 1) throw InvalidArgument("prompt of seq_id " + id_text(id) + " has " + to_string(n) + " tokens; it needs at least 1");
  Seq s;
  s.id = id;
  s.num_tokens = n;
  check_width("add()", s, n);
  const int64_t total = cdiv(n, block_size_);
  s.blocks.resize(static_cast<size_t>(total * num_groups_));
  s.chains.assign(static_cast<size_t>(num_groups_ - 1), kChainRoot);
  s.context = context;
  if (tokens != nullptr) {
    s.tokens.assign(tokens, tokens + n);
    s.tokens_known = true;
  }
  int64_t hits = 0;
  if (prefix_caching_ && tokens != nullptr && n >= block_size_) {
    s.hashes.resize(static_cast<size_t>(n / block_size_));
    hash_block_tokens(tokens, n, block_size_, kRootHash, context, key_, s.hashes.data());
    const int64_t matchable = (n - 1) / block_size_;  // the last token is always recomputed (its logits)
    if (num_groups_ == 1 && !any_window_) {  // one full group: the single-table path, one allocator call
      hits = allocator_->allocate_with_prefix(total, allocator_hashes(s, 0, matchable), matchable, tokens,
                                              matchable * block_size_, context, s.blocks.data(), &s.chain);
      s.num_cached = hits;
      if (host_ != nullptr) hits = continue_on_host(s, tokens, matchable, hits);
    } else {
      hits = add_across_groups(s, tokens, n);
    }
  } else {
    allocator_->allocate(total * num_groups_, s.blocks.data());  // position-major: a position's groups together
  }
  s.num_computed = hits * block_size_;
  s.serial = next_serial_++;
  index_.emplace(id, std::move(s));
  return hits * block_size_;
}

void SeqTable::extend_tokens(Seq& s, const int32_t* token_ids, int64_t n) {
  if (token_ids == nullptr || !s.tokens_known) {  // a token without its id: nothing later is hashed
    s.tokens_known = false;  // (the known prefix stays: its hashed blocks may still be cached)
    return;
  }
  s.tokens.insert(s.tokens.end(), token_ids, token_ids + n);
  if (!prefix_caching_) return;
  const int64_t bs = block_size_;
  while (static_cast<int64_t>(s.hashes.size() + 1) * bs <= static_cast<int64_t>(s.tokens.size())) {
    const int64_t b = static_cast<int64_t>(s.hashes.size());
    const uint64_t parent = b == 0 ? kRootHash : s.hashes.back();
    uint64_t h = 0;
    hash_block_tokens(s.tokens.data() + b * bs, bs, bs, parent, s.context, key_, &h);
    s.hashes.push_back(h);
  }
}

// Gives s its planned blocks from fresh_[next, ...): copy-on-write copies first (group order), then
// the new positions, position-major.
inline void SeqTable::grow(Seq& s, const Grow& g, int64_t& next) {
  if (g.copy_tail != 0) {
    const size_t last = s.blocks.size() - static_cast<size_t>(num_groups_);
    for (int32_t grp = 0; grp < num_groups_; ++grp) {
      if (!(g.copy_tail >> grp & 1)) continue;
      // This sequence's reference on the shared tail passes to the copy queue, which also takes one
      // on the copy: until pop_copies() neither block can be handed out before the copy runs.
      int32_t& tail = s.blocks[last + static_cast<size_t>(grp)];
      const int32_t src = tail, dst = fresh_[static_cast<size_t>(next++)];
      allocator_->incref(&dst, 1);
      copies_.emplace_back(src, dst);
      ++queued_[src];
      ++queued_[dst];
      tail = dst;
    }
    ++s.version;
  }
  s.shared_tail = false;
  const int64_t take = g.positions * num_groups_;
  s.blocks.insert(s.blocks.end(), fresh_.begin() + next, fresh_.begin() + next + take);
  next += take;
}

// Slots of tokens [first, first + n) of s: group g's at slots[g * stride + t].
inline void SeqTable::write_slots(const Seq& s, int64_t first, int64_t n, int32_t* slots, int64_t stride) const {
  const int64_t bs = block_size_;
  if (num_groups_ == 1) {
    for (int64_t pos = first; pos < first + n; ++pos) {
      *slots++ = static_cast<int32_t>(s.blocks[static_cast<size_t>(pos / bs)] * bs + pos % bs);
    }
    return;
  }
  for (int32_t g = 0; g < num_groups_; ++g) {
    for (int64_t t = 0; t < n; ++t) {
      const int64_t pos = first + t;
      const int32_t block = s.blocks[static_cast<size_t>(pos / bs * num_groups_ + g)];
      slots[g * stride + t] = static_cast<int32_t>(block * bs + pos % bs);
    }
  }
}

void SeqTable::append_batch(const int64_t* ids, int64_t b, int64_t n, const int32_t* token_ids,
                            int64_t num_token_ids, int32_t* slots) {
  const char* fn = "append_batch()";
  std::vector<Seq*> seqs = lookup(fn, ids, b);
  append_to(fn, seqs, n, token_ids, num_token_ids, slots, b * n);
}

void SeqTable::append_to(const char* fn, const std::vector<Seq*>& seqs, int64_t n, const int32_t* token_ids,
                         int64_t num_token_ids, int32_t* slots, int64_t stride) {
  const int64_t b = static_cast<int64_t>(seqs.size());
  if (n < 1) throw InvalidArgument(std::string(fn) + ": n_tokens=" + to_string(n) + " must be >= 1");
  if (token_ids != nullptr && num_token_ids != b * n) {
    throw InvalidArgument(std::string(fn) + ": got " + to_string(num_token_ids) + " token ids for " + to_string(b) +
                          " sequences x " + to_string(n) + " tokens; pass one id per appended token");
  }
  for (int64_t j = 0; token_ids != nullptr && j < num_token_ids; ++j) {
    if (token_ids[j] < 0) {
      throw InvalidArgument(std::string(fn) + ": token id " + to_string(token_ids[j]) + " (position " + to_string(j) +
                            ") is negative; token ids lie in [0, 2**31)");
    }
  }
  const int64_t need = plan_growth(fn, seqs, n);
  const int64_t available = allocator_->num_free_blocks();
  if (need > available) {  // before sizing anything by `need`, which may be absurd (n = 2**40)
    throw OutOfBlocks(std::string(fn) + ": the batch needs " + to_string(need) + " new blocks but " +
                          to_string(available) + " are free; free or preempt sequences, or size the pool larger",
                      need, available);
  }
  fresh_.resize(static_cast<size_t>(need));
  allocator_->allocate(need, fresh_.data());
  // From here on nothing can fail: hand the blocks out in sequence order.
  int64_t next = 0;
  for (int64_t i = 0; i < b; ++i) {
    const Grow& g = plan_[static_cast<size_t>(i)];
    Seq& s = *g.seq;
    grow(s, g, next);
    write_slots(s, s.num_tokens, n, slots + i * n, stride);
    s.num_tokens += n;
    extend_tokens(s, token_ids == nullptr ? nullptr : token_ids + i * n, n);
  }
}

// ---- the prefix cache and the windows, as computed tokens advance ----------------------------------

const uint64_t* SeqTable::allocator_hashes(const Seq& s, int64_t first, int64_t k) {
  if (hash_mask_ == ~uint64_t{0}) return s.hashes.data() + first;
  masked_.assign(s.hashes.begin() + first, s.hashes.begin() + first + k);
  for (uint64_t& h : masked_) h &= hash_mask_;
  return masked_.data();
}

const uint64_t* SeqTable::group_hashes(const Seq& s, int32_t g, int64_t first, int64_t k) {
  if (g == 0) return allocator_hashes(s, first, k);
  masked_.resize(static_cast<size_t>(k));
  for (int64_t j = 0; j < k; ++j) masked_[j] = group_hash(s.hashes[static_cast<size_t>(first + j)], g, key_) & hash_mask_;
  return masked_.data();
}

const int32_t* SeqTable::group_ids(const Seq& s, int32_t g, int64_t first, int64_t k) {
  if (num_groups_ == 1) return s.blocks.data() + first;
  gathered_.resize(static_cast<size_t>(k));
  for (int64_t j = 0; j < k; ++j) gathered_[j] = s.blocks[static_cast<size_t>((first + j) * num_groups_ + g)];
  return gathered_.data();
}


// Blocks [first, full) of a group whose entries chain on its own blocks; the reference group also
// records the chain value after each block: the anchors of the windowed groups.
void SeqTable::cache_chained(Seq& s, int32_t g, int64_t first, int64_t full) {
  uint64_t& chain = chain_of(s, g);
  const int64_t bs = block_size_, k = full - first;
  const int32_t* ids = group_ids(s, g, first, k);
  const uint64_t* hashes = group_hashes(s, g, first, k);
  const int32_t* tokens = s.tokens.data() + first * bs;
  const uint64_t context = group_context(s.context, g, key_);
  if (g == reference_ && !anchored_.empty()) {
    s.anchors.resize(static_cast<size_t>(full), kChainBroken);
    chain = allocator_->cache_blocks_chained(ids, k, hashes, k, tokens, k * bs, context, chain, s.anchors.data() + first);
  } else {
    chain = allocator_->cache_blocks_verified(ids, k, hashes, k, tokens, k * bs, context, chain);
  }
}

// Blocks [first, full) of a windowed group, each anchored on the reference chain before it.
void SeqTable::cache_anchored(Seq& s, int32_t g, int64_t first, int64_t full) {
  const int64_t bs = block_size_, k = full - first;
  parents_.resize(static_cast<size_t>(k));
  for (int64_t j = 0; j < k; ++j) {
    const int64_t before = first + j - 1;  // the reference chain's block before this one
    parents_[j] = before < 0 ? kChainRoot
                             : before < static_cast<int64_t>(s.anchors.size()) ? s.anchors[before] : kChainBroken;
  }
  const int32_t* ids = group_ids(s, g, first, k);
  const uint64_t* hashes = group_hashes(s, g, first, k);
  allocator_->cache_blocks_anchored(ids, k, hashes, k, s.tokens.data() + first * bs, k * bs,
                                    group_context(s.context, g, key_), parents_.data(), k);
}

// Offers every group's newly computed full blocks [num_cached, full) (those whose tokens are known) to the
// prefix cache.
// A block is cached before its window releases it, so none of them is released yet: a window can
// outrun the cache only where hashing stopped for good (a token appended without its id), and the
// guards below only keep -1 from ever reaching the allocator.
void SeqTable::offer_to_cache(Seq& s, int64_t old_computed, int64_t full) {
  for (int32_t g : chained_) {  // the reference group first: it makes the anchors
    const int64_t gone = released_before(g, old_computed);
    if (gone > s.num_cached) chain_of(s, g) = kChainBroken;
    const int64_t first = std::min(std::max(s.num_cached, gone), full);
    if (first < full) cache_chained(s, g, first, full);
  }
  for (int32_t g : anchored_) {
    const int64_t first = std::min(std::max(s.num_cached, released_before(g, old_computed)), full);
    if (first < full) cache_anchored(s, g, first, full);
  }
  s.num_cached = full;
  if (host_ != nullptr) offload_to_host(s, full);
}

// Windowed groups give back the blocks that left their window as num_computed advanced from
// old_computed (newest position first, groups in order within a position: free() then queues the oldest
// first, so it is evicted first, as vLLM does). The entries lie a window behind the tail, in memory
// not touched for a while: they are prefetched here and read by take_released().
void SeqTable::release_window(Seq& s, int64_t old_computed) {
  bool moved = false;  // most steps move no window across a block boundary
  for (int32_t g : windowed_) moved = moved || released_before(g, old_computed) != released_before(g, s.num_computed);
  if (moved) release_moved(s, old_computed);
}

void SeqTable::release_moved(Seq& s, int64_t old_computed) {
  int64_t from[kMaxGroups], to[kMaxGroups];
  int64_t lo = std::numeric_limits<int64_t>::max(), hi = 0;
  for (int32_t g = 0; g < num_groups_; ++g) {
    from[g] = released_before(g, old_computed);
    to[g] = released_before(g, s.num_computed);  // (0 for a full group)
    if (to[g] <= from[g]) continue;
    lo = std::min(lo, from[g]);
    hi = std::max(hi, to[g]);
  }
  for (int64_t j = hi - 1; j >= lo; --j) {
    for (int32_t g = 0; g < num_groups_; ++g) {
      if (j < from[g] || j >= to[g]) continue;
      int32_t* block = &s.blocks[static_cast<size_t>(j * num_groups_ + g)];
      prefetch_for_write(block);
      leaving_.push_back(block);
    }
  }
}

// The blocks release_window() marked, into released_ in that order; the lists keep -1 there.
void SeqTable::take_released() {
  released_.clear();
  for (int32_t* block : leaving_) {
    if (*block != kReleased) released_.push_back(*block);
    *block = kReleased;
  }
  leaving_.clear();
}

void SeqTable::mark_computed(const int64_t* ids, int64_t k, const int64_t* lens) {
  const char* fn = "mark_computed()";
  std::vector<Seq*> seqs = lookup(fn, ids, k);
  for (int64_t i = 0; lens != nullptr && i < k; ++i) {  // validate everything before changing anything
    const Seq& s = *seqs[static_cast<size_t>(i)];
    if (lens[i] < s.num_computed || lens[i] > s.num_tokens) {
      throw InvalidArgument(std::string(fn) + ": seq_id " + id_text(s.id) + " to " + to_string(lens[i]) +
                            " must lie in [" + to_string(s.num_computed) + ", " + to_string(s.num_tokens) +
                            "] (computed so far, tokens in the sequence)");
    }
  }
  leaving_.clear();  // (never left over, unless a call threw half way: then its pointers may dangle)
  for (int64_t i = 0; i < k; ++i) {
    Seq& s = *seqs[static_cast<size_t>(i)];
    const int64_t old = s.num_computed;
    s.num_computed = lens == nullptr ? s.num_tokens : lens[i];
    const int64_t full = std::min<int64_t>(s.num_computed / block_size_, static_cast<int64_t>(s.hashes.size()));
    if (prefix_caching_ && full > s.num_cached) offer_to_cache(s, old, full);  // first: a released block stays cached
    if (any_window_) release_window(s, old);
  }
  if (leaving_.empty()) return;
  take_released();  // (no list grows in between: the marked entries stay where they are)
  allocator_->free(released_.data(), static_cast<int64_t>(released_.size()));
}

// The blocks s holds (released positions skipped), position-major; sets *count.
const int32_t* SeqTable::held_blocks(const Seq& s, int64_t* count) {
  if (!any_window_) {
    *count = static_cast<int64_t>(s.blocks.size());
    return s.blocks.data();
  }
  gathered_.clear();
  for (int32_t b : s.blocks) {
    if (b != kReleased) gathered_.push_back(b);
  }
  *count = static_cast<int64_t>(gathered_.size());
  return gathered_.data();
}

void SeqTable::fork(int64_t parent, int64_t child) {
  Seq& p = seq(parent);
  if (contains(child)) throw InvalidArgument("fork target seq_id " + id_text(child) + " already exists: pick a new id");
  if (p.num_computed != p.num_tokens) {
    throw InvalidArgument("fork(" + id_text(parent) + ", " + id_text(child) + "): parent has " +
                          to_string(p.num_tokens - p.num_computed) + " tokens not yet computed; run the forward "
                          "and mark_computed() first so no shared block is written twice");
  }
  int64_t count = 0;
  const int32_t* held = held_blocks(p, &count);
  allocator_->incref(held, count);
  Seq twin = p;
  twin.id = child;
  twin.serial = next_serial_++;
  twin.version = 0;
  twin.mark = 0;
  p.shared_tail = twin.shared_tail = p.num_tokens % block_size_ != 0;
  index_.emplace(child, std::move(twin));
}

void SeqTable::free_seq(int64_t id) {
  Seq& s = seq(id);
  int64_t count = 0;
  const int32_t* held = held_blocks(s, &count);
  allocator_->free(held, count);  // position by position: the prefix stays cached longest
  index_.erase(id);
}

void SeqTable::group_blocks(int64_t id, int32_t group, int32_t* out) const {
  const Seq& s = seq(id);
  if (group < 0 || group >= num_groups_) {
    throw InvalidArgument("blocks(): group=" + to_string(group) + " must lie in [0, " + to_string(num_groups_) +
                          ") (one per KV-cache group)");
  }
  const int64_t positions = num_positions_of(s);
  for (int64_t j = 0; j < positions; ++j) out[j] = s.blocks[static_cast<size_t>(j * num_groups_ + group)];
}

void SeqTable::pop_copies(int64_t* src, int64_t* dst) {
  std::vector<int32_t> refs;
  refs.reserve(2 * copies_.size());
  for (size_t i = 0; i < copies_.size(); ++i) {
    src[i] = copies_[i].first;
    dst[i] = copies_[i].second;
    refs.push_back(copies_[i].first);
    refs.push_back(copies_[i].second);
  }
  copies_.clear();
  queued_.clear();
  allocator_->free(refs.data(), static_cast<int64_t>(refs.size()));  // drop the queue's references
}

}  // namespace kvpool
