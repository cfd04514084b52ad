// SeqTable's batch tensors: a mixed batch built on demand (plan_batch / fill_batch) and the decode step
// in buffers allocated once (decode_step), every KV-cache group in one pass (seq_table.h).
#include <algorithm>
#include <string>

#include "errors.h"
#include "seq_table.h"
#include "seq_table_internal.h"

namespace kvpool {

using std::to_string;
using namespace seq_table_detail;

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
    if (s.reload_batch != 0 && !host_->reloads_launched(s.reload_batch)) {
      throw InvalidArgument(std::string(fn) + ": seq_id " + id_text(s.id) + " has blocks being reloaded from the "
                            "host tier and not yet enqueued; run tier.run(tables.pop_transfers()) before the batch "
                            "reads them");
    }
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
  // table [G, b, w] | lens [b] | indptr [G, b + 1] | indices [G, nnz] | last [G, b] | qsl [b + 1] | slots [G, padded]
  const int64_t g = num_groups_;
  const int64_t sizes[7] = {g * b * shape.max_blocks, b, g * (b + 1), g * shape.nnz, g * b, b + 1, g * shape.padded};
  for (int k = 0; k < 7; ++k) shape.offset[k + 1] = shape.offset[k] + sizes[k];
  return shape;
}

void SeqTable::fill_batch(const int64_t* ids, const int64_t* new_tokens, const BatchShape& shape, int32_t* out) const {
  const int64_t b = shape.rows, w = shape.max_blocks, bs = block_size_, G = num_groups_;
  int32_t *table = out + shape.offset[0], *lens = out + shape.offset[1], *indptr = out + shape.offset[2],
          *indices = out + shape.offset[3], *last = out + shape.offset[4], *qsl = out + shape.offset[5],
          *slots = out + shape.offset[6];
  std::fill(table, table + G * b * w, kTablePad);
  for (int64_t g = 0; g < G; ++g) indptr[g * (b + 1)] = 0;
  qsl[0] = 0;
  int64_t t = 0;
  for (int64_t i = 0; i < b; ++i) {
    const Seq& s = seq(ids[i]);
    const int64_t fresh = new_tokens == nullptr ? s.num_tokens - s.num_computed : new_tokens[i];
    const int64_t len = s.num_computed + fresh, nblk = cdiv(len, bs);
    lens[i] = static_cast<int32_t>(len);
    for (int64_t g = 0; g < G; ++g) {
      int32_t* row = table + (g * b + i) * w;
      int32_t* ptr = indptr + g * (b + 1);
      int32_t* csr = indices + g * shape.nnz + ptr[i];
      for (int64_t j = 0; j < nblk; ++j) {  // a released block is padding (0) to the kernels
        const int32_t block = s.blocks[static_cast<size_t>(j * G + g)];
        row[j] = csr[j] = block == kReleased ? kTablePad : block;
      }
      ptr[i + 1] = static_cast<int32_t>(ptr[i] + nblk);
      last[g * b + i] = static_cast<int32_t>(len - bs * (nblk - 1));
      for (int64_t pos = s.num_computed, k = t; pos < len; ++pos, ++k) {  // new tokens are never released
        slots[g * shape.padded + k] = static_cast<int32_t>(s.blocks[static_cast<size_t>(pos / bs * G + g)] * bs + pos % bs);
      }
    }
    t += fresh;
    qsl[i + 1] = static_cast<int32_t>(t);
  }
  for (int64_t g = 0; g < G; ++g) std::fill(slots + g * shape.padded + t, slots + (g + 1) * shape.padded, kSlotPad);
}

// ---- the decode step at fixed addresses ------------------------------------------------------------

// Sets entry j of a table row (at flat index base) to block, recording a delta when it changes.
inline void SeqTable::set_entry(int32_t* entries, int64_t base, int32_t j, int32_t block) {
  if (entries[j] != block) {
    entries[j] = block;
    delta_index_.push_back(static_cast<int32_t>(base + j));
    delta_value_.push_back(block);
  }
}

