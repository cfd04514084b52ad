// pybind11 bindings of the C++ core as the private module kvpool._C (the only file that sees Python).
//
// Arrays cross without copies: a C-contiguous int32 / uint64 numpy array is read in place (other
// inputs are converted once by kvpool.allocator._as_array), and outputs are numpy arrays
// allocated here and filled by the core directly. The GIL is released while the core works; the
// allocator's own mutex keeps concurrent calls safe. C++ exceptions become kvpool.errors classes.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <string_view>

#include "block_allocator.h"
#include "block_hash.h"
#include "errors.h"

namespace py = pybind11;
using kvpool::BlockAllocator;

namespace {

// `obj` as a 1-D C-contiguous array of T. The common case, such an array already, is borrowed as
// is (no copy, no Python call). Anything else (a list, another dtype, a strided view) goes once
// through kvpool.allocator._as_array, which refuses values that would not survive the cast
// (3.5 as an id, 2**32 wrapping to 0, a negative hash) with a kvpool.errors exception.
template <typename T>
py::array_t<T> as_array(py::handle obj, const char* fn, const char* what, const char* range_error) {
  if (py::isinstance<py::array_t<T, py::array::c_style>>(obj) && py::reinterpret_borrow<py::array>(obj).ndim() == 1) {
    return py::reinterpret_borrow<py::array_t<T>>(obj);
  }
  py::object errors = py::module_::import("kvpool.errors");
  py::object converted = py::module_::import("kvpool.allocator")
                             .attr("_as_array")(obj, py::dtype::of<T>(), fn, what, errors.attr(range_error));
  if (!py::isinstance<py::array_t<T, py::array::c_style>>(converted)) {
    throw kvpool::InvalidArgument(std::string(fn) + ": could not convert " + what + " to a C-contiguous array");
  }
  return py::reinterpret_borrow<py::array_t<T>>(converted);
}

py::array_t<int32_t> as_ids(py::handle obj, const char* fn) {
  return as_array<int32_t>(obj, fn, "ids", "BlockIndexError");
}

py::array_t<uint64_t> as_hashes(py::handle obj, const char* fn) {
  return as_array<uint64_t>(obj, fn, "hashes", "InvalidArgumentError");
}

// A Python integer (or anything with __index__) as int64; floats, strings, None are refused.
int64_t as_int64(py::handle obj, const char* fn, const char* what) {
  if (PyIndex_Check(obj.ptr())) {
    py::object value = py::reinterpret_steal<py::object>(PyNumber_Index(obj.ptr()));
    if (value) {
      int overflow = 0;
      const long long v = PyLong_AsLongLongAndOverflow(value.ptr(), &overflow);
      if (!overflow) return v;
    }
    PyErr_Clear();
  }
  throw kvpool::InvalidArgument(std::string(fn) + ": " + what + "=" + std::string(py::repr(obj)) +
                                " must be an integer in the int64 range");
}

// Raises kvpool.errors.<name>(message, *extra) as the pending Python exception.
template <typename... Extra>
void raise_kvpool_error(const char* name, const char* message, Extra... extra) {
  py::object cls = py::module_::import("kvpool.errors").attr(name);
  py::object error = cls(message, extra...);
  PyErr_SetObject(cls.ptr(), error.ptr());
}

void translate_exception(std::exception_ptr p) {
  try {
    if (p) std::rethrow_exception(p);
  } catch (const kvpool::OutOfBlocks& e) {
    raise_kvpool_error("OutOfBlocksError", e.what(), e.requested, e.available);
  } catch (const kvpool::BlockIndexOutOfRange& e) {
    raise_kvpool_error("BlockIndexError", e.what());
  } catch (const kvpool::InvalidArgument& e) {
    raise_kvpool_error("InvalidArgumentError", e.what());
  } catch (const kvpool::InvariantBroken& e) {
    PyErr_SetString(PyExc_AssertionError, e.what());
  }
}

py::dict stats_dict(const kvpool::AllocatorStats& s, const BlockAllocator& a) {
  py::dict d;
  d["allocations"] = s.allocations;
  d["frees"] = s.frees;
  d["increfs"] = s.increfs;
  d["prefix_queries"] = s.prefix_queries;
  d["prefix_query_blocks"] = s.prefix_query_blocks;
  d["prefix_hit_blocks"] = s.prefix_hit_blocks;
  d["cached_blocks_added"] = s.cached_blocks_added;
  d["evictions"] = s.evictions;
  d["high_water_mark"] = s.high_water_mark;
  d["num_blocks"] = a.num_blocks();
  d["free_blocks"] = s.free_blocks;
  d["used_blocks"] = a.num_blocks() - s.free_blocks;
  d["cached_blocks"] = s.cached_blocks;
  return d;
}

// Docstrings (numpydoc) of the methods the Python class kvpool.allocator.BlockAllocator inherits.
constexpr const char* kAllocateDoc = R"doc(Take ``n`` free blocks, least recently freed first.

Returns
-------
ids : np.ndarray
    ``[n] int32`` block ids, each now with refcount 1. Cached free blocks handed out are evicted.

Raises
------
OutOfBlocksError
    Fewer than ``n`` blocks are free (``.requested``, ``.available``); nothing is allocated.
InvalidArgumentError
    ``n`` is negative or not an integer.)doc";

