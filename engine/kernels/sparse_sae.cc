// Sparse TopK SAE primitives for engine.sparse_ops, XLA FFI CPU handlers. Built and
// registered by engine/kernels/__init__.py (library "sparse_sae").
//
//   SaeTopK          x [.., R, n]                  -> values [.., R, k], indices s32 [.., R, k]
//   SaeGatherDot     table [n, d], vecs [R, d], idx [R, k]  -> out [R, k]
//                      out[r, j] = table[idx[r, j]] . vecs[r]
//   SaeGatherCombine table [n, d], coef [R, k], idx [R, k]  -> out [R, d]
//                      out[r] = sum_j coef[r, j] * table[idx[r, j]]
//   SaeScatterOuter  coef [R, k], vecs [R, d], idx [R, k]   -> out [n, d]   (n: result shape)
//                      out[f] = sum_{(r, j): idx[r, j] = f} coef[r, j] * vecs[r]
//
// All data f32, indices s32, attribute `threads` (threads of one call; small calls use one).
//
// Batching (vmap_method="expand_dims"): the three gather / scatter handlers accept leading
// batch axes in front of the 2-D shapes above, the same number on every operand and the
// result; an operand axis of size 1 is broadcast (an unbatched table under vmap is not
// copied). TopK folds every leading axis into the rows.
//
// TopK is bit-identical to XLA's CPU TopK (and so to jax.lax.top_k): the order is XLA's
// total order on the float bits (-0.0 < +0.0; a NaN with the sign bit clear above +inf, one
// with it set below -inf; such NaNs are returned like any value, nothing crashes), ties
// broken by the lower index first. Per row a sorted buffer of the k best keys is kept; once
// it is full an element whose key is <= the k-th key is skipped (a later index loses a tie),
// otherwise it is inserted. For rows of >= 32 k elements a first vectorisable pass takes the
// maximum key of each block of 16 elements; a key reached by k block maxima bounds the k-th
// largest key from below, so the buffer only sees the few elements of the blocks whose
// maximum reaches it. The result does not depend on the bound chosen (nor on the threads).
//
// GatherDot sums each dot product in 32 interleaved partial sums (not XLA's order: equal to
// float32 rounding). GatherCombine adds the k slots in slot order, as the XLA scan does,
// 32 columns at a time held in registers (GCC vector extensions).
// ScatterOuter counting-sorts the (r, j) entries stably by id in (slot, row) order -- the
// order in which the XLA path (a scan over slots of row-ordered scatter-adds) applies them --
// and splits the id range between threads with no overlap, so its result does not depend on
// the number of threads. Compiled with -ffp-contract=off (no fused multiply-add).
//
// Indices outside [0, n): the gathers give NaN for that slot (as jnp.take's default "fill"),
// the scatter drops the entry.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <thread>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// The hot loops are compiled twice, for AVX2 and for the baseline, and chosen at load time
// (GCC function multiversioning). Vector width does not change any result: the dot products
// use a fixed 32-way split, the other loops are element-wise or integer.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SAE_HOT __attribute__((target_clones("avx2", "default")))
#else
#define SAE_HOT
#endif

constexpr int64_t kMinWorkPerThread = int64_t{1} << 17;  // multiply-adds (or elements)

// Number of threads for `work` units of work: 1 below two threads' worth.
int64_t UseThreads(int64_t threads, int64_t work, int64_t parts) {
  int64_t t = std::max<int64_t>(1, threads);
  t = std::min<int64_t>(t, std::max<int64_t>(1, work / kMinWorkPerThread));
  return std::max<int64_t>(1, std::min<int64_t>(t, parts));
}

