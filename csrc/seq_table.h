// SeqTable: the per-sequence KV bookkeeping of a serving loop, batched, in C++.
//
// For every live sequence (an int64 id the server chooses) it keeps the ids of the blocks holding its
// tokens, its token and computed counts, its known token ids and the chained hash of every full block
// whose tokens are all known (prompt and decoded), so decoded blocks join the prefix cache too. Each
// operation takes a whole batch in one call and is all or nothing: it validates every sequence and
// counts every block it needs before it changes anything, then takes all new blocks from the
// allocator in ONE allocate() call (OutOfBlocks leaves every sequence and the allocator unchanged).
//
// decode_step() appends one token to each listed sequence and fills the step's tensors in buffers
// allocated once (a [max_seqs, max_blocks_per_seq] block table, seq_lens, slot_mapping,
// query_start_loc), so a server captures its decode step once in a CUDA graph and replays it. The
// table is persistent: a row keeps its sequence between steps and a step writes only the block ids
// that changed; they are listed as (flat index, block id) deltas so a device copy of the table needs
// only those (plus seq_lens, slots and query_start_loc: ~12 bytes per sequence per step).
//
// Not thread-safe: one SeqTable belongs to one scheduler thread (the allocator it draws from is).
// The pure-Python twin is src/kvpool/_reference_tables.py; tests compare the two after every step.
#pragma once

#include <cstdint>
#include <unordered_map>
#include <utility>
#include <vector>

#include "block_allocator.h"

namespace kvpool {

// What one batch (BlockTables.batch) needs, computed by plan_batch() before anything is written.
struct BatchShape {
  int64_t rows = 0;        // sequences
  int64_t max_blocks = 0;  // width of the padded table
  int64_t nnz = 0;         // blocks of all rows (CSR)
  int64_t new_tokens = 0;  // new tokens (slot_mapping entries before padding)
  int64_t padded = 0;      // slot_mapping entries after padding
  // offsets of table | lens | indptr | indices | last | qsl | slots in one int32 buffer, and its size
  int64_t offset[8] = {0, 0, 0, 0, 0, 0, 0, 0};
};

class SeqTable {
 public:
  // The decode-step buffers hold max_seqs rows of max_blocks_per_seq blocks. hash_mask keeps only
  // some bits of every block hash handed to the allocator (tests weaken hashes to force collisions;
  // servers keep all 64).
  SeqTable(BlockAllocator* allocator, int32_t max_seqs, int32_t max_blocks_per_seq, bool prefix_caching,
           uint64_t hash_mask = ~uint64_t{0});

  // ---- sequences -----------------------------------------------------------------------------
  // A new sequence of n tokens (their ids when tokens != nullptr, else only the count). With prefix
  // caching and token ids, its leading full blocks before the last token come verified from the
  // cache. Returns the prompt tokens found there (a multiple of block_size).
  int64_t add(int64_t id, const int32_t* tokens, int64_t n, uint64_t context);
  // Appends n tokens to each of ids[0, b) in order (token_ids: num_token_ids == b * n of them, or
  // nullptr); slots[b * n] out.
  void append_batch(const int64_t* ids, int64_t b, int64_t n, const int32_t* token_ids, int64_t num_token_ids,
                    int32_t* slots);
  // Leading tokens now computed (lens == nullptr: all); offers newly computed full blocks to the cache.
  void mark_computed(const int64_t* ids, int64_t k, const int64_t* lens);
  // child shares every block of parent (all computed); a shared partial tail is copied on first write.
  void fork(int64_t parent, int64_t child);
  void free_seq(int64_t id);

  bool contains(int64_t id) const { return index_.count(id) != 0; }
  int64_t size() const { return static_cast<int64_t>(index_.size()); }
  int64_t num_tokens(int64_t id) const { return seq(id).num_tokens; }
  int64_t num_computed(int64_t id) const { return seq(id).num_computed; }
  const std::vector<int32_t>& blocks(int64_t id) const { return seq(id).blocks; }
  int32_t block_size() const { return block_size_; }
  int32_t max_seqs() const { return max_seqs_; }
  int32_t max_blocks_per_seq() const { return max_blocks_; }

  // ---- copy-on-write queue -------------------------------------------------------------------
  const std::vector<std::pair<int32_t, int32_t>>& pending_copies() const { return copies_; }
  // Empties the queue into src/dst (capacity pending_copies().size()) and drops its references.
  void pop_copies(int64_t* src, int64_t* dst);

