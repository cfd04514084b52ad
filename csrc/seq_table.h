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
// KV-cache groups (a hybrid model: full-attention layers and sliding-window layers): every sequence has
// one block list per group, all of the same logical length ceil(num_tokens / block_size), all drawn
// from the ONE allocator with no split. A group of window W releases block j of a sequence once
// (j + 1) * block_size <= num_computed - W + 1 (no query at or after num_computed reads it): the list
// keeps -1 there, the tables a 0. Every call still covers all groups in one pass and is all or nothing
// across them. Prefix hits across groups: seq_table_prefix.cpp. One group of full attention (the
// default) is the single-table bookkeeping kvpool always had, bit for bit.
// Not thread-safe: one SeqTable belongs to one scheduler thread (the allocator it draws from is).
// The pure-Python twin is src/kvpool/_reference_tables.py; tests compare the two after every step.
#pragma once

#include <cstdint>
#include <unordered_map>
#include <utility>
#include <vector>

#include "block_allocator.h"
#include "block_slot.h"
#include "host_tier.h"

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
  // servers keep all 64). group_windows: one entry per KV-cache group, 0 for full attention, else the
  // window W >= 1 in tokens (at most kMaxGroups groups).
  SeqTable(BlockAllocator* allocator, int32_t max_seqs, int32_t max_blocks_per_seq, bool prefix_caching,
           uint64_t hash_mask = ~uint64_t{0}, const std::vector<int64_t>& group_windows = {0});
  static constexpr int32_t kMaxGroups = 64;

  // ---- sequences -----------------------------------------------------------------------------
  // A new sequence of n tokens (their ids when tokens != nullptr, else only the count). With prefix
  // caching and token ids, its leading full blocks before the last token come verified from the
  // cache (in every group; windowed groups only the blocks of their window). Returns the prompt tokens
  // found there (a multiple of block_size).
  int64_t add(int64_t id, const int32_t* tokens, int64_t n, uint64_t context);
  // Appends n tokens to each of ids[0, b) in order (token_ids: num_token_ids == b * n of them, or
  // nullptr); slots[G * b * n] out, group-major (group g's b * n slots at slots + g * b * n).
  void append_batch(const int64_t* ids, int64_t b, int64_t n, const int32_t* token_ids, int64_t num_token_ids,
                    int32_t* slots);
  // Leading tokens now computed (lens == nullptr: all); offers newly computed full blocks to the cache,
  // then windowed groups release the blocks that left their window (one allocator free() for all).
  void mark_computed(const int64_t* ids, int64_t k, const int64_t* lens);
  // child shares every block of parent (all computed), every group; a shared partial tail is copied on
  // first write, group by group.
  void fork(int64_t parent, int64_t child);
  void free_seq(int64_t id);

  bool contains(int64_t id) const { return index_.count(id) != 0; }
  int64_t size() const { return static_cast<int64_t>(index_.size()); }
  int64_t num_tokens(int64_t id) const { return seq(id).num_tokens; }
  int64_t num_computed(int64_t id) const { return seq(id).num_computed; }
  // Block positions of id (ceil(num_tokens / block_size)), and group g's block at each (-1: released).
  int64_t num_positions(int64_t id) const { return num_positions_of(seq(id)); }
  void group_blocks(int64_t id, int32_t group, int32_t* out) const;
  int32_t num_groups() const { return num_groups_; }
  const std::vector<int64_t>& group_windows() const { return windows_; }
  int32_t block_size() const { return block_size_; }
  int32_t max_seqs() const { return max_seqs_; }
  int32_t max_blocks_per_seq() const { return max_blocks_; }

  // ---- copy-on-write queue -------------------------------------------------------------------
  const std::vector<std::pair<int32_t, int32_t>>& pending_copies() const { return copies_; }
  // Empties the queue into src/dst (capacity pending_copies().size()) and drops its references.
  void pop_copies(int64_t* src, int64_t* dst);

  // ---- elastic pools (seq_table_elastic.cpp) -------------------------------------------------
  // BlockAllocator::relocate_top(n), then every name of a moved block rewritten: each sequence's
  // lists in every group, the copy-on-write queue; rows of the decode-step table holding a moved
  // block are written in full at their next decode_step (deltas included), a host tier's queued
  // transfers (its in-flight copies must not touch the top: refused). Writes the pairs to
  // src[0, m) / dst[0, m) (capacity n) and returns m; OutOfBlocks with nothing changed as the allocator's.
  int64_t relocate_top(int64_t n, int32_t* src, int32_t* dst);
  int32_t max_pool_blocks() const { return allocator_->max_num_blocks(); }
  void check_no_copy_in_flight(int64_t n) const;

  // ---- batches -------------------------------------------------------------------------------
  // Validates a mixed batch (new[i] new tokens per sequence, all uncomputed ones when new == nullptr;
  // decode: exactly one each) and returns its shape; fill_batch() then writes it to out[shape.offset[7]].
  BatchShape plan_batch(const int64_t* ids, int64_t b, const int64_t* new_tokens, int64_t pad_slots_to,
                        bool decode);
  void fill_batch(const int64_t* ids, const int64_t* new_tokens, const BatchShape& shape, int32_t* out) const;

  // append_batch(ids, b, 1, token_ids) + the decode batch in the persistent buffers, rows = pad_to
  // (>= b): padding rows have seq_len 0, slot -1, an all-zero table row. step_io() then holds
  // seq_lens [rows] | slot_mapping [G][rows] | query_start_loc [rows + 1], packed: for a given rows
  // they always sit at the same addresses, and one copy of (G + 2) * rows + 1 ints sends them.
  // Returns the longest sequence of the step.
  int64_t decode_step(const int64_t* ids, int64_t b, const int32_t* token_ids, int64_t num_token_ids,
                      int64_t pad_to);
  // mark_computed() of the last decode_step's sequences (those still alive), to their step lengths.
  void mark_step_computed();
  const int32_t* step_table() const { return step_table_.data(); }  // [G, max_seqs, max_blocks_per_seq]
  const int32_t* step_io() const { return step_io_.data(); }        // [(G + 2) * max_seqs + 1]
  int64_t step_io_size() const { return static_cast<int64_t>(step_io_.size()); }
  // The table entries the last decode_step changed: flat indices into step_table() (all groups: group
  // g's entries lie in [g * max_seqs * W, (g + 1) * max_seqs * W)) and their values.
  const std::vector<int32_t>& step_delta_index() const { return delta_index_; }
  const std::vector<int32_t>& step_delta_value() const { return delta_value_; }

  // ---- host tier (host_tier.h; seq_table_host.cpp) -----------------------------------------------
  // Extends the prefix cache to the tier's host blocks: add() continues a GPU hit on the host (queued
  // reloads), offered blocks are offloaded. One full-attention group only; attach before any add().
  void attach_host_tier(HostTier* tier);
  HostTier* host_tier() const { return host_; }
  // HostTier::pop() of the queued transfers; the sequences waiting for them may be batched once the
  // tier enqueued their copies (HostTier::launched).
  int64_t pop_transfers(int32_t* reload_host, int32_t* reload_gpu, int32_t* offload_gpu, int32_t* offload_host);

 private:
  // Per group, a sequence keeps only its block list: a group of window W has released exactly the
  // positions below released_before(g, num_computed), and every group has offered the same leading
  // blocks to the prefix cache (num_cached), so only the chain values differ.
  struct Seq {
    int64_t id = 0;
    uint64_t serial = 0;             // unique per add/fork: a batch row knows whose blocks it holds
    uint64_t version = 0;            // bumped when a block id is replaced (copy-on-write)
    int64_t num_tokens = 0;
    int64_t num_computed = 0;
    int64_t num_cached = 0;          // leading full blocks offered to the prefix cache (every group)
    uint64_t chain = kChainRoot;     // group 0's verified-cache chain value after those blocks
    uint64_t context = 0;            // keyed digest of the sequence's salt
    bool shared_tail = false;        // the partial last block may be shared (after fork)
    bool tokens_known = false;       // tokens holds every token of the sequence
    std::vector<int32_t> blocks;     // position-major: group g's block at position j is blocks[j * G + g]
    std::vector<int32_t> tokens;
    std::vector<uint64_t> hashes;    // group 0's hash of each full block whose tokens are known
    uint32_t mark = 0;               // per-call scratch: listed twice in one batch?
    std::vector<uint64_t> anchors;   // reference group's chain value after each cached block (anchored groups)
    std::vector<uint64_t> chains;    // [G - 1]: the chain values of groups 1.. (chained groups)
    HostCursor host;                 // its place in the host tier's chain (host tier only)
    int64_t reload_batch = 0;        // the host tier's batch of its reloads (0: none): no batch reads it
                                     // before they are popped and enqueued (HostTier::reloads_launched)
  };
  struct Grow {                      // one sequence's share of an append, planned before any change
    Seq* seq;
    int64_t positions;               // new block positions (one block each in every group)
    int64_t new_blocks;              // blocks to take from the allocator (copy-on-write ones included)
    uint64_t copy_tail;              // bit g: group g's shared partial tail is copied first
  };
  // A prefix hit across groups in the making (seq_table_prefix.cpp).
  struct HitSearch {
    int64_t h = 0;                   // blocks every group can serve so far
    int64_t collisions = 0;
    std::vector<std::vector<int32_t>> ids;      // [G][matchable]: probed blocks
    std::vector<std::vector<uint64_t>> stamps;  // [G][matchable]: their stamps
  };

  Seq& seq(int64_t id);
  const Seq& seq(int64_t id) const;
  std::vector<Seq*> lookup(const char* fn, const int64_t* ids, int64_t b);
  int64_t plan_growth(const char* fn, const std::vector<Seq*>& seqs, int64_t n);
  uint64_t shared_tails_to_copy(const Seq& s, std::vector<std::pair<int32_t, int32_t>>& moved) const;
  void check_width(const char* fn, const Seq& s, int64_t tokens) const;
  void grow(Seq& s, const Grow& g, int64_t& next);
  void write_slots(const Seq& s, int64_t first, int64_t n, int32_t* slots, int64_t stride) const;
  void append_to(const char* fn, const std::vector<Seq*>& seqs, int64_t n, const int32_t* token_ids,
                 int64_t num_token_ids, int32_t* slots, int64_t stride);
  void extend_tokens(Seq& s, const int32_t* token_ids, int64_t n);
  void offer_to_cache(Seq& s, int64_t old_computed, int64_t full);
  void cache_chained(Seq& s, int32_t g, int64_t first, int64_t full);
  void cache_anchored(Seq& s, int32_t g, int64_t first, int64_t full);
  void release_window(Seq& s, int64_t old_computed);
  void release_moved(Seq& s, int64_t old_computed);
  void take_released();
  uint64_t& chain_of(Seq& s, int32_t g) { return g == 0 ? s.chain : s.chains[static_cast<size_t>(g - 1)]; }
  const int32_t* held_blocks(const Seq& s, int64_t* count);
  int64_t num_positions_of(const Seq& s) const {  // ceil(num_tokens / bs), without a division when it can
    if (num_groups_ == 1) return static_cast<int64_t>(s.blocks.size());
    return block_shift_ >= 0 ? (s.num_tokens + block_size_ - 1) >> block_shift_
                             : static_cast<int64_t>(s.blocks.size()) / num_groups_;
  }
  // Positions group g has released at num_computed tokens: (j + 1) * bs <= num_computed - W + 1 for j below it.
  int64_t released_before(int32_t g, int64_t num_computed) const {
    const int64_t w = windows_[static_cast<size_t>(g)];
    if (w == 0 || num_computed < w) return 0;
    const int64_t seen = num_computed - w + 1;  // tokens before the oldest one a query at num_computed reads
    return block_shift_ >= 0 ? seen >> block_shift_ : seen / block_size_;
  }
  const uint64_t* allocator_hashes(const Seq& s, int64_t first, int64_t k);
  const uint64_t* group_hashes(const Seq& s, int32_t g, int64_t first, int64_t k);
  const int32_t* group_ids(const Seq& s, int32_t g, int64_t first, int64_t k);
  void write_step_row(int64_t row, const Seq* s);
  void write_step_groups(int64_t row, const Seq* s, int32_t n, bool same, int32_t from);
  void set_entry(int32_t* entries, int64_t base, int32_t j, int32_t block);
  // seq_table_host.cpp
  int64_t continue_on_host(Seq& s, const int32_t* tokens, int64_t matchable, int64_t gpu_hits);
  void offload_to_host(Seq& s, int64_t full);
  // seq_table_prefix.cpp
  int64_t add_across_groups(Seq& s, const int32_t* tokens, int64_t n);
  void probe_chained(HitSearch& hs, const Seq& s, const int32_t* tokens);
  void probe_windows(HitSearch& hs, const Seq& s, const int32_t* tokens);
  bool take_hits(HitSearch& hs, Seq& s, int64_t matchable);

  BlockAllocator* allocator_;
  int32_t block_size_;
  int32_t block_shift_;              // log2(block_size_) when a power of two, else -1 (divisions in the hot path)
  int32_t max_seqs_;
  int32_t max_blocks_;
  bool prefix_caching_;
  HashKey key_;
  uint64_t hash_mask_;
  int32_t num_groups_;
  std::vector<int64_t> windows_;     // [G]: 0 = full attention, else the window in tokens
  std::vector<uint64_t> contexts_;   // scratch [G]: group_context() of the sequence at hand
  std::vector<int32_t> chained_;     // groups whose cache entries chain on their own blocks
  std::vector<int32_t> anchored_;    // windowed groups anchored on the reference group's chain
  std::vector<int32_t> windowed_;    // every group with a window
  int32_t reference_ = -1;           // the first full group (-1: none; then every group is chained)
  bool any_window_ = false;
  std::vector<uint64_t> masked_;     // scratch: hashes under hash_mask_ (and per group)
  std::vector<int32_t> gathered_;    // scratch: one group's block ids, or a sequence's held ones
  std::vector<uint64_t> parents_;    // scratch: anchors of an anchored group's blocks
  std::vector<int32_t*> leaving_;    // scratch: list entries a window released in this mark_computed()
  std::vector<int32_t> released_;    // scratch: their blocks, given back in one free()
  uint64_t next_serial_ = 1;
  uint32_t epoch_ = 0;
  std::unordered_map<int64_t, Seq> index_;
  std::vector<Grow> plan_;
  std::vector<int32_t> fresh_;
  std::vector<std::pair<int32_t, int32_t>> copies_;
  std::unordered_map<int32_t, int32_t> queued_;  // block -> references the copy queue holds
  HostTier* host_ = nullptr;         // the host tier, if any (not owned)

  // decode-step buffers, allocated once: their addresses never change
  std::vector<int32_t> step_table_;
  std::vector<int32_t> step_io_;
  std::vector<uint64_t> row_owner_;  // serial of the sequence a row holds (0: none)
  std::vector<uint64_t> row_version_;
  std::vector<int32_t> row_len_;     // leading entries of a row that may be non-zero
  std::vector<int32_t> row_released_;  // [G][max_seqs]: leading entries zeroed as the window released them
  std::vector<int32_t> delta_index_;
  std::vector<int32_t> delta_value_;
  std::vector<std::pair<int64_t, uint64_t>> step_seqs_;  // (id, serial) of the last decode_step's sequences
};

}  // namespace kvpool