constexpr const char* kFreeDoc = R"doc(Drop one reference per id.

Parameters
----------
ids : array_like
    ``[k] int32`` block ids; an id may repeat up to its refcount. Blocks reaching refcount 0 join
    the free list tail in reverse order of ``ids`` (a sequence's last blocks are evicted first).

Raises
------
BlockIndexError
    An id is out of range.
InvalidArgumentError
    An id is freed more often than it is referenced (double free). Nothing changes on error.)doc";

constexpr const char* kIncrefDoc = R"doc(Add one reference per id (``[k] int32``) to share blocks (fork, beam search).

Every id must be held (refcount > 0): free cached blocks are taken with match_prefix().)doc";

constexpr const char* kRefcountsDoc = R"doc(Reference counts: ``ids`` ``[k] int32`` -> ``[k] int32``.)doc";

constexpr const char* kCacheBlocksDoc = R"doc(Offer held full blocks for reuse under their hashes.

Parameters
----------
ids : array_like
    ``[k] int32`` held blocks (refcount > 0).
hashes : array_like
    ``[k] uint64`` their hashes, from hash_block_tokens().

A hash already mapped to another block keeps that block (first writer wins); the new block stays
uncached. A block already cached under a different hash is an error. With prefix caching
disabled the input is validated and nothing is cached.)doc";

constexpr const char* kMatchPrefixDoc = R"doc(Blocks of the longest cached prefix of ``hashes``, one reference taken on each.

Parameters
----------
hashes : array_like
    ``[k] uint64`` chained block hashes of a prompt.

Returns
-------
ids : np.ndarray
    ``[h] int32``, ``h <= k``: the blocks cached under ``hashes[:h]``; the walk stops at the first
    hash not cached. Cached free blocks are revived (taken off the free list in O(1)).)doc";

constexpr const char* kStatsDoc = R"doc(Counters since construction, as a dict of ints.