// Runs fn(begin, end) over [0, n) split into `t` contiguous ranges (the caller runs the first).
template <typename Fn>
void ParallelFor(int64_t t, int64_t n, Fn fn) {
  if (t <= 1 || n <= 1) {
    fn(int64_t{0}, n);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(t - 1);
  for (int64_t i = 1; i < t; ++i) {
    pool.emplace_back([=] { fn(n * i / t, n * (i + 1) / t); });
  }
  fn(int64_t{0}, n / t);
  for (auto& th : pool) th.join();
}

// -- batching --------------------------------------------------------------------------------

// Leading (batch) axes of the result and the offset of each batch element in an operand of
// inner size `inner` whose leading axes are `dims` (size-1 axes broadcast).
struct Batching {
  std::vector<int64_t> lead;  // the result's leading axes
  int64_t count = 1;
};

bool LeadingOffsets(const Batching& b, ffi::Span<const int64_t> dims, size_t base_rank,
                    int64_t inner, std::vector<int64_t>* offsets) {
  if (dims.size() != b.lead.size() + base_rank) return false;
  const size_t L = b.lead.size();
  std::vector<int64_t> stride(L, 0);
  int64_t s = inner;
  for (size_t a = L; a-- > 0;) {
    if (dims[a] == b.lead[a]) {
      stride[a] = b.lead[a] == 1 ? 0 : s;
    } else if (dims[a] == 1) {
      stride[a] = 0;
    } else {
      return false;
    }
    s *= dims[a];
  }
  offsets->assign(b.count, 0);
  for (int64_t i = 0; i < b.count; ++i) {
    int64_t rem = i, off = 0;
    for (size_t a = L; a-- > 0;) {
      off += (rem % b.lead[a]) * stride[a];
      rem /= b.lead[a];
    }
    (*offsets)[i] = off;
  }
  return true;
}

Batching ResultBatching(ffi::Span<const int64_t> dims, size_t base_rank) {
  Batching b;
  for (size_t a = 0; a + base_rank < dims.size(); ++a) {
    b.lead.push_back(dims[a]);
    b.count *= dims[a];
  }
  return b;
}

// -- TopK ------------------------------------------------------------------------------------

// XLA's CPU TopK key: the float bits as a signed integer, negative floats reflected, so that
// integer order is the total order of floats (-0.0 < +0.0).
inline int32_t Key(float v) {
  int32_t b;
  std::memcpy(&b, &v, sizeof(b));
  return b ^ ((b >> 31) & 0x7fffffff);
}

// Inserts (key, i) into the sorted buffer of `cnt` entries (capacity k); equal keys keep the
// earlier index first. Returns the new count.
inline int64_t Insert(int32_t* keys, int32_t* ids, int64_t cnt, int64_t k, int32_t key,
                      int32_t i) {
  int64_t p = cnt < k ? cnt++ : k - 1;
  while (p > 0 && keys[p - 1] < key) {
    keys[p] = keys[p - 1];
    ids[p] = ids[p - 1];
    --p;
  }
  keys[p] = key;
  ids[p] = i;
  return cnt;
}

// Plain scan: the sorted buffer over the whole row (rows too short for the block pass).
void TopKScan(const float* row, int64_t n, int64_t k, int32_t* keys, int32_t* ids) {
  int64_t cnt = 0, i = 0;
  for (; i < n && cnt < k; ++i) cnt = Insert(keys, ids, cnt, k, Key(row[i]), i);
  int32_t thr = keys[k - 1];
  for (; i < n; ++i) {
    const int32_t key = Key(row[i]);
    if (key > thr) {
      Insert(keys, ids, k, k, key, static_cast<int32_t>(i));
      thr = keys[k - 1];
    }
  }
}

constexpr int64_t kBlock = 16;

// Bit u set when Key(p[u]) >= lower, u < 16.
inline uint32_t ReachMask(const float* p, int32_t lower) {
#if defined(__SSE2__)
  const __m128i lo = _mm_set1_epi32(lower);
  const __m128i mag = _mm_set1_epi32(0x7fffffff);
  uint32_t mask = 0;
  for (int q = 0; q < 4; ++q) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 4 * q));
    const __m128i key = _mm_xor_si128(b, _mm_and_si128(_mm_srai_epi32(b, 31), mag));
    const __m128i below = _mm_cmpgt_epi32(lo, key);  // lower > key
    mask |= static_cast<uint32_t>(_mm_movemask_ps(_mm_castsi128_ps(below))) << (4 * q);
  }
  return ~mask & 0xffffu;
#else
  uint32_t mask = 0;
  for (int u = 0; u < 16; ++u) mask |= static_cast<uint32_t>(Key(p[u]) >= lower) << u;
  return mask;
#endif
}