  // ---- batches -------------------------------------------------------------------------------
  // Validates a mixed batch (new[i] new tokens per sequence, all uncomputed ones when new == nullptr;
  // decode: exactly one each) and returns its shape; fill_batch() then writes it to out[shape.offset[7]].
  BatchShape plan_batch(const int64_t* ids, int64_t b, const int64_t* new_tokens, int64_t pad_slots_to,
                        bool decode);
  void fill_batch(const int64_t* ids, const int64_t* new_tokens, const BatchShape& shape, int32_t* out) const;

  // append_batch(ids, b, 1, token_ids) + the decode batch in the persistent buffers, rows = pad_to
  // (>= b): padding rows have seq_len 0, slot -1, an all-zero table row. step_io() then holds
  // seq_lens [rows] | slot_mapping [rows] | query_start_loc [rows + 1], packed: for a given rows the
  // three always sit at the same addresses, and one copy of 3 * rows + 1 ints sends them.
  // Returns the longest sequence of the step.
  int64_t decode_step(const int64_t* ids, int64_t b, const int32_t* token_ids, int64_t num_token_ids,
                      int64_t pad_to);
  // mark_computed() of the last decode_step's sequences (those still alive), to their step lengths.
  void mark_step_computed();
  const int32_t* step_table() const { return step_table_.data(); }  // [max_seqs, max_blocks_per_seq]
  const int32_t* step_io() const { return step_io_.data(); }        // [3 * max_seqs + 1]
  int64_t step_io_size() const { return static_cast<int64_t>(step_io_.size()); }
  // The table entries the last decode_step changed: flat indices into step_table() and their values.
  const std::vector<int32_t>& step_delta_index() const { return delta_index_; }
  const std::vector<int32_t>& step_delta_value() const { return delta_value_; }

 private:
  struct Seq {
    int64_t id = 0;
    uint64_t serial = 0;             // unique per add/fork: a batch row knows whose blocks it holds
    uint64_t version = 0;            // bumped when a block id is replaced (copy-on-write)
    int64_t num_tokens = 0;
    int64_t num_computed = 0;
    int64_t num_cached = 0;          // leading full blocks offered to the prefix cache
    uint64_t chain = kChainRoot;     // verified-cache chain value after those blocks
    uint64_t context = 0;            // keyed digest of the sequence's salt
    bool shared_tail = false;        // the partial last block may be shared (after fork)
    bool tokens_known = false;       // tokens holds every token of the sequence
    std::vector<int32_t> blocks;
    std::vector<int32_t> tokens;
    std::vector<uint64_t> hashes;    // one per full block whose tokens are known
    uint32_t mark = 0;               // per-call scratch: listed twice in one batch?
  };
  struct Grow {                      // one sequence's share of an append, planned before any change
    Seq* seq;
    int64_t new_blocks;              // blocks to take from the allocator (copy-on-write one included)
    bool copy_tail;
  };

  Seq& seq(int64_t id);
  const Seq& seq(int64_t id) const;
  std::vector<Seq*> lookup(const char* fn, const int64_t* ids, int64_t b);
  int64_t plan_growth(const char* fn, const std::vector<Seq*>& seqs, int64_t n);
  void check_width(const char* fn, const Seq& s, int64_t tokens) const;
  void extend_tokens(Seq& s, const int32_t* token_ids, int64_t n);
  void offer_to_cache(Seq& s);
  const uint64_t* allocator_hashes(const Seq& s, int64_t first, int64_t k);
  void write_step_row(int64_t row, const Seq* s);

  BlockAllocator* allocator_;
  int32_t block_size_;
  int32_t max_seqs_;
  int32_t max_blocks_;
  bool prefix_caching_;
  HashKey key_;
  uint64_t hash_mask_;
  std::vector<uint64_t> masked_;     // scratch: hashes under hash_mask_
  uint64_t next_serial_ = 1;
  uint32_t epoch_ = 0;
  std::unordered_map<int64_t, Seq> index_;
  std::vector<Grow> plan_;
  std::vector<int32_t> fresh_;
  std::vector<std::pair<int32_t, int32_t>> copies_;
  std::unordered_map<int32_t, int32_t> queued_;  // block -> references the copy queue holds

  // decode-step buffers, allocated once: their addresses never change
  std::vector<int32_t> step_table_;
  std::vector<int32_t> step_io_;
  std::vector<uint64_t> row_owner_;  // serial of the sequence a row holds (0: none)
  std::vector<uint64_t> row_version_;
  std::vector<int32_t> row_len_;     // leading entries of a row that may be non-zero
  std::vector<int32_t> delta_index_;
  std::vector<int32_t> delta_value_;
  std::vector<std::pair<int64_t, uint64_t>> step_seqs_;  // (id, serial) of the last decode_step's sequences
};

}  // namespace kvpool
