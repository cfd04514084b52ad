// Helpers shared by the SeqTable source files (seq_table.cpp, seq_table_batch.cpp, seq_table_prefix.cpp).
#pragma once

#include <cstdint>
#include <string>

namespace kvpool {
namespace seq_table_detail {

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr int32_t kTablePad = 0;  // block_table entries past a sequence's blocks, and where a window released one
constexpr int32_t kSlotPad = -1;  // slot_mapping entries of padding tokens
constexpr int32_t kReleased = -1; // a block position a windowed group gave back (in Seq::blocks)

inline std::string id_text(int64_t id) { return std::to_string(id); }

}  // namespace seq_table_detail
}  // namespace kvpool