// Block pass: the k-th largest of the blocks' maximum keys is a lower bound T of the row's
// k-th largest key (the k largest block maxima are k distinct elements >= it), so only the
// blocks whose maximum is >= T can hold one of the top k; the sorted buffer runs over their
// elements with key >= T, in index order, with the same tie rule as the plain scan.
void TopKBlocks(const float* row, int64_t n, int64_t k, int32_t* keys, int32_t* ids,
                int32_t* bmax, int32_t* scratch, int32_t* guess) {
  const int64_t nb = (n + kBlock - 1) / kBlock;
  const int64_t full = n / kBlock;
  for (int64_t b = 0; b < full; ++b) {
    const float* p = row + b * kBlock;
    int32_t m = std::numeric_limits<int32_t>::min();
    for (int64_t u = 0; u < kBlock; ++u) m = std::max(m, Key(p[u]));
    bmax[b] = m;
  }
  if (full < nb) {
    int32_t m = std::numeric_limits<int32_t>::min();
    for (int64_t i = full * kBlock; i < n; ++i) m = std::max(m, Key(row[i]));
    bmax[full] = m;
  }
  // A lower bound: any key reached by >= k block maxima (k distinct elements reach it). The
  // previous row's bound is tried first (rows of one batch look alike): kept while between
  // k and 2k blocks reach it; otherwise the (5k/4)-th largest block maximum (a selection).
  int32_t lower = *guess;
  int64_t reach = 0;
  for (int64_t b = 0; b < nb; ++b) reach += bmax[b] >= lower;
  if (reach < k || reach > 2 * k) {
    const int64_t q = std::min(nb, k + k / 4) - 1;
    std::copy(bmax, bmax + nb, scratch);
    std::nth_element(scratch, scratch + q, scratch + nb, std::greater<int32_t>());
    lower = scratch[q];
    *guess = lower;
  }
  // Blocks that reach it, then their elements that reach it (branch-free compaction).
  int32_t* blocks = scratch;
  int64_t nc = 0;
  for (int64_t b = 0; b < nb; ++b) {
    blocks[nc] = static_cast<int32_t>(b);
    nc += bmax[b] >= lower;
  }
  int32_t* cand = scratch + nb;
  int64_t m = 0;
  for (int64_t q = 0; q < nc; ++q) {
    const int64_t b = blocks[q];
    const int64_t begin = b * kBlock;
    if (begin + kBlock <= n) {
      const uint32_t mask = ReachMask(row + begin, lower);
      for (uint32_t bits = mask; bits != 0; bits &= bits - 1) {
        cand[m++] = static_cast<int32_t>(begin + __builtin_ctz(bits));
      }
    } else {
      for (int64_t i = begin; i < n; ++i) {
        cand[m] = static_cast<int32_t>(i);
        m += Key(row[i]) >= lower;
      }
    }
  }
  // The sorted buffer over the candidates (in index order; m >= k).
  int64_t cnt = 0;
  int32_t thr = std::numeric_limits<int32_t>::min();
  for (int64_t q = 0; q < m; ++q) {
    const int32_t i = cand[q];
    const int32_t key = Key(row[i]);
    if (cnt < k) {
      cnt = Insert(keys, ids, cnt, k, key, i);
      if (cnt == k) thr = keys[k - 1];
    } else if (key > thr) {
      Insert(keys, ids, k, k, key, i);
      thr = keys[k - 1];
    }
  }
}

SAE_HOT void TopKRows(const float* x, int64_t n, int64_t k, float* ov, int32_t* oi, int64_t r0,
              int64_t r1) {
  const int64_t nb = (n + kBlock - 1) / kBlock;
  const bool blocks = nb >= 2 * k;
  // scratch: a copy of the block maxima / the candidate blocks, then the candidates.
  std::vector<int32_t> keys(k), bmax(blocks ? nb : 0), scratch(blocks ? nb + n : 0);
  int32_t guess = std::numeric_limits<int32_t>::max();
  for (int64_t r = r0; r < r1; ++r) {
    const float* row = x + r * n;
    int32_t* ids = oi + r * k;
    if (blocks) {
      TopKBlocks(row, n, k, keys.data(), ids, bmax.data(), scratch.data(), &guess);
    } else {
      TopKScan(row, n, k, keys.data(), ids);
    }
    float* vals = ov + r * k;
    for (int64_t j = 0; j < k; ++j) vals[j] = row[ids[j]];
  }
}

