// pybind11 bindings of the C++ core as the private module kvpool._C (the only file that sees Python).
//
// Inputs are validated once (kvpool._arrays.as_exact_array converts anything that is not a
// C-contiguous int32 / uint64 array already) and COPIED into memory the call owns before the GIL is
// released: another Python thread may mutate or resize the caller's array while the core works, and
// the core must never read it again after validation. Outputs are numpy arrays allocated here and
// filled by the core directly. The allocator's own mutex keeps concurrent calls safe. C++
// exceptions become kvpool.errors classes.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include "block_allocator.h"
#include "block_hash.h"
#include "errors.h"
#include "host_tier.h"
#include "seq_table.h"
#include "vmm.h"

namespace py = pybind11;
using kvpool::BlockAllocator;
using kvpool::HostTier;
using kvpool::SeqTable;

namespace {

// `obj` as a 1-D C-contiguous array of T. The common case, such an array already (and not a
// masked array), is borrowed as is. Anything else (a list, another dtype, a strided view) goes once
// through kvpool._arrays.as_exact_array, which converts every integer exactly and refuses values
// that would not survive the cast (3.5 or True as an id, 2**32 wrapping to 0, a negative hash) with
// a kvpool.errors exception.
bool is_plain_ndarray(py::handle obj) {
  // Exactly numpy.ndarray: subclasses such as masked arrays carry meaning the core would drop.
  static PyTypeObject* ndarray =
      reinterpret_cast<PyTypeObject*>(py::object(py::module_::import("numpy").attr("ndarray")).release().ptr());
  return Py_TYPE(obj.ptr()) == ndarray;
}

template <typename T>
py::array_t<T> as_array(py::handle obj, const char* fn, const char* what, const char* range_error) {
  if (is_plain_ndarray(obj) && py::isinstance<py::array_t<T, py::array::c_style>>(obj) &&
      py::reinterpret_borrow<py::array>(obj).ndim() == 1) {
    return py::reinterpret_borrow<py::array_t<T>>(obj);
  }
  py::object errors = py::module_::import("kvpool.errors");
  py::object converted = py::module_::import("kvpool._arrays")
                             .attr("as_exact_array")(obj, py::dtype::of<T>(), fn, what, errors.attr(range_error));
  if (!py::isinstance<py::array_t<T, py::array::c_style>>(converted)) {
    throw kvpool::InvalidArgument(std::string(fn) + ": could not convert " + what + " to a C-contiguous array");
  }
  return py::reinterpret_borrow<py::array_t<T>>(converted);
}

// `obj` validated as above, then copied into a vector the call owns (read once, never again).
template <typename T>
std::vector<T> owned(py::handle obj, const char* fn, const char* what, const char* range_error) {
  py::array_t<T> array = as_array<T>(obj, fn, what, range_error);
  const T* data = array.data();
  return std::vector<T>(data, data + array.shape(0));
}

std::vector<int32_t> owned_ids(py::handle obj, const char* fn) { return owned<int32_t>(obj, fn, "ids", "BlockIndexError"); }

std::vector<uint64_t> owned_hashes(py::handle obj, const char* fn) {
  return owned<uint64_t>(obj, fn, "hashes", "InvalidArgumentError");
}

std::vector<int32_t> owned_tokens(py::handle obj, const char* fn) {
  return owned<int32_t>(obj, fn, "token_ids", "InvalidArgumentError");
}

// `obj` (None allowed) as a borrowed 1-D int32 / int64 array; the GIL stays held while it is read.
template <typename T>
py::array_t<T> optional_array(py::handle obj, const char* fn, const char* what) {
  if (obj.is_none()) return py::array_t<T>();
  return as_array<T>(obj, fn, what, "InvalidArgumentError");
}

// Sequence ids as the server passes them in an int64 array: [-2**62, 2**62) (BlockTables maps other
// hashables to handles at and above 2**62, which a caller's array must not reach by accident).
py::array_t<int64_t> user_seq_ids(py::handle obj, const char* fn, bool check_range) {
  py::array_t<int64_t> ids = as_array<int64_t>(obj, fn, "seq_ids", "InvalidArgumentError");
  constexpr int64_t kLimit = int64_t{1} << 62;
  const int64_t* p = ids.data();
  for (py::ssize_t i = 0; check_range && i < ids.shape(0); ++i) {
    if (p[i] < -kLimit || p[i] >= kLimit) {
      throw kvpool::InvalidArgument(std::string(fn) + ": seq_id " + std::to_string(p[i]) +
                                    " is outside [-2**62, 2**62); integer ids must lie there (use a smaller "
                                    "id, or any non-integer hashable)");
    }
  }
  return ids;
}

// A Python int in [0, 2**64) (a hash, a chain value, a context key).
uint64_t as_uint64(py::handle obj, const char* fn, const char* what) {
  if (PyIndex_Check(obj.ptr()) && !PyBool_Check(obj.ptr())) {
    py::object value = py::reinterpret_steal<py::object>(PyNumber_Index(obj.ptr()));
    if (value) {
      const unsigned long long v = PyLong_AsUnsignedLongLong(value.ptr());
      if (!PyErr_Occurred()) return v;
    }
    PyErr_Clear();
  }
  throw kvpool::InvalidArgument(std::string(fn) + ": " + what + "=" + std::string(py::repr(obj)) +
                                " must be an integer in [0, 2**64)");
}

// A Python integer (or anything with __index__) as int64; floats, strings, None are refused.
int64_t as_int64(py::handle obj, const char* fn, const char* what) {
  if (PyIndex_Check(obj.ptr()) && !PyBool_Check(obj.ptr())) {
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
  } catch (const kvpool::DriverUnavailable& e) {
    raise_kvpool_error("ElasticUnavailableError", e.what());
  } catch (const kvpool::VirtualMemoryFailure& e) {
    raise_kvpool_error("VirtualMemoryError", e.what());
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
  d["hash_collisions"] = s.hash_collisions;
  d["high_water_mark"] = s.high_water_mark;
  d["num_blocks"] = s.num_blocks;
  d["free_blocks"] = s.free_blocks;
  d["used_blocks"] = s.num_blocks - s.free_blocks;
  d["cached_blocks"] = s.cached_blocks;
  d["prefix_entry_bytes"] = a.entry_bytes();
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

Every id must be held (refcount > 0): free cached blocks are taken with match_prefix(). A block
may hold at most 2**31 - 1 references: one more is refused (InvalidArgumentError) and nothing
changes.)doc";

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
    hash not cached. Cached free blocks are revived (taken off the free list in O(1)).

Notes
-----
Hash-only: a hit is trusted without looking at the tokens, so a hash collision (crafted, or one
in 2**64 by chance) would hand out another prompt's block. For callers who verify the content
themselves; kvpool's own tables use allocate_with_prefix(), which compares every hit's tokens.

Raises
------
InvalidArgumentError
    A hit block already holds 2**31 - 1 references; nothing changed.)doc";

constexpr const char* kStatsDoc = R"doc(Counters since construction, as a dict of ints.

``allocations`` (blocks handed out by allocate), ``frees`` (blocks that reached refcount 0),
``increfs``, ``prefix_queries`` (match_prefix / allocate_with_prefix calls), ``prefix_query_blocks``
(hashes asked), ``prefix_hit_blocks``, ``cached_blocks_added``, ``evictions`` (cached free blocks
reallocated), ``hash_collisions`` (verified lookups whose hash matched a block holding other tokens:
counted and treated as misses), ``high_water_mark`` (most blocks in use at once), and the snapshot
``num_blocks``, ``free_blocks``, ``used_blocks``, ``cached_blocks``, ``prefix_entry_bytes`` (host
memory reserved for verified entries: ``num_blocks * (4 * block_size + 24)`` with prefix caching,
touched only as blocks are cached).)doc";

