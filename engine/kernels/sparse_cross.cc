// Sparse outer-product accumulation for engine.correlation (TopK codes), an XLA FFI CPU
// handler. Built and registered by engine/kernels/__init__.py.
//
//   cross[la[r, j], lb[r, l]] += wa[r, j] * vb[r, l]   for every row r, slot j, slot l
//
// with entries whose local id is out of [0, fa) / [0, fb) dropped (the XLA path maps invalid
// and out-of-block ids to fa / fb and scatters with mode="drop"). `cross` is aliased to the
// output (updated in place); leading axes of size 1 are allowed.
//
// Bit-identical to XLA's scatter-add of the same products: XLA applies the updates one by
// one in (row, j, l) order, so every cell receives its products in increasing row order (and
// (j, l) order within a row); this kernel keeps that order per cell. The (row, j) pairs are
// counting-sorted (stably) by A id, so each row of `cross` is updated contiguously (it stays
// in cache); the A-id range is split between threads with no overlap, so the result does not
// depend on the number of threads. The product w * v is rounded before the add (compile with
// -ffp-contract=off: no fused multiply-add, as in XLA's scatter combiner).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRowAhead = 16;   // entries ahead whose B row (ids, values) is prefetched
constexpr int64_t kCellAhead = 4;   // entries ahead whose target cells are prefetched

// Entries [begin, end) of the sorted order: A ids a0.. with bucket bounds `start`.
// srow / sw: row and weighted A value of each sorted entry.
void UpdateRange(float* cross, int64_t fb, const int64_t* start, int64_t a0, int64_t a1,
                 const int32_t* srow, const float* sw, int64_t kb, const int32_t* lb,
                 const float* vb) {
  const int64_t begin = start[a0], end = start[a1];
  int64_t a = a0;
  while (a < a1 && start[a + 1] <= begin) ++a;
  for (int64_t p = begin; p < end; ++p) {
    while (start[a + 1] <= p) ++a;  // the bucket (A id) of entry p
    float* row = cross + a * fb;
    if (p + kRowAhead < end) {
      const int64_t r = srow[p + kRowAhead];
      const char* ids = reinterpret_cast<const char*>(lb + r * kb);
      const char* vals = reinterpret_cast<const char*>(vb + r * kb);
      for (int64_t off = 0; off < kb * 4; off += 64) {
        __builtin_prefetch(ids + off, 0, 3);
        __builtin_prefetch(vals + off, 0, 3);
      }
    }
    if (p + kCellAhead < end) {
      // Target cells of a later entry (in this row when it has the same A id; a wrong
      // guess at a bucket boundary only wastes a prefetch).
      const int32_t* pb = lb + static_cast<int64_t>(srow[p + kCellAhead]) * kb;
      for (int64_t l = 0; l < kb; ++l) {
        const uint32_t b = static_cast<uint32_t>(pb[l]);
        if (b < static_cast<uint64_t>(fb)) __builtin_prefetch(row + b, 1, 3);
      }
    }
    const int64_t r = srow[p];
    const float w = sw[p];
    const int32_t* br = lb + r * kb;
    const float* vr = vb + r * kb;
    for (int64_t l = 0; l < kb; ++l) {
      const uint32_t b = static_cast<uint32_t>(br[l]);
      if (b < static_cast<uint64_t>(fb)) {
        const float prod = w * vr[l];
        row[b] = row[b] + prod;
      }
    }
  }
}