ffi::Error TopKImpl(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> values,
                    ffi::ResultBuffer<ffi::S32> indices, int64_t threads) {
  auto dims = x.dimensions();
  auto vdims = values->dimensions();
  if (dims.size() < 1 || vdims.size() != dims.size() ||
      indices->dimensions().size() != dims.size()) {
    return ffi::Error::InvalidArgument("sae_topk: operand and result ranks disagree");
  }
  const int64_t n = dims[dims.size() - 1], k = vdims[vdims.size() - 1];
  int64_t rows = 1;
  for (size_t a = 0; a + 1 < dims.size(); ++a) {
    if (vdims[a] != dims[a] || indices->dimensions()[a] != dims[a]) {
      return ffi::Error::InvalidArgument("sae_topk: leading axes disagree");
    }
    rows *= dims[a];
  }
  if (indices->dimensions()[dims.size() - 1] != k || k < 0 || k > n) {
    return ffi::Error::InvalidArgument("sae_topk: need 0 <= k <= n");
  }
  if (n >= (int64_t{1} << 31)) return ffi::Error::InvalidArgument("sae_topk: row too long");
  if (rows == 0 || k == 0) return ffi::Error::Success();
  const float* px = x.typed_data();
  float* pv = values->typed_data();
  int32_t* pi = indices->typed_data();
  const int64_t t = UseThreads(threads, rows * n, rows);
  ParallelFor(t, rows, [&](int64_t r0, int64_t r1) { TopKRows(px, n, k, pv, pi, r0, r1); });
  return ffi::Error::Success();
}

// -- gathers ---------------------------------------------------------------------------------

// 8 floats (GCC vector extension: one AVX register, or two SSE ones; the same lanes and
// results either way).
typedef float V8 __attribute__((vector_size(32)));

#define SAE_LOAD8(v, p) std::memcpy(&(v), (p), sizeof(V8))

// a . b in 32 interleaved partial sums (4 x 8 lanes), reduced in a fixed order.
inline float Dot(const float* a, const float* b, int64_t d) {
  V8 s0 = {}, s1 = {}, s2 = {}, s3 = {};
  int64_t i = 0;
  for (; i + 32 <= d; i += 32) {
    V8 x0, x1, x2, x3, y0, y1, y2, y3;
    SAE_LOAD8(x0, a + i);
    SAE_LOAD8(x1, a + i + 8);
    SAE_LOAD8(x2, a + i + 16);
    SAE_LOAD8(x3, a + i + 24);
    SAE_LOAD8(y0, b + i);
    SAE_LOAD8(y1, b + i + 8);
    SAE_LOAD8(y2, b + i + 16);
    SAE_LOAD8(y3, b + i + 24);
    s0 = s0 + x0 * y0;
    s1 = s1 + x1 * y1;
    s2 = s2 + x2 * y2;
    s3 = s3 + x3 * y3;
  }
  for (; i + 8 <= d; i += 8) {
    V8 x, y;
    SAE_LOAD8(x, a + i);
    SAE_LOAD8(y, b + i);
    s0 = s0 + x * y;
  }
  const V8 t = (s0 + s1) + (s2 + s3);
  float s = ((t[0] + t[4]) + (t[1] + t[5])) + ((t[2] + t[6]) + (t[3] + t[7]));
  for (; i < d; ++i) s = s + a[i] * b[i];
  return s;
}

SAE_HOT void DotRows(const float* pt, const float* pv, const int32_t* pi, float* po, int64_t n,
                     int64_t d, int64_t k, int64_t r0, int64_t r1) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t r = r0; r < r1; ++r) {
    const float* v = pv + r * d;
    for (int64_t j = 0; j < k; ++j) {
      const uint32_t f = static_cast<uint32_t>(pi[r * k + j]);
      po[r * k + j] = f < static_cast<uint64_t>(n) ? Dot(pt + f * d, v, d) : nan;
    }
  }
}