// Row `row` of every group's table now holds s (nullptr: a padding row); changed entries become deltas.
void SeqTable::write_step_row(int64_t row, const Seq* s) {
  const int32_t n = s == nullptr ? 0 : static_cast<int32_t>(num_positions_of(*s));
  // The same sequence as last step: only its new blocks, and those a window released since.
  const bool same = s != nullptr && row_owner_[row] == s->serial && row_version_[row] == s->version;
  const int32_t from = same ? std::min(row_len_[row], n) : 0;
  if (num_groups_ == 1 && !any_window_) {  // one full group: the single-table path, no stride, no window
    const int64_t base = row * max_blocks_;
    int32_t* entries = step_table_.data() + base;
    for (int32_t j = from; j < n; ++j) set_entry(entries, base, j, s->blocks[j]);
    for (int32_t j = n; j < row_len_[row]; ++j) set_entry(entries, base, j, kTablePad);  // the previous owner's
  } else {
    write_step_groups(row, s, n, same, from);
  }
  row_len_[row] = n;
  row_owner_[row] = s == nullptr ? 0 : s->serial;
  row_version_[row] = s == nullptr ? 0 : s->version;
}

void SeqTable::write_step_groups(int64_t row, const Seq* s, int32_t n, bool same, int32_t from) {
  for (int32_t g = 0; g < num_groups_; ++g) {
    const int64_t base = (int64_t{g} * max_seqs_ + row) * max_blocks_;
    int32_t* entries = step_table_.data() + base;
    int32_t& zeroed = row_released_[static_cast<size_t>(g) * max_seqs_ + row];
    const int32_t released = s == nullptr ? 0 : static_cast<int32_t>(released_before(g, s->num_computed));
    if (!same) {
      for (int32_t j = 0; j < released; ++j) set_entry(entries, base, j, kTablePad);
    } else {
      // Entries the window released since the last step held this sequence's blocks: zero them without
      // reading them first (they lie a window behind, in cold memory; a block 0 gives a redundant delta).
      for (int32_t j = zeroed; j < released; ++j) {
        entries[j] = kTablePad;
        delta_index_.push_back(static_cast<int32_t>(base + j));
        delta_value_.push_back(kTablePad);
      }
    }
    for (int32_t j = std::max(from, released); j < n; ++j) {
      set_entry(entries, base, j, s->blocks[static_cast<size_t>(j) * num_groups_ + g]);
    }
    for (int32_t j = n; j < row_len_[row]; ++j) set_entry(entries, base, j, kTablePad);  // the previous owner's
    zeroed = released;
  }
}

int64_t SeqTable::decode_step(const int64_t* ids, int64_t b, const int32_t* token_ids, int64_t num_token_ids,
                              int64_t pad_to) {
  const char* fn = "decode_step()";
  if (b < 1 || b > max_seqs_) {
    throw InvalidArgument(std::string(fn) + ": batch of " + to_string(b) + " sequences; need 1..max_seqs=" +
                          to_string(max_seqs_) + " (raise max_seqs when building BlockTables)");
  }
  std::vector<Seq*> seqs = lookup(fn, ids, b);
  for (const Seq* s : seqs) {
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
  int32_t* slots = lens + rows;                  // [G][rows]
  int32_t* qsl = lens + (num_groups_ + 1) * rows;
  // validates the rest; nothing has changed if it throws
  append_to(fn, seqs, 1, token_ids, num_token_ids, slots, rows);
  delta_index_.clear();
  delta_value_.clear();
  step_seqs_.clear();
  qsl[0] = 0;
  int64_t longest = 0;
  for (int64_t i = 0; i < rows; ++i) {
    const Seq* s = i < b ? plan_[static_cast<size_t>(i)].seq : nullptr;
    write_step_row(i, s);
    lens[i] = s == nullptr ? 0 : static_cast<int32_t>(s->num_tokens);
    for (int32_t g = 0; s == nullptr && g < num_groups_; ++g) slots[g * rows + i] = kSlotPad;
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
