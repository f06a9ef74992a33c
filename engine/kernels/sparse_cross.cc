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

constexpr int64_t kPrefetchAhead = 4;  // entries ahead whose target cells are prefetched

void UpdateRange(float* cross, int64_t fb, const int32_t* order, int64_t begin, int64_t end,
                 int64_t ka, int64_t kb, const int32_t* la, const float* wa, const int32_t* lb,
                 const float* vb) {
  for (int64_t e = begin; e < end; ++e) {
    if (e + kPrefetchAhead < end) {
      const int64_t pe = order[e + kPrefetchAhead];
      const int64_t pr = pe / ka;
      float* prow = cross + static_cast<int64_t>(la[pe]) * fb;
      const int32_t* pb = lb + pr * kb;
      for (int64_t l = 0; l < kb; ++l) {
        const uint32_t b = static_cast<uint32_t>(pb[l]);
        if (b < static_cast<uint64_t>(fb)) __builtin_prefetch(prow + b, 1, 3);
      }
    }
    const int64_t entry = order[e];
    const int64_t r = entry / ka;
    const float w = wa[entry];
    float* row = cross + static_cast<int64_t>(la[entry]) * fb;
    const int32_t* br = lb + r * kb;
    const float* vr = vb + r * kb;
    for (int64_t l = 0; l < kb; ++l) {
      const uint32_t b = static_cast<uint32_t>(br[l]);
      if (b < static_cast<uint64_t>(fb)) {
        const float p = w * vr[l];
        row[b] = row[b] + p;
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
  std::vector<int32_t> order(std::max<int64_t>(valid, 1));
  {
    std::vector<int64_t> pos(start.begin(), start.end() - 1);
    for (int64_t e = 0; e < n; ++e) {
      const uint32_t a = static_cast<uint32_t>(pla[e]);
      if (a < static_cast<uint64_t>(fa)) order[pos[a]++] = static_cast<int32_t>(e);
    }
  }

  // Split the A ids into `threads` contiguous ranges of about equal work.
  int64_t t = std::max<int64_t>(1, threads);
  if (valid * kb < (int64_t{1} << 18)) t = 1;  // too little work to pay for threads
  std::vector<int64_t> cut(t + 1, valid);
  cut[0] = 0;
  for (int64_t i = 1; i < t; ++i) {
    const int64_t target = valid * i / t;
    // First A id whose entries start at or after the target: cut on an A-id boundary.
    const int64_t a = std::lower_bound(start.begin(), start.end(), target) - start.begin();
    cut[i] = start[std::min<int64_t>(a, fa)];
  }
  for (int64_t i = 1; i <= t; ++i) cut[i] = std::max(cut[i], cut[i - 1]);
  if (t == 1) {
    UpdateRange(cross, fb, order.data(), 0, valid, ka, kb, pla, pwa, plb, pvb);
    return ffi::Error::Success();
  }
  std::vector<std::thread> pool;
  pool.reserve(t - 1);
  for (int64_t i = 1; i < t; ++i) {
    pool.emplace_back(UpdateRange, cross, fb, order.data(), cut[i], cut[i + 1], ka, kb, pla,
                      pwa, plb, pvb);
  }
  UpdateRange(cross, fb, order.data(), cut[0], cut[1], ka, kb, pla, pwa, plb, pvb);
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