// o[0, d) = sum_q c[q] * rows[q][0, d), added in q order (each element ((0 + t0) + t1) ...,
// as the XLA slot scan), 32 columns at a time so the partial sums stay in registers.
inline void Accumulate(float* o, int64_t d, const float* c, const float* const* rows,
                       int64_t m) {
  int64_t i0 = 0;
  for (; i0 + 32 <= d; i0 += 32) {
    V8 a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (int64_t q = 0; q < m; ++q) {
      const float cq = c[q];
      const float* row = rows[q] + i0;
      V8 x0;
      SAE_LOAD8(x0, row);
      a0 = a0 + cq * x0;
      V8 x1;
      SAE_LOAD8(x1, row + 8);
      a1 = a1 + cq * x1;
      V8 x2;
      SAE_LOAD8(x2, row + 16);
      a2 = a2 + cq * x2;
      V8 x3;
      SAE_LOAD8(x3, row + 24);
      a3 = a3 + cq * x3;
    }
    std::memcpy(o + i0, &a0, sizeof(V8));
    std::memcpy(o + i0 + 8, &a1, sizeof(V8));
    std::memcpy(o + i0 + 16, &a2, sizeof(V8));
    std::memcpy(o + i0 + 24, &a3, sizeof(V8));
  }
  if (i0 < d) {
    std::fill(o + i0, o + d, 0.f);
    for (int64_t q = 0; q < m; ++q) {
      const float cq = c[q];
      const float* row = rows[q];
      for (int64_t i = i0; i < d; ++i) o[i] = o[i] + cq * row[i];
    }
  }
}

SAE_HOT void CombineRows(const float* pt, const float* pc, const int32_t* pi, float* po,
                         int64_t n, int64_t d, int64_t k, int64_t r0, int64_t r1) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<const float*> rows(k);
  for (int64_t r = r0; r < r1; ++r) {
    float* o = po + r * d;
    bool bad = false;
    for (int64_t j = 0; j < k; ++j) {
      const uint32_t f = static_cast<uint32_t>(pi[r * k + j]);
      bad |= f >= static_cast<uint64_t>(n);
      rows[j] = pt + (f < static_cast<uint64_t>(n) ? f : 0) * d;
    }
    if (bad) {
      std::fill(o, o + d, nan);
    } else {
      Accumulate(o, d, pc + r * k, rows.data(), k);
    }
  }
}

// Rows [f0, f1) of the scatter: entries st[f]..st[f+1] (row sr, coefficient sw) of each id.
SAE_HOT void ScatterIds(const int64_t* st, const int32_t* sr, const float* sw, const float* pv,
                        float* po, int64_t d, int64_t f0, int64_t f1) {
  std::vector<const float*> rows;
  for (int64_t f = f0; f < f1; ++f) {
    const int64_t m = st[f + 1] - st[f];
    rows.resize(std::max<int64_t>(m, 1));
    for (int64_t q = 0; q < m; ++q) rows[q] = pv + static_cast<int64_t>(sr[st[f] + q]) * d;
    Accumulate(po + f * d, d, sw + st[f], rows.data(), m);
  }
}

// Shapes of a batched gather / scatter call: the table's n rows of width d, R rows of k slots.
struct GatherShape {
  Batching batch;
  int64_t n = 0, d = 0, rows = 0, k = 0;
  std::vector<int64_t> off_table, off_rows_d, off_rows_k, off_out;
};