constexpr const char* kAllocateWithPrefixDoc = R"doc(Verified prefix hit, then fresh blocks: all or nothing.

Parameters
----------
n : int
    Blocks the sequence needs in all (hits included).
hashes : array_like
    ``[k] uint64`` chained hashes of the prompt's leading full blocks (``k`` may exceed ``n``; only
    the first ``n`` are looked up), computed with this allocator's ``hash_key``.
token_ids : array_like
    ``[k * block_size] int32`` the tokens of those blocks: every hit is compared with them.
context : int
    The sequence's salt key, ``extra_key(extra)`` (0 for none).

Returns
-------
ids : np.ndarray
    ``[n] int32``: the ``h`` cached blocks first (one reference taken on each), then ``n - h`` new ones.
h : int
    Leading blocks found in the cache: their tokens, salt and whole prefix equal the query's.
chain : int
    Pass as ``parent`` to cache_blocks_verified() for the block after the hits.

Raises
------
OutOfBlocksError
    The ``n - h`` new blocks do not fit; nothing changed (statistics and eviction order included).)doc";

constexpr const char* kCacheBlocksVerifiedDoc = R"doc(Offer consecutive full blocks of one sequence for verified reuse.

Parameters
----------
ids : array_like
    ``[k] int32`` held blocks, consecutive in one sequence.
hashes : array_like
    ``[k] uint64`` their chained hashes.
token_ids : array_like
    ``[k * block_size] int32`` their tokens (stored: a later hit is compared with them).
context : int
    The sequence's salt key, ``extra_key(extra)`` (0 for none).
parent : int
    The chain value of the block before ``ids[0]``: 0 for a sequence's first block, else what
    allocate_with_prefix() or the previous cache_blocks_verified() call returned.

Returns
-------
chain : int
    The chain value after the last block, for the next call. A block whose hash is cached with
    other content is a counted collision: it and the blocks after it stay uncached (the returned
    value then makes later calls cache nothing).)doc";

constexpr const char* kProbeChainDoc = R"doc(The verified chain walk of allocate_with_prefix(), taking nothing.

Returns ``(ids [h] int32, stamps [h] uint64, collided)``: the leading blocks whose entries hold exactly
``token_ids`` (``[k * block_size]``) under ``context`` after the same cached prefix, their stamps (for
take_cached), and whether the walk stopped at a block holding other content. For hybrid models
(KV-cache groups); kvpool.BlockTables calls it from C++.)doc";

constexpr const char* kProbeAnchoredDoc = R"doc(Blocks verified one by one against given parents, from the end.

Block ``j`` of ``hashes [k]`` is a hit when its entry holds its tokens under ``context`` after the
cached block whose stamp is ``parents[j]`` (``[k] uint64``). Checks ``j = k - 1`` down and stops at the
first miss. Returns ``(ids [r] int32, stamps [r] uint64, collided)`` for the last ``r`` blocks.
Takes nothing.)doc";

constexpr const char* kTakeCachedDoc = R"doc(Take probed cached blocks and ``n`` fresh ones, all or nothing.

One reference on each of ``ids`` (``[k] int32``, no repeats), each of which must still hold the entry
whose stamp is ``stamps[j]``, then ``n`` fresh blocks. Returns the ``[n] int32`` fresh ids, or None
(nothing changed) when a block was evicted since it was probed. Counts one prefix query of
``query_blocks`` hashes that met ``collisions`` collisions and ``k`` hits.

Raises
------
OutOfBlocksError
    The fresh blocks do not fit next to the revived ones; nothing changed.)doc";

constexpr const char* kCacheBlocksChainedDoc = R"doc(cache_blocks_verified() returning the chain value after every block.

Returns ``[k] uint64``: the value to pass as a parent for the block after each one (the anchors of a
hybrid model's windowed groups); ``2**64 - 1`` from where caching stopped.)doc";

constexpr const char* kCacheBlocksAnchoredDoc = R"doc(Cache blocks each on its own after a given parent.

Block ``ids[j]`` (held) becomes a verified entry of its ``token_ids`` under ``context`` whose parent is
``parents[j]`` (``[k] uint64``; ``2**64 - 1`` skips the block). Same entry cached already: not cached
twice; other content under the hash: a counted collision, a free block replaced, a held one kept.)doc";

constexpr const char* kVirtualRangeDoc = R"doc(A reserved virtual address range, physical memory mapped in chunks.