``allocations`` (blocks handed out by allocate), ``frees`` (blocks that reached refcount 0),
``increfs``, ``prefix_queries`` (match_prefix calls), ``prefix_query_blocks`` (hashes asked),
``prefix_hit_blocks``, ``cached_blocks_added``, ``evictions`` (cached free blocks reallocated),
``high_water_mark`` (most blocks in use at once), and the snapshot ``num_blocks``,
``free_blocks``, ``used_blocks``, ``cached_blocks``.)doc";

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "kvpool's C++ core: block allocator and block hashing (private; use kvpool.allocator).";
  py::register_exception_translator(&translate_exception);

  m.attr("ROOT_HASH") = py::int_(kvpool::kRootHash);

  m.def(
      "hash_extra",
      [](int tag, py::bytes data) {
        std::string_view view = data;  // the bytes stay alive in `data` while we read them
        if (tag < 1 || tag > 255) {
          throw kvpool::InvalidArgument("hash_extra(): tag=" + std::to_string(tag) + " must be in [1, 255]");
        }
        return kvpool::hash_extra(static_cast<uint8_t>(tag), reinterpret_cast<const uint8_t*>(view.data()),
                                  view.size());
      },
      py::arg("tag"), py::arg("data"));

  m.def(
      "hash_block_tokens",
      [](py::handle tokens_obj, int64_t block_size, uint64_t parent_hash, uint64_t extra_key) {
        py::array_t<int32_t> tokens =
            as_array<int32_t>(tokens_obj, "hash_block_tokens()", "token_ids", "InvalidArgumentError");
        const int64_t n = tokens.shape(0);
        if (block_size < 1) {
          throw kvpool::InvalidArgument("hash_block_tokens(): block_size=" + std::to_string(block_size) +
                                        " must be >= 1; pass the allocator's block size (e.g. 16)");
        }
        py::array_t<uint64_t> out(static_cast<py::ssize_t>(n / block_size));
        const int32_t* in = tokens.data();
        uint64_t* dst = out.mutable_data();
        {
          py::gil_scoped_release release;
          kvpool::hash_block_tokens(in, n, block_size, parent_hash, extra_key, dst);
        }
        return out;
      },
      py::arg("token_ids"), py::arg("block_size"), py::arg("parent_hash"), py::arg("extra_key"));

  py::class_<BlockAllocator>(m, "BlockAllocator")
      .def(py::init<int64_t, int64_t, bool>(), py::arg("num_blocks"), py::arg("block_size") = 16,
           py::arg("enable_prefix_caching") = true, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("num_blocks", &BlockAllocator::num_blocks)
      .def_property_readonly("block_size", &BlockAllocator::block_size)
      .def_property_readonly("enable_prefix_caching", &BlockAllocator::prefix_caching)
      .def_property_readonly("num_free_blocks", &BlockAllocator::num_free_blocks,
                             "Blocks allocate() can hand out now: refcount 0, evictable cached blocks included.")
      .def_property_readonly("num_cached_blocks", &BlockAllocator::num_cached_blocks,
                             "Blocks that have a prefix-cache hash, held (refcount > 0) or free.")
      .def(
          "allocate",
          [](BlockAllocator& a, py::handle n_obj) {
            const int64_t n = as_int64(n_obj, "allocate()", "n");
            // Size the output only for a request that can be valid; allocate() raises on the others
            // before writing anything.
            const bool plausible = n >= 0 && n <= a.num_blocks();
            py::array_t<int32_t> out(static_cast<py::ssize_t>(plausible ? n : 0));
            int32_t* dst = out.mutable_data();
            {
              py::gil_scoped_release release;
              a.allocate(n, dst);
            }
            return out;
          },
          py::arg("n"), kAllocateDoc)
      .def(
          "free",
          [](BlockAllocator& a, py::handle ids_obj) {
            py::array_t<int32_t> ids = as_ids(ids_obj, "free()");
            const int64_t k = ids.shape(0);
            const int32_t* src = ids.data();
            py::gil_scoped_release release;
            a.free(src, k);
          },
          py::arg("ids"), kFreeDoc)
      .def(
          "incref",
          [](BlockAllocator& a, py::handle ids_obj) {
            py::array_t<int32_t> ids = as_ids(ids_obj, "incref()");
            const int64_t k = ids.shape(0);
            const int32_t* src = ids.data();
            py::gil_scoped_release release;
            a.incref(src, k);
          },
          py::arg("ids"), kIncrefDoc)
      .def(
          "refcounts",
          [](const BlockAllocator& a, py::handle ids_obj) {
            py::array_t<int32_t> ids = as_ids(ids_obj, "refcounts()");
            const int64_t k = ids.shape(0);
            py::array_t<int32_t> out(static_cast<py::ssize_t>(k));
            const int32_t* src = ids.data();
            int32_t* dst = out.mutable_data();
            {
              py::gil_scoped_release release;
              a.refcounts(src, k, dst);
            }
            return out;
          },
          py::arg("ids"), kRefcountsDoc)
      .def(
          "cache_blocks",
          [](BlockAllocator& a, py::handle ids_obj, py::handle hashes_obj) {
            py::array_t<int32_t> ids = as_ids(ids_obj, "cache_blocks()");
            py::array_t<uint64_t> hashes = as_hashes(hashes_obj, "cache_blocks()");
            const int64_t k = ids.shape(0), h = hashes.shape(0);
            const int32_t* src = ids.data();
            const uint64_t* keys = hashes.data();
            py::gil_scoped_release release;
            a.cache_blocks(src, k, keys, h);
          },
          py::arg("ids"), py::arg("hashes"), kCacheBlocksDoc)
      .def(
          "match_prefix",
          [](BlockAllocator& a, py::handle hashes_obj) {
            py::array_t<uint64_t> hashes = as_hashes(hashes_obj, "match_prefix()");
            const int64_t k = hashes.shape(0);
            py::array_t<int32_t> out(static_cast<py::ssize_t>(k));
            const uint64_t* keys = hashes.data();
            int32_t* dst = out.mutable_data();
            int64_t hits;
            {
              py::gil_scoped_release release;
              hits = a.match_prefix(keys, k, dst);
            }
            // Shrink in place to the hits: we hold the only reference to `out`.
            if (hits < k) out.resize({static_cast<py::ssize_t>(hits)}, /*refcheck=*/false);
            return out;
          },
          py::arg("hashes"), kMatchPrefixDoc)
      .def("stats", [](const BlockAllocator& a) { return stats_dict(a.stats(), a); }, kStatsDoc)
      .def("check_invariants", &BlockAllocator::check_invariants, py::call_guard<py::gil_scoped_release>(),
           "Verify every internal invariant in O(num_blocks); raises AssertionError naming a broken one.");
}