ffi::Error GatherDotImpl(ffi::Buffer<ffi::F32> table, ffi::Buffer<ffi::F32> vecs,
                         ffi::Buffer<ffi::S32> idx, ffi::ResultBuffer<ffi::F32> out,
                         int64_t threads) {
  auto odims = out->dimensions();
  auto tdims = table.dimensions();
  auto idims = idx.dimensions();
  if (odims.size() < 2 || tdims.size() != odims.size()) {
    return ffi::Error::InvalidArgument("sae_gather_dot: expected [.., n, d] table");
  }
  const size_t L = odims.size() - 2;
  GatherShape s;
  s.batch = ResultBatching(odims, 2);
  s.n = tdims[L];
  s.d = tdims[L + 1];
  s.rows = odims[L];
  s.k = odims[L + 1];
  if (!LeadingOffsets(s.batch, tdims, 2, s.n * s.d, &s.off_table) ||
      !LeadingOffsets(s.batch, vecs.dimensions(), 2, s.rows * s.d, &s.off_rows_d) ||
      !LeadingOffsets(s.batch, idims, 2, s.rows * s.k, &s.off_rows_k) ||
      vecs.dimensions()[L] != s.rows || vecs.dimensions()[L + 1] != s.d ||
      idims[L] != s.rows || idims[L + 1] != s.k) {
    return ffi::Error::InvalidArgument("sae_gather_dot: operand shapes disagree");
  }
  const int64_t n = s.n, d = s.d, k = s.k;
  const int64_t t = UseThreads(threads, s.rows * k * d, s.rows);
  for (int64_t b = 0; b < s.batch.count; ++b) {
    const float* pt = table.typed_data() + s.off_table[b];
    const float* pv = vecs.typed_data() + s.off_rows_d[b];
    const int32_t* pi = idx.typed_data() + s.off_rows_k[b];
    float* po = out->typed_data() + b * s.rows * k;
    ParallelFor(t, s.rows,
                [&](int64_t r0, int64_t r1) { DotRows(pt, pv, pi, po, n, d, k, r0, r1); });
  }
  return ffi::Error::Success();
}

ffi::Error GatherCombineImpl(ffi::Buffer<ffi::F32> table, ffi::Buffer<ffi::F32> coef,
                             ffi::Buffer<ffi::S32> idx, ffi::ResultBuffer<ffi::F32> out,
                             int64_t threads) {
  auto odims = out->dimensions();
  auto tdims = table.dimensions();
  auto cdims = coef.dimensions();
  if (odims.size() < 2 || tdims.size() != odims.size() || cdims.size() != odims.size()) {
    return ffi::Error::InvalidArgument("sae_gather_combine: expected [.., n, d] table");
  }
  const size_t L = odims.size() - 2;
  GatherShape s;
  s.batch = ResultBatching(odims, 2);
  s.n = tdims[L];
  s.d = tdims[L + 1];
  s.rows = odims[L];
  s.k = cdims[L + 1];
  if (!LeadingOffsets(s.batch, tdims, 2, s.n * s.d, &s.off_table) ||
      !LeadingOffsets(s.batch, cdims, 2, s.rows * s.k, &s.off_rows_k) ||
      !LeadingOffsets(s.batch, idx.dimensions(), 2, s.rows * s.k, &s.off_out) ||
      odims[L + 1] != s.d || cdims[L] != s.rows || idx.dimensions()[L] != s.rows ||
      idx.dimensions()[L + 1] != s.k) {
    return ffi::Error::InvalidArgument("sae_gather_combine: operand shapes disagree");
  }
  const int64_t n = s.n, d = s.d, k = s.k;
  const int64_t t = UseThreads(threads, s.rows * k * d, s.rows);
  for (int64_t b = 0; b < s.batch.count; ++b) {
    const float* pt = table.typed_data() + s.off_table[b];
    const float* pc = coef.typed_data() + s.off_rows_k[b];
    const int32_t* pi = idx.typed_data() + s.off_out[b];
    float* po = out->typed_data() + b * s.rows * d;
    ParallelFor(t, s.rows,
                [&](int64_t r0, int64_t r1) { CombineRows(pt, pc, pi, po, n, d, k, r0, r1); });
  }
  return ffi::Error::Success();
}

// -- scatter ---------------------------------------------------------------------------------