``VirtualRange(nbytes, backend="host", device=0, chunk_bytes=0)`` reserves ``round_up(nbytes, granularity)``
bytes of address space and maps nothing. ``granularity``, the unit of map/unmap, is ``chunk_bytes`` (a
multiple of the device's allocation granularity) or, for 0, that granularity itself: one physical
allocation per chunk, so larger chunks mean fewer driver calls per GiB mapped (faster wake). ``backend="cuda"``: CUDA virtual memory on ``device`` (the driver is
loaded with dlopen at first use; ElasticUnavailableError without it). ``backend="host"``: mmap,
same semantics, 2 MiB granularity, for CPU tests. The address never changes while the range lives;
everything is unmapped and the reservation freed when it is destroyed.)doc";

constexpr const char* kMapDoc = R"doc(Map zero-filled physical memory at ``[offset, offset + nbytes)``.

Both must be multiples of ``granularity`` and lie inside the range; every chunk there must be
unmapped. All or nothing: on any error (InvalidArgumentError for bad input, VirtualMemoryError when
the device is out of memory) nothing is mapped. Chunks made by prepare() are used first.)doc";

constexpr const char* kUnmapDoc = R"doc(Unmap ``[offset, offset + nbytes)`` and free its physical memory.

Aligned and inside the range as for map(); every chunk there must be mapped (else InvalidArgumentError
and nothing changes). The contents are dropped; on CUDA it first waits for the device's pending work.)doc";

constexpr const char* kPrepareDoc = R"doc(Create physical chunks for the next ``nbytes`` of map() ahead of time.

Moves the physical allocation off the grow path (map() then only maps). Prepared memory is held on
the device (``prepared_bytes``) until mapped, drop_prepared() or release_all(). ``nbytes`` is rounded
up to chunks and may not exceed the unmapped part of the range.)doc";

constexpr const char* kReleaseAllDoc = R"doc(Sleep: unmap every chunk and free all physical memory (prepared too).

Contents are dropped; the reservation and ``ptr`` stay. map()/unmap() are refused until
remap_all(). InvalidArgumentError if already asleep.)doc";

constexpr const char* kRemapAllDoc = R"doc(Wake: map again the chunks that were mapped at release_all(), at the same addresses.

Their contents are zero-filled on the host backend and undefined on CUDA (rewrite before reading).
All or nothing: on failure the range stays asleep. InvalidArgumentError if awake.)doc";

// VirtualRange: every call releases the GIL (mapping a GiB takes milliseconds); its own mutex
// serializes calls on one range.
void bind_virtual_range(py::module_& m) {
  using kvpool::VirtualRange;
  using release = py::call_guard<py::gil_scoped_release>;
  py::class_<VirtualRange>(m, "VirtualRange", kVirtualRangeDoc)
      .def(py::init([](int64_t nbytes, const std::string& backend, int device, int64_t chunk_bytes) {
             py::gil_scoped_release unlocked;
             return new VirtualRange(nbytes, backend, device, chunk_bytes);
           }),
           py::arg("nbytes"), py::arg("backend") = "host", py::arg("device") = 0, py::arg("chunk_bytes") = 0)
      .def_property_readonly("ptr", &VirtualRange::ptr, "Base address (int), granularity-aligned, fixed for life.")
      .def_property_readonly("reserved_bytes", &VirtualRange::reserved_bytes,
                             "``round_up(nbytes, granularity)``: the address space reserved.")
      .def_property_readonly("granularity", &VirtualRange::granularity,
                             "Bytes of one chunk, the unit of map/unmap: chunk_bytes, or the device's granularity.")
      .def_property_readonly("device_granularity", &VirtualRange::device_granularity,
                             "The backend's allocation granularity (2 MiB on the host backend).")
      .def_property_readonly("backend", [](const VirtualRange& r) { return std::string(r.backend()); })
      .def_property_readonly("mapped_bytes", &VirtualRange::mapped_bytes, "Bytes mapped now (0 while asleep).")
      .def_property_readonly("prepared_bytes", &VirtualRange::prepared_bytes,
                             "Physical memory created ahead by prepare(), not mapped yet.")
      .def_property_readonly("asleep", &VirtualRange::asleep, "True between release_all() and remap_all().")
      .def("is_mapped", &VirtualRange::is_mapped, py::arg("offset"), release(),
           "Whether the chunk holding byte ``offset`` (any offset inside the range) is mapped.")
      .def("map", &VirtualRange::map, py::arg("offset"), py::arg("nbytes"), release(), kMapDoc)
      .def("unmap", &VirtualRange::unmap, py::arg("offset"), py::arg("nbytes"), release(), kUnmapDoc)
      .def("prepare", &VirtualRange::prepare, py::arg("nbytes"), release(), kPrepareDoc)
      .def("drop_prepared", &VirtualRange::drop_prepared, release(), "Release what prepare() created.")
      .def("release_all", &VirtualRange::release_all, release(), kReleaseAllDoc)
      .def("remap_all", &VirtualRange::remap_all, release(), kRemapAllDoc);
}

// The host tier's bookkeeping (host_tier.h): built and driven by kvpool.tier.HostKVTier and BlockTables.
void bind_host_tier(py::module_& m) {
  py::class_<HostTier>(m, "HostTier")
      .def(py::init<BlockAllocator*, BlockAllocator*>(), py::arg("gpu_allocator"), py::arg("host_allocator"),
           py::keep_alive<1, 2>(), py::keep_alive<1, 3>())
      .def_property_readonly("pending_reloads", &HostTier::pending_reloads)
      .def_property_readonly("pending_offloads", &HostTier::pending_offloads)
      .def("complete", &HostTier::complete, py::arg("batch"), py::arg("reloads"))
      .def("launched", &HostTier::launched, py::arg("batch"))
      .def("transfers_of",  // (reload_host, reload_gpu, offload_gpu, offload_host) of a batch in flight, or None
           [](const HostTier& t, int64_t batch) -> py::object {
             std::vector<std::pair<int32_t, int32_t>> reloads, offloads;
             if (!t.transfers_of(batch, &reloads, &offloads)) return py::none();
             const auto r = static_cast<py::ssize_t>(reloads.size()), o = static_cast<py::ssize_t>(offloads.size());
             py::array_t<int32_t> rh(r), rg(r), og(o), oh(o);
             for (py::ssize_t i = 0; i < r; ++i) {
               rh.mutable_data()[i] = reloads[static_cast<size_t>(i)].first;
               rg.mutable_data()[i] = reloads[static_cast<size_t>(i)].second;
             }
             for (py::ssize_t i = 0; i < o; ++i) {
               og.mutable_data()[i] = offloads[static_cast<size_t>(i)].first;
               oh.mutable_data()[i] = offloads[static_cast<size_t>(i)].second;
             }
             return py::make_tuple(rh, rg, og, oh);
           }, py::arg("batch"))
      .def("readable",
           [](const HostTier& t, int32_t b) {
             if (b < 0 || b >= t.host()->num_blocks()) {
               throw kvpool::BlockIndexOutOfRange("readable(): host block " + std::to_string(b) + " is out of range [0, " +
                                                  std::to_string(t.host()->num_blocks()) + ")");
             }
             return t.readable(b);
           })
      .def("stats", [](const HostTier& t) {
        const kvpool::HostTierStats s = t.stats();
        py::dict d;
        d["host_queries"] = s.host_queries;
        d["host_hit_blocks"] = s.host_hit_blocks;
        d["offloaded_blocks"] = s.offloaded_blocks;
        d["skipped_blocks"] = s.skipped_blocks;
        d["dropped_blocks"] = s.dropped_blocks;
        d["completed_reloads"] = s.completed_reloads;
        d["completed_offloads"] = s.completed_offloads;
        d["pending_reloads"] = s.pending_reloads;
        d["pending_offloads"] = s.pending_offloads;
        d["in_flight_reloads"] = s.in_flight_reloads;
        d["in_flight_offloads"] = s.in_flight_offloads;
        return d;
      });
}

