#include "seq_table.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <string>

#include "block_hash.h"
#include "errors.h"

namespace kvpool {
namespace {

using std::to_string;

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr int32_t kTablePad = 0;  // block_table entries past a sequence's blocks
constexpr int32_t kSlotPad = -1;  // slot_mapping entries of padding tokens

std::string id_text(int64_t id) { return to_string(id); }

}  // namespace

SeqTable::SeqTable(BlockAllocator* allocator, int32_t max_seqs, int32_t max_blocks_per_seq, bool prefix_caching,
                   uint64_t hash_mask)
    : allocator_(allocator),
      block_size_(allocator->block_size()),
      max_seqs_(max_seqs),
      max_blocks_(max_blocks_per_seq),
      prefix_caching_(prefix_caching && allocator->prefix_caching()),
      key_(allocator->hash_key()),
      hash_mask_(hash_mask) {
  if (max_seqs < 1) throw InvalidArgument("SeqTable: max_seqs=" + to_string(max_seqs) + " must be >= 1");
  if (max_blocks_per_seq < 1) {
    throw InvalidArgument("SeqTable: max_blocks_per_seq=" + to_string(max_blocks_per_seq) + " must be >= 1");
  }
  step_table_.assign(static_cast<size_t>(max_seqs) * static_cast<size_t>(max_blocks_per_seq), kTablePad);
  step_io_.assign(3 * static_cast<size_t>(max_seqs) + 1, 0);
  row_owner_.assign(max_seqs, 0);
  row_version_.assign(max_seqs, 0);
  row_len_.assign(max_seqs, 0);
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
  // A width of the whole pool or more is no limit: more blocks than that is the allocator's
  // OutOfBlocks, as without a width.
  const int64_t blocks = cdiv(tokens, block_size_);
  if (blocks > max_blocks_ && max_blocks_ < allocator_->num_blocks()) {
    throw InvalidArgument(std::string(fn) + ": seq_id " + id_text(s.id) + " would hold " + to_string(tokens) +
                          " tokens = " + to_string(cdiv(tokens, block_size_)) + " blocks, more than "
                          "max_blocks_per_seq=" + to_string(max_blocks_) + "; build BlockTables with "
                          "max_blocks_per_seq=ceil(max_model_len / block_size)");
  }
}

// Plans n more tokens for each sequence (in order, as sequential appends would) and returns the new
// blocks they need in all. Nothing changes here.
int64_t SeqTable::plan_growth(const char* fn, const std::vector<Seq*>& seqs, int64_t n) {
  plan_.clear();
  std::vector<std::pair<int32_t, int32_t>> moved;  // copy-on-write references moved to the queue so far
  int64_t total = 0;
  for (Seq* s : seqs) {
    check_width(fn, *s, s->num_tokens + n);
    const int64_t offset = s->num_tokens % block_size_;
    bool copy_tail = false;
    if (offset != 0 && s->shared_tail) {
      const int32_t last = s->blocks.back();
      int32_t refs = 0;
      allocator_->refcounts(&last, 1, &refs);
      auto q = queued_.find(last);
      int64_t holders = refs - (q == queued_.end() ? 0 : q->second);
      for (const auto& m : moved) holders -= m.first == last ? m.second : 0;
      copy_tail = holders > 1;  // a shared block must not be written in place
      if (copy_tail) moved.emplace_back(last, 1);
    }
    const int64_t grow = cdiv(s->num_tokens + n, block_size_) - static_cast<int64_t>(s->blocks.size());
    plan_.push_back(Grow{s, grow + (copy_tail ? 1 : 0), copy_tail});
    total += grow + (copy_tail ? 1 : 0);
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
  s.blocks.resize(static_cast<size_t>(total));
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
    hits = allocator_->allocate_with_prefix(total, allocator_hashes(s, 0, matchable), matchable, tokens,
                                            matchable * block_size_, context, s.blocks.data(), &s.chain);
  } else {
    allocator_->allocate(total, s.blocks.data());
  }
  s.num_computed = hits * block_size_;
  s.num_cached = hits;
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

void SeqTable::append_batch(const int64_t* ids, int64_t b, int64_t n, const int32_t* token_ids,
                            int64_t num_token_ids, int32_t* slots) {
  const char* fn = "append_batch()";
  std::vector<Seq*> seqs = lookup(fn, ids, b);
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
  const int64_t bs = block_size_;
  for (int64_t i = 0; i < b; ++i) {
    const Grow& g = plan_[static_cast<size_t>(i)];
    Seq& s = *g.seq;
    int64_t take = g.new_blocks;
    if (g.copy_tail) {
      // This sequence's reference on the shared tail passes to the copy queue, which also takes one
      // on the copy: until pop_copies() neither block can be handed out before the copy runs.
      const int32_t src = s.blocks.back(), dst = fresh_[static_cast<size_t>(next++)];
      allocator_->incref(&dst, 1);
      copies_.emplace_back(src, dst);
      ++queued_[src];
      ++queued_[dst];
      s.blocks.back() = dst;
      ++s.version;
      --take;
    }
    s.shared_tail = false;
    s.blocks.insert(s.blocks.end(), fresh_.begin() + next, fresh_.begin() + next + take);
    next += take;
    const int64_t old = s.num_tokens;
    for (int64_t t = 0; t < n; ++t) {
      const int64_t pos = old + t;
      slots[i * n + t] = static_cast<int32_t>(s.blocks[static_cast<size_t>(pos / bs)] * bs + pos % bs);
    }
    s.num_tokens = old + n;
    extend_tokens(s, token_ids == nullptr ? nullptr : token_ids + i * n, n);
  }
}

const uint64_t* SeqTable::allocator_hashes(const Seq& s, int64_t first, int64_t k) {
  if (hash_mask_ == ~uint64_t{0}) return s.hashes.data() + first;
  masked_.assign(s.hashes.begin() + first, s.hashes.begin() + first + k);
  for (uint64_t& h : masked_) h &= hash_mask_;
  return masked_.data();
}

void SeqTable::offer_to_cache(Seq& s) {
  const int64_t full = std::min<int64_t>(s.num_computed / block_size_, static_cast<int64_t>(s.hashes.size()));
  if (!prefix_caching_ || full <= s.num_cached) return;
  const int64_t first = s.num_cached, k = full - first;
  s.chain = allocator_->cache_blocks_verified(s.blocks.data() + first, k, allocator_hashes(s, first, k), k,
                                              s.tokens.data() + first * block_size_, k * block_size_, s.context,
                                              s.chain);
  s.num_cached = full;
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
  for (int64_t i = 0; i < k; ++i) {
    Seq& s = *seqs[static_cast<size_t>(i)];
    s.num_computed = lens == nullptr ? s.num_tokens : lens[i];
    offer_to_cache(s);
  }
}

void SeqTable::fork(int64_t parent, int64_t child) {
  Seq& p = seq(parent);
  if (contains(child)) throw InvalidArgument("fork target seq_id " + id_text(child) + " already exists: pick a new id");
  if (p.num_computed != p.num_tokens) {
    throw InvalidArgument("fork(" + id_text(parent) + ", " + id_text(child) + "): parent has " +
                          to_string(p.num_tokens - p.num_computed) + " tokens not yet computed; run the forward "
                          "and mark_computed() first so no shared block is written twice");
  }
  allocator_->incref(p.blocks.data(), static_cast<int64_t>(p.blocks.size()));
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
  allocator_->free(s.blocks.data(), static_cast<int64_t>(s.blocks.size()));
  index_.erase(id);
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

// ---- a mixed batch (prefill, chunked prefill and decode) ------------------------------------------

BatchShape SeqTable::plan_batch(const int64_t* ids, int64_t b, const int64_t* new_tokens, int64_t pad_slots_to,
                                bool decode) {
  const char* fn = decode ? "decode_batch()" : "batch()";
  if (b < 1 || b > max_seqs_) {
    throw InvalidArgument(std::string(fn) + ": batch of " + to_string(b) + " sequences; need 1..max_seqs=" +
                          to_string(max_seqs_) + " (raise max_seqs when building BlockTables)");
  }
  std::vector<Seq*> seqs = lookup(fn, ids, b);
  BatchShape shape;
  shape.rows = b;
  for (int64_t i = 0; i < b; ++i) {
    const Seq& s = *seqs[static_cast<size_t>(i)];
    const int64_t uncomputed = s.num_tokens - s.num_computed;
    if (decode && uncomputed != 1) {
      throw InvalidArgument(std::string(fn) + ": seq_id " + id_text(s.id) + " has " + to_string(uncomputed) +
                            " uncomputed tokens, not 1; append() one token per step and mark_computed() after "
                            "each forward, or use batch()");
    }
    const int64_t fresh = new_tokens == nullptr ? uncomputed : new_tokens[i];
    if (fresh < 0 || fresh > uncomputed) {
      throw InvalidArgument(std::string(fn) + ": num_new_tokens[" + to_string(i) + "]=" + to_string(fresh) +
                            " must lie in 0.." + to_string(uncomputed) + " (the uncomputed tokens of seq_id " +
                            id_text(s.id) + ")");
    }
    const int64_t len = s.num_computed + fresh;
    if (len < 1) throw InvalidArgument(std::string(fn) + ": sequence " + id_text(s.id) + " would attend to 0 tokens");
    const int64_t nblk = cdiv(len, block_size_);
    shape.max_blocks = std::max(shape.max_blocks, nblk);
    shape.nnz += nblk;
    shape.new_tokens += fresh;
  }
  shape.padded = pad_slots_to < 0 ? shape.new_tokens : pad_slots_to;
  if (shape.padded < shape.new_tokens) {
    throw InvalidArgument(std::string(fn) + ": pad_slots_to=" + to_string(pad_slots_to) + " is below the " +
                          to_string(shape.new_tokens) + " new tokens of this batch");
  }
  const int64_t sizes[7] = {b * shape.max_blocks, b, b + 1, shape.nnz, b, b + 1, shape.padded};
  for (int k = 0; k < 7; ++k) shape.offset[k + 1] = shape.offset[k] + sizes[k];
  return shape;
}

void SeqTable::fill_batch(const int64_t* ids, const int64_t* new_tokens, const BatchShape& shape, int32_t* out) const {
  const int64_t b = shape.rows, w = shape.max_blocks, bs = block_size_;
  int32_t *table = out + shape.offset[0], *lens = out + shape.offset[1], *indptr = out + shape.offset[2],
          *indices = out + shape.offset[3], *last = out + shape.offset[4], *qsl = out + shape.offset[5],
          *slots = out + shape.offset[6];
  std::fill(table, table + b * w, kTablePad);
  indptr[0] = 0;
  qsl[0] = 0;
  int64_t t = 0;
  for (int64_t i = 0; i < b; ++i) {
    const Seq& s = seq(ids[i]);
    const int64_t fresh = new_tokens == nullptr ? s.num_tokens - s.num_computed : new_tokens[i];
    const int64_t len = s.num_computed + fresh, nblk = cdiv(len, bs);
    std::copy(s.blocks.begin(), s.blocks.begin() + nblk, table + i * w);
    std::copy(s.blocks.begin(), s.blocks.begin() + nblk, indices + indptr[i]);
    indptr[i + 1] = static_cast<int32_t>(indptr[i] + nblk);
    lens[i] = static_cast<int32_t>(len);
    last[i] = static_cast<int32_t>(len - bs * (nblk - 1));
    for (int64_t pos = s.num_computed; pos < len; ++pos) {
      slots[t++] = static_cast<int32_t>(s.blocks[static_cast<size_t>(pos / bs)] * bs + pos % bs);
    }
    qsl[i + 1] = static_cast<int32_t>(t);
  }
  std::fill(slots + t, slots + shape.padded, kSlotPad);
}

// ---- the decode step at fixed addresses ------------------------------------------------------------

void SeqTable::write_step_row(int64_t row, const Seq* s) {
  int32_t* entries = step_table_.data() + row * max_blocks_;
  const int32_t base = static_cast<int32_t>(row * max_blocks_);
  const int32_t n = s == nullptr ? 0 : static_cast<int32_t>(s->blocks.size());
  int32_t from = 0;  // entries [from, n) are rewritten
  if (s != nullptr && row_owner_[row] == s->serial && row_version_[row] == s->version) {
    from = std::min(row_len_[row], n);  // the same sequence as last step: only its new blocks
  }
  for (int32_t j = from; j < n; ++j) {
    if (entries[j] != s->blocks[j]) {
      entries[j] = s->blocks[j];
      delta_index_.push_back(base + j);
      delta_value_.push_back(entries[j]);
    }
  }
  for (int32_t j = n; j < row_len_[row]; ++j) {  // what the previous owner left behind
    if (entries[j] != kTablePad) {
      entries[j] = kTablePad;
      delta_index_.push_back(base + j);
      delta_value_.push_back(kTablePad);
    }
  }
  row_len_[row] = n;
  row_owner_[row] = s == nullptr ? 0 : s->serial;
  row_version_[row] = s == nullptr ? 0 : s->version;
}

int64_t SeqTable::decode_step(const int64_t* ids, int64_t b, const int32_t* token_ids, int64_t num_token_ids,
                              int64_t pad_to) {
  const char* fn = "decode_step()";
  if (b < 1 || b > max_seqs_) {
    throw InvalidArgument(std::string(fn) + ": batch of " + to_string(b) + " sequences; need 1..max_seqs=" +
                          to_string(max_seqs_) + " (raise max_seqs when building BlockTables)");
  }
  for (const Seq* s : lookup(fn, ids, b)) {
    if (s->num_computed != s->num_tokens) {
      throw InvalidArgument(std::string(fn) + ": seq_id " + id_text(s->id) + " has " +
                            to_string(s->num_tokens - s->num_computed) + " uncomputed tokens; mark_computed() "
                            "the previous step (or use append() and batch())");
    }
  }
  const int64_t rows = pad_to < 0 ? b : pad_to;
  if (rows < b || rows > max_seqs_) {
    throw InvalidArgument(std::string(fn) + ": pad_batch_to=" + to_string(pad_to) + " must lie in [" +
                          to_string(b) + ", max_seqs=" + to_string(max_seqs_) + "]");
  }
  int32_t* lens = step_io_.data();
  int32_t* slots = lens + rows;
  int32_t* qsl = lens + 2 * rows;
  // validates the rest; nothing has changed if it throws
  append_batch(ids, b, 1, token_ids, num_token_ids, slots);
  delta_index_.clear();
  delta_value_.clear();
  step_seqs_.clear();
  qsl[0] = 0;
  int64_t longest = 0;
  for (int64_t i = 0; i < rows; ++i) {
    const Seq* s = i < b ? plan_[static_cast<size_t>(i)].seq : nullptr;
    write_step_row(i, s);
    lens[i] = s == nullptr ? 0 : static_cast<int32_t>(s->num_tokens);
    if (s == nullptr) slots[i] = kSlotPad;
    qsl[i + 1] = static_cast<int32_t>(std::min(i + 1, b));
    if (s != nullptr) step_seqs_.emplace_back(s->id, s->serial);  // serial: kept for debugging
    longest = std::max<int64_t>(longest, lens[i]);
  }
  return longest;
}

void SeqTable::mark_step_computed() {
  std::vector<int64_t> ids, lens;
  for (size_t i = 0; i < step_seqs_.size(); ++i) {
    ids.push_back(step_seqs_[i].first);
    lens.push_back(step_io_[i]);  // seq_lens sit first in step_io
  }
  mark_computed(ids.data(), static_cast<int64_t>(ids.size()), lens.data());
}

}  // namespace kvpool