ffi::Error ScatterOuterImpl(ffi::Buffer<ffi::F32> coef, ffi::Buffer<ffi::F32> vecs,
                            ffi::Buffer<ffi::S32> idx, ffi::ResultBuffer<ffi::F32> out,
                            int64_t threads) {
  auto odims = out->dimensions();
  auto cdims = coef.dimensions();
  auto vdims = vecs.dimensions();
  if (odims.size() < 2 || cdims.size() != odims.size() || vdims.size() != odims.size()) {
    return ffi::Error::InvalidArgument("sae_scatter_outer: expected [.., n, d] result");
  }
  const size_t L = odims.size() - 2;
  GatherShape s;
  s.batch = ResultBatching(odims, 2);
  s.n = odims[L];
  s.d = odims[L + 1];
  s.rows = cdims[L];
  s.k = cdims[L + 1];
  if (!LeadingOffsets(s.batch, cdims, 2, s.rows * s.k, &s.off_rows_k) ||
      !LeadingOffsets(s.batch, vdims, 2, s.rows * s.d, &s.off_rows_d) ||
      !LeadingOffsets(s.batch, idx.dimensions(), 2, s.rows * s.k, &s.off_out) ||
      vdims[L] != s.rows || vdims[L + 1] != s.d || idx.dimensions()[L] != s.rows ||
      idx.dimensions()[L + 1] != s.k) {
    return ffi::Error::InvalidArgument("sae_scatter_outer: operand shapes disagree");
  }
  const int64_t n = s.n, d = s.d, k = s.k, rows = s.rows;
  if (rows * k >= (int64_t{1} << 31)) {
    return ffi::Error::InvalidArgument("sae_scatter_outer: more than 2^31 (row, slot) entries");
  }
  std::vector<int64_t> start(n + 1);
  std::vector<int32_t> srow;
  std::vector<float> sc;
  for (int64_t b = 0; b < s.batch.count; ++b) {
    const float* pc = coef.typed_data() + s.off_rows_k[b];
    const float* pv = vecs.typed_data() + s.off_rows_d[b];
    const int32_t* pi = idx.typed_data() + s.off_out[b];
    float* po = out->typed_data() + b * n * d;
    // Stable counting sort of the valid entries by id, in (slot, row) order.
    std::fill(start.begin(), start.end(), 0);
    for (int64_t e = 0; e < rows * k; ++e) {
      const uint32_t f = static_cast<uint32_t>(pi[e]);
      if (f < static_cast<uint64_t>(n)) ++start[f + 1];
    }
    for (int64_t f = 0; f < n; ++f) start[f + 1] += start[f];
    const int64_t valid = start[n];
    srow.resize(std::max<int64_t>(valid, 1));
    sc.resize(std::max<int64_t>(valid, 1));
    {
      std::vector<int64_t> pos(start.begin(), start.end() - 1);
      for (int64_t j = 0; j < k; ++j) {
        for (int64_t r = 0; r < rows; ++r) {
          const uint32_t f = static_cast<uint32_t>(pi[r * k + j]);
          if (f < static_cast<uint64_t>(n)) {
            const int64_t q = pos[f]++;
            srow[q] = static_cast<int32_t>(r);
            sc[q] = pc[r * k + j];
          }
        }
      }
    }
    // Split the ids into ranges of about equal cost (entries + rows to write, both ~d).
    const int64_t t = UseThreads(threads, (valid + n) * d, n);
    std::vector<int64_t> cut(t + 1, n);
    cut[0] = 0;
    for (int64_t i = 1; i < t; ++i) {
      const int64_t target = (valid + n) * i / t;
      int64_t lo = cut[i - 1], hi = n;  // first f with start[f] + f >= target
      while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        if (start[mid] + mid >= target) {
          hi = mid;
        } else {
          lo = mid + 1;
        }
      }
      cut[i] = lo;
    }
    const int64_t* st = start.data();
    const int32_t* sr = srow.data();
    const float* sw = sc.data();
    auto run = [&](int64_t part) { ScatterIds(st, sr, sw, pv, po, d, cut[part], cut[part + 1]); };
    if (t == 1) {
      run(0);
    } else {
      std::vector<std::thread> pool;
      pool.reserve(t - 1);
      for (int64_t i = 1; i < t; ++i) pool.emplace_back(run, i);
      run(0);
      for (auto& th : pool) th.join();
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaeTopK, TopKImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [.., R, n]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // values [.., R, k]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // indices [.., R, k]
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaeGatherDot, GatherDotImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // table [.., n, d]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // vecs [.., R, d]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // idx [.., R, k]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [.., R, k]
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaeGatherCombine, GatherCombineImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // table [.., n, d]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // coef [.., R, k]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // idx [.., R, k]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [.., R, d]
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SaeScatterOuter, ScatterOuterImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // coef [.., R, k]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // vecs [.., R, d]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // idx [.., R, k]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [.., n, d]
                                  .Attr<int64_t>("threads"));