constexpr const char* kGrowDoc = R"doc(Add ids ``[num_blocks, num_blocks + n)`` to the pool, free.

They join the free list's tail: the free ids already there (all lower) are handed out first, so the
top stays free for a later shrink(). ``num_blocks + n`` may not exceed ``max_num_blocks``
(InvalidArgumentError, nothing changed). The caller maps their memory first.)doc";

constexpr const char* kShrinkDoc = R"doc(Remove the top ``n`` ids ``[num_blocks - n, num_blocks)``; all must be free.

Cached ones are evicted (counted in ``stats()["evictions"]``). Held ones: OutOfBlocksError with
``.requested = n`` and ``.available`` = free_top_blocks (the most that can be released now), nothing
changed; relocate_top(n) moves them down first. The caller unmaps their memory after.)doc";

constexpr const char* kRelocateTopDoc = R"doc(Move every held block among the top ``n`` ids to a free id below them.

Returns ``(src, dst)``, ``[m] int64`` each, ascending by ``src``: block ``src[i]``'s references, hash
and verified cache entry now belong to ``dst[i]`` (taken in free-list order; a cached one is evicted)
and ``src[i]`` is free. The caller must copy each block's contents src -> dst (copy_blocks) before
anything reads ``dst`` and must rewrite every table naming a ``src`` id; BlockTables.relocate_top does
the tables. OutOfBlocksError (``.available``: how many could move), nothing changed, when fewer
free ids lie below ``num_blocks - n`` than blocks to move.)doc";

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "kvpool's C++ core: block allocator and block hashing (private; use kvpool.allocator).";
  py::register_exception_translator(&translate_exception);

  m.attr("ROOT_HASH") = py::int_(kvpool::kRootHash);
  m.attr("CHAIN_ROOT") = py::int_(kvpool::kChainRoot);

  m.def(
      "hash_extra",
      [](int tag, py::bytes data, uint64_t k0, uint64_t k1) {
        std::string_view view = data;  // the bytes stay alive in `data` while we read them
        if (tag < 1 || tag > 255) {
          throw kvpool::InvalidArgument("hash_extra(): tag=" + std::to_string(tag) + " must be in [1, 255]");
        }
        return kvpool::hash_extra(static_cast<uint8_t>(tag), reinterpret_cast<const uint8_t*>(view.data()),
                                  view.size(), kvpool::HashKey{k0, k1});
      },
      py::arg("tag"), py::arg("data"), py::arg("k0") = 0, py::arg("k1") = 0);

  m.def(
      "hash_block_tokens",
      [](py::handle tokens_obj, int64_t block_size, uint64_t parent_hash, uint64_t extra_key, uint64_t k0,
         uint64_t k1) {
        py::array_t<int32_t> tokens =
            as_array<int32_t>(tokens_obj, "hash_block_tokens()", "token_ids", "InvalidArgumentError");
        const int64_t n = tokens.shape(0);
        if (block_size < 1) {
          throw kvpool::InvalidArgument("hash_block_tokens(): block_size=" + std::to_string(block_size) +
                                        " must be >= 1; pass the allocator's block size (e.g. 16)");
        }
        py::array_t<uint64_t> out(static_cast<py::ssize_t>(n / block_size));
        // The GIL stays held: no other thread can change the tokens while they are read, and
        // copying them first would cost a third of the hashing speed.
        kvpool::hash_block_tokens(tokens.data(), n, block_size, parent_hash, extra_key, kvpool::HashKey{k0, k1},
                                  out.mutable_data());
        return out;
      },
      py::arg("token_ids"), py::arg("block_size"), py::arg("parent_hash"), py::arg("extra_key"), py::arg("k0") = 0,
      py::arg("k1") = 0);

  m.def(
      "group_hash",
      [](py::handle hash_obj, int64_t group, uint64_t k0, uint64_t k1) {
        if (group < 0) throw kvpool::InvalidArgument("group_hash(): group=" + std::to_string(group) + " must be >= 0");
        return kvpool::group_hash(as_uint64(hash_obj, "group_hash()", "hash"), group, kvpool::HashKey{k0, k1});
      },
      py::arg("hash"), py::arg("group"), py::arg("k0") = 0, py::arg("k1") = 0,
      "KV-cache group ``group``'s prefix-cache hash of a block whose group-0 hash is ``hash`` (identity for group 0).");
  m.def(
      "group_context",
      [](py::handle context_obj, int64_t group, uint64_t k0, uint64_t k1) {
        if (group < 0) throw kvpool::InvalidArgument("group_context(): group=" + std::to_string(group) + " must be >= 0");
        return kvpool::group_context(as_uint64(context_obj, "group_context()", "context"), group,
                                     kvpool::HashKey{k0, k1});
      },
      py::arg("context"), py::arg("group"), py::arg("k0") = 0, py::arg("k1") = 0,
      "KV-cache group ``group``'s salt digest for a sequence whose salt digest is ``context`` (identity for group 0).");

  py::class_<BlockAllocator>(m, "BlockAllocator")
      .def(py::init([](int64_t num_blocks, int64_t block_size, bool enable_prefix_caching, uint64_t k0, uint64_t k1,
                       int64_t max_num_blocks) {
             py::gil_scoped_release release;
             return new BlockAllocator(num_blocks, block_size, enable_prefix_caching, kvpool::HashKey{k0, k1},
                                       max_num_blocks);
           }),
           py::arg("num_blocks"), py::arg("block_size"), py::arg("enable_prefix_caching"), py::arg("k0"), py::arg("k1"),
           py::arg("max_num_blocks") = -1)
      .def_property_readonly("num_blocks", &BlockAllocator::num_blocks)
      .def_property_readonly("max_num_blocks", &BlockAllocator::max_num_blocks,
                             "The capacity grow() may reach (ids below it; arrays sized for it once).")
      .def_property_readonly("free_top_blocks", &BlockAllocator::free_top_blocks,
                             "Free ids in a run at the top of the pool: the most shrink() can release now.")
      .def(
          "grow", [](BlockAllocator& a, py::handle n) { a.grow(as_int64(n, "grow()", "n")); }, py::arg("n"),
          kGrowDoc)
      .def(
          "shrink", [](BlockAllocator& a, py::handle n) { a.shrink(as_int64(n, "shrink()", "n")); }, py::arg("n"),
          kShrinkDoc)
      .def(
          "held_in_top", [](const BlockAllocator& a, py::handle n) { return a.held_in_top(as_int64(n, "held_in_top()", "n")); },
          py::arg("n"), "How many of the top ``n`` ids ``[num_blocks - n, num_blocks)`` are held (refcount > 0).")
      .def(
          "relocate_top",
          [](BlockAllocator& a, py::handle n_obj) {
            const int64_t n = as_int64(n_obj, "relocate_top()", "n");
            std::vector<int32_t> src(static_cast<size_t>(n > 0 && n <= a.max_num_blocks() ? n : 0));
            std::vector<int32_t> dst(src.size());
            const int64_t m = a.relocate_top(n, src.data(), dst.data());
            py::array_t<int64_t> s(static_cast<py::ssize_t>(m)), d(static_cast<py::ssize_t>(m));
            std::copy(src.begin(), src.begin() + m, s.mutable_data());
            std::copy(dst.begin(), dst.begin() + m, d.mutable_data());
            return std::make_tuple(s, d);
          },
          py::arg("n"), kRelocateTopDoc)
      .def_property_readonly("block_size", &BlockAllocator::block_size)
      .def_property_readonly("enable_prefix_caching", &BlockAllocator::prefix_caching)
      .def_property_readonly(
          "hash_key",
          [](const BlockAllocator& a) {
            const kvpool::HashKey key = a.hash_key();
            return (py::int_(key.k1).attr("__lshift__")(64)).attr("__or__")(py::int_(key.k0));
          },
          "The 128-bit prefix-cache hash key, an int (identical on every TP rank).")
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
            const bool plausible = n >= 0 && n <= a.max_num_blocks();  // constant: a concurrent grow() cannot outdate it
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
            std::vector<int32_t> ids = owned_ids(ids_obj, "free()");
            py::gil_scoped_release release;
            a.free(ids.data(), static_cast<int64_t>(ids.size()));
          },
          py::arg("ids"), kFreeDoc)
      .def(
          "incref",
          [](BlockAllocator& a, py::handle ids_obj) {
            std::vector<int32_t> ids = owned_ids(ids_obj, "incref()");
            py::gil_scoped_release release;
            a.incref(ids.data(), static_cast<int64_t>(ids.size()));
          },
          py::arg("ids"), kIncrefDoc)
      .def(
          "refcounts",
          [](const BlockAllocator& a, py::handle ids_obj) {
            std::vector<int32_t> ids = owned_ids(ids_obj, "refcounts()");
            py::array_t<int32_t> out(static_cast<py::ssize_t>(ids.size()));
            int32_t* dst = out.mutable_data();
            {
              py::gil_scoped_release release;
              a.refcounts(ids.data(), static_cast<int64_t>(ids.size()), dst);
            }
            return out;
          },
          py::arg("ids"), kRefcountsDoc)
      .def(
          "cache_blocks",
          [](BlockAllocator& a, py::handle ids_obj, py::handle hashes_obj) {
            std::vector<int32_t> ids = owned_ids(ids_obj, "cache_blocks()");
            std::vector<uint64_t> hashes = owned_hashes(hashes_obj, "cache_blocks()");
            py::gil_scoped_release release;
            a.cache_blocks(ids.data(), static_cast<int64_t>(ids.size()), hashes.data(),
                           static_cast<int64_t>(hashes.size()));
          },
          py::arg("ids"), py::arg("hashes"), kCacheBlocksDoc)
      .def(
          "match_prefix",
          [](BlockAllocator& a, py::handle hashes_obj) {
            std::vector<uint64_t> hashes = owned_hashes(hashes_obj, "match_prefix()");
            const int64_t k = static_cast<int64_t>(hashes.size());
            py::array_t<int32_t> out(static_cast<py::ssize_t>(k));
            int32_t* dst = out.mutable_data();
            int64_t hits;
            {
              py::gil_scoped_release release;
              hits = a.match_prefix(hashes.data(), k, dst);
            }
            // Shrink in place to the hits: we hold the only reference to `out`.
            if (hits < k) out.resize({static_cast<py::ssize_t>(hits)}, /*refcheck=*/false);
            return out;
          },
          py::arg("hashes"), kMatchPrefixDoc)
      .def(
          "allocate_with_prefix",
          [](BlockAllocator& a, py::handle n_obj, py::handle hashes_obj, py::handle tokens_obj, py::handle context_obj) {
            const char* fn = "allocate_with_prefix()";
            const int64_t n = as_int64(n_obj, fn, "n");
            std::vector<uint64_t> hashes = owned_hashes(hashes_obj, fn);
            std::vector<int32_t> tokens = owned_tokens(tokens_obj, fn);
            const uint64_t context = as_uint64(context_obj, fn, "context");
            const bool plausible = n >= 0 && n <= a.max_num_blocks();  // constant: a concurrent grow() cannot outdate it
            py::array_t<int32_t> out(static_cast<py::ssize_t>(plausible ? n : 0));
            int32_t* dst = out.mutable_data();
            int64_t hits;
            uint64_t chain;
            {
              py::gil_scoped_release release;
              hits = a.allocate_with_prefix(n, hashes.data(), static_cast<int64_t>(hashes.size()), tokens.data(),
                                            static_cast<int64_t>(tokens.size()), context, dst, &chain);
            }
            return std::make_tuple(out, hits, chain);
          },
          py::arg("n"), py::arg("hashes"), py::arg("token_ids"), py::arg("context") = 0, kAllocateWithPrefixDoc)
      .def(
          "cache_blocks_verified",
          [](BlockAllocator& a, py::handle ids_obj, py::handle hashes_obj, py::handle tokens_obj,
             py::handle context_obj, py::handle parent_obj) {
            const char* fn = "cache_blocks_verified()";
            std::vector<int32_t> ids = owned_ids(ids_obj, fn);
            std::vector<uint64_t> hashes = owned_hashes(hashes_obj, fn);
            std::vector<int32_t> tokens = owned_tokens(tokens_obj, fn);
            const uint64_t context = as_uint64(context_obj, fn, "context");
            const uint64_t parent = as_uint64(parent_obj, fn, "parent");
            py::gil_scoped_release release;
            return a.cache_blocks_verified(ids.data(), static_cast<int64_t>(ids.size()), hashes.data(),
                                           static_cast<int64_t>(hashes.size()), tokens.data(),
                                           static_cast<int64_t>(tokens.size()), context, parent);
          },
          py::arg("ids"), py::arg("hashes"), py::arg("token_ids"), py::arg("context") = 0,
          py::arg("parent") = 0, kCacheBlocksVerifiedDoc)
      .def(
          "probe_chain",
          [](const BlockAllocator& a, py::handle hashes_obj, py::handle tokens_obj, py::handle context_obj) {
            const char* fn = "probe_chain()";
            std::vector<uint64_t> hashes = owned_hashes(hashes_obj, fn);
            std::vector<int32_t> tokens = owned_tokens(tokens_obj, fn);
            const uint64_t context = as_uint64(context_obj, fn, "context");
            const auto k = static_cast<py::ssize_t>(hashes.size());
            py::array_t<int32_t> ids(k);
            py::array_t<uint64_t> stamps(k);
            int32_t* ids_out = ids.mutable_data();
            uint64_t* stamps_out = stamps.mutable_data();
            bool collided = false;
            int64_t h;
            {
              py::gil_scoped_release release;
              h = a.probe_chain(hashes.data(), k, tokens.data(), static_cast<int64_t>(tokens.size()), context, ids_out,
                                stamps_out, &collided);
            }
            ids.resize({static_cast<py::ssize_t>(h)}, /*refcheck=*/false);
            stamps.resize({static_cast<py::ssize_t>(h)}, /*refcheck=*/false);
            return std::make_tuple(ids, stamps, collided);
          },
          py::arg("hashes"), py::arg("token_ids"), py::arg("context") = 0, kProbeChainDoc)
      .def(
          "probe_anchored",
          [](const BlockAllocator& a, py::handle hashes_obj, py::handle tokens_obj, py::handle context_obj,
             py::handle parents_obj) {
            const char* fn = "probe_anchored()";
            std::vector<uint64_t> hashes = owned_hashes(hashes_obj, fn);
            std::vector<int32_t> tokens = owned_tokens(tokens_obj, fn);
            const uint64_t context = as_uint64(context_obj, fn, "context");
            std::vector<uint64_t> parents = owned<uint64_t>(parents_obj, fn, "parents", "InvalidArgumentError");
            const auto k = static_cast<int64_t>(hashes.size());
            std::vector<int32_t> ids(hashes.size());
            std::vector<uint64_t> stamps(hashes.size());
            bool collided = false;
            int64_t r;
            {
              py::gil_scoped_release release;
              r = a.probe_anchored(hashes.data(), k, tokens.data(), static_cast<int64_t>(tokens.size()), context,
                                   parents.data(), static_cast<int64_t>(parents.size()), ids.data(), stamps.data(),
                                   &collided);
            }
            const auto run = static_cast<py::ssize_t>(r);
            return std::make_tuple(py::array_t<int32_t>(run, ids.data() + (k - r)),
                                   py::array_t<uint64_t>(run, stamps.data() + (k - r)), collided);
          },
          py::arg("hashes"), py::arg("token_ids"), py::arg("context"), py::arg("parents"), kProbeAnchoredDoc)
      .def(
          "take_cached",
          [](BlockAllocator& a, py::handle ids_obj, py::handle stamps_obj, py::handle n_obj, py::handle query_obj,
             py::handle collisions_obj) -> py::object {
            const char* fn = "take_cached()";
            std::vector<int32_t> ids = owned_ids(ids_obj, fn);
            std::vector<uint64_t> stamps = owned<uint64_t>(stamps_obj, fn, "stamps", "InvalidArgumentError");
            const int64_t n = as_int64(n_obj, fn, "n");
            const int64_t query_blocks = as_int64(query_obj, fn, "query_blocks");
            const int64_t collisions = as_int64(collisions_obj, fn, "collisions");
            const bool plausible = n >= 0 && n <= a.max_num_blocks();  // constant: a concurrent grow() cannot outdate it
            py::array_t<int32_t> out(static_cast<py::ssize_t>(plausible ? n : 0));
            int32_t* dst = out.mutable_data();
            bool taken;
            {
              py::gil_scoped_release release;
              taken = a.take_cached(ids.data(), static_cast<int64_t>(ids.size()), stamps.data(),
                                    static_cast<int64_t>(stamps.size()), n, dst, query_blocks, collisions);
            }
            if (!taken) return py::none();
            return std::move(out);
          },
          py::arg("ids"), py::arg("stamps"), py::arg("n"), py::arg("query_blocks") = 0, py::arg("collisions") = 0,
          kTakeCachedDoc)
      .def(
          "cache_blocks_chained",
          [](BlockAllocator& a, py::handle ids_obj, py::handle hashes_obj, py::handle tokens_obj,
             py::handle context_obj, py::handle parent_obj) {
            const char* fn = "cache_blocks_chained()";
            std::vector<int32_t> ids = owned_ids(ids_obj, fn);
            std::vector<uint64_t> hashes = owned_hashes(hashes_obj, fn);
            std::vector<int32_t> tokens = owned_tokens(tokens_obj, fn);
            const uint64_t context = as_uint64(context_obj, fn, "context");
            const uint64_t parent = as_uint64(parent_obj, fn, "parent");
            std::vector<uint64_t> chains(ids.size());
            {
              py::gil_scoped_release release;
              a.cache_blocks_chained(ids.data(), static_cast<int64_t>(ids.size()), hashes.data(),
                                     static_cast<int64_t>(hashes.size()), tokens.data(),
                                     static_cast<int64_t>(tokens.size()), context, parent, chains.data());
            }
            return py::array_t<uint64_t>(static_cast<py::ssize_t>(chains.size()), chains.data());
          },
          py::arg("ids"), py::arg("hashes"), py::arg("token_ids"), py::arg("context") = 0, py::arg("parent") = 0,
          kCacheBlocksChainedDoc)
      .def(
          "cache_blocks_anchored",
          [](BlockAllocator& a, py::handle ids_obj, py::handle hashes_obj, py::handle tokens_obj,
             py::handle context_obj, py::handle parents_obj) {
            const char* fn = "cache_blocks_anchored()";
            std::vector<int32_t> ids = owned_ids(ids_obj, fn);
            std::vector<uint64_t> hashes = owned_hashes(hashes_obj, fn);
            std::vector<int32_t> tokens = owned_tokens(tokens_obj, fn);
            const uint64_t context = as_uint64(context_obj, fn, "context");
            std::vector<uint64_t> parents = owned<uint64_t>(parents_obj, fn, "parents", "InvalidArgumentError");
            py::gil_scoped_release release;
            a.cache_blocks_anchored(ids.data(), static_cast<int64_t>(ids.size()), hashes.data(),
                                    static_cast<int64_t>(hashes.size()), tokens.data(),
                                    static_cast<int64_t>(tokens.size()), context, parents.data(),
                                    static_cast<int64_t>(parents.size()));
          },
          py::arg("ids"), py::arg("hashes"), py::arg("token_ids"), py::arg("context"), py::arg("parents"),
          kCacheBlocksAnchoredDoc)
      .def("stats", [](const BlockAllocator& a) { return stats_dict(a.stats(), a); }, kStatsDoc)
      .def("check_invariants", &BlockAllocator::check_invariants, py::call_guard<py::gil_scoped_release>(),
           "Verify every internal invariant in O(num_blocks); raises AssertionError naming a broken one.");

  // SeqTable: the GIL stays held in every call (they take microseconds, and one table belongs to one
  // scheduler thread), so the caller's arrays cannot change while the core reads them.
  py::class_<SeqTable>(m, "SeqTable")
      .def(py::init([](BlockAllocator* allocator, int32_t max_seqs, int32_t max_blocks_per_seq, bool prefix_caching,
                       uint64_t hash_mask, py::handle windows_obj) {
             std::vector<int64_t> windows = owned<int64_t>(windows_obj, "SeqTable()", "group_windows",
                                                           "InvalidArgumentError");
             return new SeqTable(allocator, max_seqs, max_blocks_per_seq, prefix_caching, hash_mask, windows);
           }),
           py::arg("allocator"), py::arg("max_seqs"), py::arg("max_blocks_per_seq"), py::arg("prefix_caching"),
           py::arg("hash_mask") = ~uint64_t{0}, py::arg("group_windows") = py::make_tuple(0), py::keep_alive<1, 2>())
      .def_property_readonly("max_seqs", &SeqTable::max_seqs)
      .def_property_readonly("max_blocks_per_seq", &SeqTable::max_blocks_per_seq)
      .def_property_readonly("num_groups", &SeqTable::num_groups)
      .def_property_readonly("group_windows", [](const SeqTable& t) {
        const std::vector<int64_t>& w = t.group_windows();
        return py::array_t<int64_t>(static_cast<py::ssize_t>(w.size()), w.data());
      })
      .def("__len__", &SeqTable::size)
      .def("__contains__", &SeqTable::contains)
      .def("num_tokens", &SeqTable::num_tokens)
      .def("num_computed", &SeqTable::num_computed)
      .def(
          "blocks",
          [](const SeqTable& t, int64_t id, int32_t group) {  // group's block at each position, -1: released
            py::array_t<int32_t> out(static_cast<py::ssize_t>(t.num_positions(id)));
            t.group_blocks(id, group, out.mutable_data());
            return out;
          },
          py::arg("seq_id"), py::arg("group") = 0)
      .def("add", [](SeqTable& t, int64_t id, py::handle tokens_obj, int64_t n, uint64_t context) {
        py::array_t<int32_t> tokens = optional_array<int32_t>(tokens_obj, "add()", "prompt_tokens");
        if (!tokens_obj.is_none() && tokens.shape(0) != n) {
          throw kvpool::InvalidArgument("add(): got " + std::to_string(tokens.shape(0)) + " token ids for n=" +
                                        std::to_string(n));
        }
        return t.add(id, tokens_obj.is_none() ? nullptr : tokens.data(), n, context);
      })
      .def("append_batch", [](SeqTable& t, py::handle ids_obj, int64_t n, py::handle tokens_obj, bool check) {
        const char* fn = "append_batch()";
        py::array_t<int64_t> ids = user_seq_ids(ids_obj, fn, check);
        py::array_t<int32_t> tokens = optional_array<int32_t>(tokens_obj, fn, "token_ids");
        const int64_t b = ids.shape(0);
        // Size the output only for a request that can be valid; the core raises on the others first.
        const bool plausible = n >= 1 && n <= int64_t{t.max_blocks_per_seq()} * t.block_size();
        py::array_t<int32_t> slots(static_cast<py::ssize_t>(plausible ? t.num_groups() * b * n : 0));  // [G, b * n]
        const bool given = !tokens_obj.is_none();
        t.append_batch(ids.data(), b, n, given ? tokens.data() : nullptr, given ? tokens.shape(0) : -1,
                       slots.mutable_data());
        return slots;
      })
      .def("mark_computed", [](SeqTable& t, py::handle ids_obj, py::handle lens_obj, bool check) {
        py::array_t<int64_t> ids = user_seq_ids(ids_obj, "mark_computed()", check);
        py::array_t<int64_t> lens = optional_array<int64_t>(lens_obj, "mark_computed()", "num_computed");
        if (!lens_obj.is_none() && lens.shape(0) != ids.shape(0)) {
          throw kvpool::InvalidArgument("mark_computed(): got " + std::to_string(ids.shape(0)) + " sequences but " +
                                        std::to_string(lens.shape(0)) + " lengths; pass one per sequence");
        }
        t.mark_computed(ids.data(), ids.shape(0), lens_obj.is_none() ? nullptr : lens.data());
      })
      .def("fork", &SeqTable::fork)
      .def("free", &SeqTable::free_seq)
      .def("pending_copies", [](const SeqTable& t) {
        py::list pairs;
        for (const auto& p : t.pending_copies()) pairs.append(py::make_tuple(p.first, p.second));
        return pairs;
      })
      .def("pop_copies", [](SeqTable& t) {
        const auto n = static_cast<py::ssize_t>(t.pending_copies().size());
        py::array_t<int64_t> src(n), dst(n);
        t.pop_copies(src.mutable_data(), dst.mutable_data());
        return std::make_tuple(src, dst);
      })
      .def("relocate_top", [](SeqTable& t, int64_t n) {
        // sized by the capacity bound only when n is plausible; the core validates n first
        std::vector<int32_t> src(static_cast<size_t>(n > 0 && n <= t.max_pool_blocks() ? n : 0)), dst(src.size());
        const int64_t m = t.relocate_top(n, src.data(), dst.data());
        py::array_t<int64_t> s(static_cast<py::ssize_t>(m)), d(static_cast<py::ssize_t>(m));
        std::copy(src.begin(), src.begin() + m, s.mutable_data());
        std::copy(dst.begin(), dst.begin() + m, d.mutable_data());
        return std::make_tuple(s, d);
      })
      .def("batch", [](SeqTable& t, py::handle ids_obj, py::handle new_obj, int64_t pad_slots_to, bool decode,
                       bool check) {
        const char* fn = decode ? "decode_batch()" : "batch()";
        py::array_t<int64_t> ids = user_seq_ids(ids_obj, fn, check);
        py::array_t<int64_t> fresh = optional_array<int64_t>(new_obj, fn, "num_new_tokens");
        const int64_t b = ids.shape(0);
        if (!new_obj.is_none() && fresh.shape(0) != b) {
          throw kvpool::InvalidArgument(std::string(fn) + ": num_new_tokens has " + std::to_string(fresh.shape(0)) +
                                        " counts for " + std::to_string(b) + " sequences; pass one per sequence");
        }
        const int64_t* counts = new_obj.is_none() ? nullptr : fresh.data();
        const kvpool::BatchShape shape = t.plan_batch(ids.data(), b, counts, pad_slots_to, decode);
        py::array_t<int32_t> out(static_cast<py::ssize_t>(shape.offset[7]));
        t.fill_batch(ids.data(), counts, shape, out.mutable_data());
        py::tuple offsets(8);
        for (int k = 0; k < 8; ++k) offsets[k] = shape.offset[k];
        return py::make_tuple(out, shape.max_blocks, shape.new_tokens, offsets);
      })
      .def("decode_step", [](SeqTable& t, py::handle ids_obj, py::handle tokens_obj, int64_t pad_to, bool check) {
        const char* fn = "decode_step()";
        py::array_t<int64_t> ids = user_seq_ids(ids_obj, fn, check);
        py::array_t<int32_t> tokens = optional_array<int32_t>(tokens_obj, fn, "token_ids");
        const bool given = !tokens_obj.is_none();
        return t.decode_step(ids.data(), ids.shape(0), given ? tokens.data() : nullptr, given ? tokens.shape(0) : -1,
                             pad_to);
      })
      .def("step_table", [](py::object self) {  // a view of the fixed buffer [G, max_seqs, W]; it keeps the table alive
        const SeqTable& t = self.cast<const SeqTable&>();
        return py::array_t<int32_t>({static_cast<py::ssize_t>(t.num_groups()), static_cast<py::ssize_t>(t.max_seqs()),
                                     static_cast<py::ssize_t>(t.max_blocks_per_seq())},
                                    t.step_table(), self);
      })
      .def("step_io", [](py::object self) {  // lens [rows] | slots [G][rows] | qsl [rows + 1], packed
        const SeqTable& t = self.cast<const SeqTable&>();
        return py::array_t<int32_t>(static_cast<py::ssize_t>(t.step_io_size()), t.step_io(), self);
      })
      .def("mark_step_computed", &SeqTable::mark_step_computed)
      .def("attach_host_tier", &SeqTable::attach_host_tier, py::keep_alive<1, 2>())
      .def("pop_transfers", [](SeqTable& t) {  // (batch, reload_host, reload_gpu, offload_gpu, offload_host)
        HostTier* h = t.host_tier();
        if (h == nullptr) throw kvpool::InvalidArgument("pop_transfers(): these tables have no host tier");
        py::array_t<int32_t> rh(h->pending_reloads()), rg(h->pending_reloads());
        py::array_t<int32_t> og(h->pending_offloads()), oh(h->pending_offloads());
        const int64_t batch = t.pop_transfers(rh.mutable_data(), rg.mutable_data(), og.mutable_data(), oh.mutable_data());
        return py::make_tuple(batch, rh, rg, og, oh);
      })
      .def("step_deltas", [](const SeqTable& t) {  // copies: (flat index, value) of the changed entries
        const auto& idx = t.step_delta_index();
        const auto& val = t.step_delta_value();
        return std::make_tuple(py::array_t<int32_t>(static_cast<py::ssize_t>(idx.size()), idx.data()),
                               py::array_t<int32_t>(static_cast<py::ssize_t>(val.size()), val.data()));
      });
  m.attr("SeqTable").attr("MAX_GROUPS") = py::int_(SeqTable::kMaxGroups);

  bind_virtual_range(m);
  bind_host_tier(m);
}