ffi::Error SparseCrossImpl(ffi::Buffer<ffi::F32> cross_in, ffi::Buffer<ffi::S32> la,
                           ffi::Buffer<ffi::F32> wa, ffi::Buffer<ffi::S32> lb,
                           ffi::Buffer<ffi::F32> vb, ffi::ResultBuffer<ffi::F32> cross_out,
                           int64_t threads) {
  auto cdims = cross_in.dimensions();
  auto adims = la.dimensions();
  auto bdims = lb.dimensions();
  if (cdims.size() < 2 || adims.size() != 2 || bdims.size() != 2 ||
      wa.dimensions().size() != 2 || vb.dimensions().size() != 2) {
    return ffi::Error::InvalidArgument("sae_sparse_cross: expected 2-D operands");
  }
  // cross may carry leading axes of size 1 (a per-device state [1, fa, fb] is passed as is:
  // a reshape between the donated parameter and this aliased call makes XLA copy the state).
  const int64_t fb = cdims[cdims.size() - 1];
  int64_t fa = 1;
  for (size_t i = 0; i + 1 < cdims.size(); ++i) fa *= cdims[i];
  const int64_t rows = adims[0], ka = adims[1], kb = bdims[1];
  if (bdims[0] != rows || wa.dimensions()[0] != rows || wa.dimensions()[1] != ka ||
      vb.dimensions()[0] != rows || vb.dimensions()[1] != kb) {
    return ffi::Error::InvalidArgument("sae_sparse_cross: operand shapes disagree");
  }
  float* cross = cross_out->typed_data();
  if (cross != cross_in.typed_data()) {  // not aliased (should not happen): copy first
    std::memcpy(cross, cross_in.typed_data(), sizeof(float) * fa * fb);
  }
  const int32_t* pla = la.typed_data();
  const float* pwa = wa.typed_data();
  const int32_t* plb = lb.typed_data();
  const float* pvb = vb.typed_data();
  const int64_t n = rows * ka;
  if (n >= (int64_t{1} << 31)) {
    return ffi::Error::InvalidArgument("sae_sparse_cross: more than 2^31 (row, slot) entries");
  }
  if (n == 0 || kb == 0 || fa == 0 || fb == 0) return ffi::Error::Success();

  // Stable counting sort of the valid (row, j) entries by A id.
  std::vector<int64_t> start(fa + 1, 0);
  for (int64_t e = 0; e < n; ++e) {
    const uint32_t a = static_cast<uint32_t>(pla[e]);
    if (a < static_cast<uint64_t>(fa)) ++start[a + 1];
  }
  for (int64_t a = 0; a < fa; ++a) start[a + 1] += start[a];
  const int64_t valid = start[fa];
  std::vector<int32_t> srow(std::max<int64_t>(valid, 1));
  std::vector<float> sw(std::max<int64_t>(valid, 1));
  {
    std::vector<int64_t> pos(start.begin(), start.end() - 1);
    for (int64_t e = 0; e < n; ++e) {
      const uint32_t a = static_cast<uint32_t>(pla[e]);
      if (a < static_cast<uint64_t>(fa)) {
        const int64_t q = pos[a]++;
        srow[q] = static_cast<int32_t>(e / ka);
        sw[q] = pwa[e];
      }
    }
  }

  // Split the A ids into `threads` contiguous ranges of about equal work.
  int64_t t = std::max<int64_t>(1, threads);
  if (valid * kb < (int64_t{1} << 18)) t = 1;  // too little work to pay for threads
  std::vector<int64_t> cut(t + 1, fa);
  cut[0] = 0;
  for (int64_t i = 1; i < t; ++i) {
    // First A id whose entries start at or after an equal share of the entries.
    const int64_t target = valid * i / t;
    cut[i] = std::lower_bound(start.begin(), start.end(), target) - start.begin();
    cut[i] = std::max(std::min(cut[i], fa), cut[i - 1]);
  }
  const int64_t* st = start.data();
  if (t == 1) {
    UpdateRange(cross, fb, st, 0, fa, srow.data(), sw.data(), kb, plb, pvb);
    return ffi::Error::Success();
  }
  std::vector<std::thread> pool;
  pool.reserve(t - 1);
  for (int64_t i = 1; i < t; ++i) {
    pool.emplace_back(UpdateRange, cross, fb, st, cut[i], cut[i + 1], srow.data(), sw.data(),
                      kb, plb, pvb);
  }
  UpdateRange(cross, fb, st, cut[0], cut[1], srow.data(), sw.data(), kb, plb, pvb);
  for (auto& th : pool) th.join();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaeSparseCross, SparseCrossImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cross (aliased)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // la [rows, ka]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // wa [rows, ka]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // lb [rows, kb]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // vb [rows, kb]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // cross
                                  .Attr<int64_t>("threads"));
