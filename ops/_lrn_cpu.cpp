// Fused CPU kernels for AlexNet local response normalisation (LRN).
//
//   s_i = k + alpha * sum_{j = i - lo}^{i + hi} a_j^2     (j clipped to [0, C-1])
//   b_i = a_i * s_i^{-beta}
//   grad_a_i = g_i s_i^{-beta}
//              - 2 alpha beta a_i * sum_{j = i - hi}^{i + lo} g_j a_j s_j^{-beta-1}
//
// with lo = size / 2 and hi = (size - 1) / 2 (torch.nn.LocalResponseNorm's
// window; symmetric for odd size).  The forward pass stores p = s^{-beta};
// the backward pass recomputes s from the input (a cheap window sum that hits
// cache) instead of storing a second tensor.
//
// Two memory layouts are handled, both dense:
//   layout 0: (N, C, S) contiguous         -- NCHW; work item = (n, block of S)
//   layout 1: (R, C) rows with C innermost -- channels-last; work item = rows
//
// Plain C ABI (loaded with ctypes) so that the build is a single fast g++ call
// without the torch headers.  Threads are std::threads created per call (no
// second OpenMP runtime spinning next to torch's).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <thread>
#include <vector>

#ifndef LRN_BLOCK_BYTES
#define LRN_BLOCK_BYTES 1024
#endif

namespace {

struct Params {
  int64_t N, C, S;  // layout 0: N x C x S; layout 1: N rows of C (S == 1)
  int size, lo, hi;
  double alpha, beta, k;
  int pmode;  // how s^-beta is evaluated, see scale_pow
};

enum PowMode { POW_075 = 0, POW_05 = 1, POW_1 = 2, POW_0 = 3, POW_GENERIC = 4 };

int pow_mode(double beta) {
  if (beta == 0.75) return POW_075;
  if (beta == 0.5) return POW_05;
  if (beta == 1.0) return POW_1;
  if (beta == 0.0) return POW_0;
  return POW_GENERIC;
}

// p[q] = s[q]^-beta
template <typename T>
inline void scale_pow(const T* __restrict s, T* __restrict p, int64_t n, int mode, T beta) {
  switch (mode) {
    case POW_075:
      for (int64_t q = 0; q < n; ++q) p[q] = T(1) / std::sqrt(s[q] * std::sqrt(s[q]));
      break;
    case POW_05:
      for (int64_t q = 0; q < n; ++q) p[q] = T(1) / std::sqrt(s[q]);
      break;
    case POW_1:
      for (int64_t q = 0; q < n; ++q) p[q] = T(1) / s[q];
      break;
    case POW_0:
      for (int64_t q = 0; q < n; ++q) p[q] = T(1);
      break;
    default:
      for (int64_t q = 0; q < n; ++q) p[q] = std::pow(s[q], -beta);
      break;
  }
}

// acc[q] = k + alpha * sum_{j=j0}^{j1} xb[j*stride + q]^2   (layout 0 helper)
template <typename T>
inline void window_scale(const T* __restrict xb, int64_t stride, int64_t j0, int64_t j1,
                         int64_t L, T alpha, T k, T* __restrict acc) {
  {
    const T* __restrict xr = xb + j0 * stride;
    for (int64_t q = 0; q < L; ++q) acc[q] = xr[q] * xr[q];
  }
  for (int64_t j = j0 + 1; j <= j1; ++j) {
    const T* __restrict xr = xb + j * stride;
    for (int64_t q = 0; q < L; ++q) acc[q] += xr[q] * xr[q];
  }
  for (int64_t q = 0; q < L; ++q) acc[q] = k + alpha * acc[q];
}

template <typename T>
constexpr int64_t block_len() {
  return LRN_BLOCK_BYTES / sizeof(T);  // 1 KiB rows: the backward working set stays in L1/L2
}

// ---------------------------------------------------------------- layout 0
template <typename T>
void fwd_nchw(const T* x, T* y, T* psave, const Params& P, int64_t b, int64_t e) {
  constexpr int64_t BLK = block_len<T>();
  const int64_t C = P.C, S = P.S, nblk = (S + BLK - 1) / BLK;
  const T alpha = T(P.alpha), k = T(P.k), beta = T(P.beta);
  alignas(64) T acc[BLK];
  alignas(64) T pl[BLK];
  for (int64_t it = b; it < e; ++it) {
    const int64_t n = it / nblk, p0 = (it % nblk) * BLK, L = std::min(BLK, S - p0);
    const int64_t base = n * C * S + p0;
    const T* xb = x + base;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t j0 = std::max<int64_t>(0, c - P.lo), j1 = std::min<int64_t>(C - 1, c + P.hi);
      window_scale(xb, S, j0, j1, L, alpha, k, acc);
      const int64_t off = base + c * S;
      T* __restrict pp = psave ? psave + off : pl;
      scale_pow(acc, pp, L, P.pmode, beta);
      const T* __restrict xr = x + off;
      T* __restrict yr = y + off;
      for (int64_t q = 0; q < L; ++q) yr[q] = xr[q] * pp[q];
    }
  }
}

template <typename T>
void bwd_nchw(const T* x, const T* p, const T* g, T* gi, const Params& P, int64_t b, int64_t e) {
  constexpr int64_t BLK = block_len<T>();
  const int64_t C = P.C, S = P.S, nblk = (S + BLK - 1) / BLK;
  const int size = P.size, lo = P.lo, hi = P.hi;
  const T alpha = T(P.alpha), k = T(P.k), c2ab = T(-2.0 * P.alpha * P.beta);
  std::vector<T> ring_store(static_cast<size_t>(size) * BLK);
  T* ring = ring_store.data();  // ring[(j % size) * BLK + q] = g_j a_j p_j / s_j
  alignas(64) T acc[BLK];
  for (int64_t it = b; it < e; ++it) {
    const int64_t n = it / nblk, p0 = (it % nblk) * BLK, L = std::min(BLK, S - p0);
    const int64_t base = n * C * S + p0;
    const T* xb = x + base;
    for (int64_t j = 0; j < C + lo; ++j) {
      if (j < C) {  // t_j for the channel entering the window
        const int64_t j0 = std::max<int64_t>(0, j - lo), j1 = std::min<int64_t>(C - 1, j + hi);
        window_scale(xb, S, j0, j1, L, alpha, k, acc);
        const int64_t off = base + j * S;
        const T* __restrict xr = x + off;
        const T* __restrict pr = p + off;
        const T* __restrict gr = g + off;
        T* __restrict tr = ring + (j % size) * BLK;
        for (int64_t q = 0; q < L; ++q) tr[q] = gr[q] * xr[q] * pr[q] / acc[q];
      }
      const int64_t i = j - lo;  // output channel whose window is now complete
      if (i < 0) continue;
      const int64_t m0 = std::max<int64_t>(0, i - hi), m1 = std::min<int64_t>(C - 1, i + lo);
      {
        const T* __restrict tr = ring + (m0 % size) * BLK;
        for (int64_t q = 0; q < L; ++q) acc[q] = tr[q];
      }
      for (int64_t m = m0 + 1; m <= m1; ++m) {
        const T* __restrict tr = ring + (m % size) * BLK;
        for (int64_t q = 0; q < L; ++q) acc[q] += tr[q];
      }
      const int64_t off = base + i * S;
      const T* __restrict xr = x + off;
      const T* __restrict pr = p + off;
      const T* __restrict gr = g + off;
      T* __restrict out = gi + off;
      for (int64_t q = 0; q < L; ++q) out[q] = gr[q] * pr[q] + c2ab * xr[q] * acc[q];
    }
  }
}

// ---------------------------------------------------------------- layout 1
// s[c] = k + alpha * sum_{d=0}^{size-1} pad[c + d], pad = [0]*lo ++ v ++ [0]*hi
template <typename T>
inline void row_window(const T* __restrict pad, int64_t C, int size, T* __restrict s) {
  for (int64_t c = 0; c < C; ++c) s[c] = pad[c];
  for (int d = 1; d < size; ++d) {
    const T* __restrict pd = pad + d;
    for (int64_t c = 0; c < C; ++c) s[c] += pd[c];
  }
}

template <typename T>
void fwd_nhwc(const T* x, T* y, T* psave, const Params& P, int64_t b, int64_t e) {
  const int64_t C = P.C;
  const int size = P.size, lo = P.lo;
  const T alpha = T(P.alpha), k = T(P.k), beta = T(P.beta);
  std::vector<T> buf(static_cast<size_t>(C + size) + 3 * static_cast<size_t>(C));
  T* pad = buf.data();  // C + size - 1 entries, zero borders
  T* s = pad + C + size;
  T* pl = s + C;
  std::fill(buf.begin(), buf.end(), T(0));
  for (int64_t r = b; r < e; ++r) {
    const T* __restrict xr = x + r * C;
    T* __restrict sq = pad + lo;
    for (int64_t c = 0; c < C; ++c) sq[c] = xr[c] * xr[c];
    row_window(pad, C, size, s);
    for (int64_t c = 0; c < C; ++c) s[c] = k + alpha * s[c];
    T* __restrict pp = psave ? psave + r * C : pl;
    scale_pow(s, pp, C, P.pmode, beta);
    T* __restrict yr = y + r * C;
    for (int64_t c = 0; c < C; ++c) yr[c] = xr[c] * pp[c];
  }
}

template <typename T>
void bwd_nhwc(const T* x, const T* p, const T* g, T* gi, const Params& P, int64_t b, int64_t e) {
  const int64_t C = P.C;
  const int size = P.size, lo = P.lo, hi = P.hi;
  const T alpha = T(P.alpha), k = T(P.k), c2ab = T(-2.0 * P.alpha * P.beta);
  std::vector<T> buf(2 * static_cast<size_t>(C + size) + 2 * static_cast<size_t>(C));
  std::fill(buf.begin(), buf.end(), T(0));
  T* pad = buf.data();           // squares, lo zeros in front
  T* tpad = pad + C + size;      // t, hi zeros in front
  T* s = tpad + C + size;
  T* ws = s + C;
  for (int64_t r = b; r < e; ++r) {
    const T* __restrict xr = x + r * C;
    const T* __restrict pr = p + r * C;
    const T* __restrict gr = g + r * C;
    T* __restrict sq = pad + lo;
    for (int64_t c = 0; c < C; ++c) sq[c] = xr[c] * xr[c];
    row_window(pad, C, size, s);
    T* __restrict t = tpad + hi;
    for (int64_t c = 0; c < C; ++c) t[c] = gr[c] * xr[c] * pr[c] / (k + alpha * s[c]);
    row_window(tpad, C, size, ws);
    T* __restrict out = gi + r * C;
    for (int64_t c = 0; c < C; ++c) out[c] = gr[c] * pr[c] + c2ab * xr[c] * ws[c];
  }
}

// ---------------------------------------------------------------- threading
template <typename F>
int run_parallel(int64_t items, int64_t work_per_item, int nthreads, F&& fn) {
  // ~64K elements per thread minimum so tiny tensors stay single-threaded
  int64_t max_threads = std::max<int64_t>(1, (items * work_per_item) / 65536);
  int nt = static_cast<int>(std::min<int64_t>({static_cast<int64_t>(std::max(nthreads, 1)), items, max_threads}));
  if (nt <= 1) {
    fn(int64_t(0), items);
    return 0;
  }
  std::vector<std::thread> pool;
  pool.reserve(nt - 1);
  std::atomic<int> failed{0};
  auto guarded = [&fn, &failed](int64_t b, int64_t e) {
    try {
      fn(b, e);
    } catch (...) {
      failed.store(1);
    }
  };
  auto range = [&](int t) {
    return std::make_pair(items * t / nt, items * (t + 1) / nt);
  };
  try {
    for (int t = 1; t < nt; ++t) {
      auto rg = range(t);
      pool.emplace_back([&guarded, rg] { guarded(rg.first, rg.second); });
    }
  } catch (...) {
    // could not start all threads: finish the remaining ranges here
    for (int t = static_cast<int>(pool.size()) + 1; t < nt; ++t) {
      auto rg = range(t);
      guarded(rg.first, rg.second);
    }
  }
  auto rg = range(0);
  guarded(rg.first, rg.second);
  for (auto& th : pool) th.join();
  return failed.load() ? -3 : 0;
}

template <typename T>
int forward_impl(int layout, const void* x, void* y, void* p, const Params& P, int nthreads) {
  const T* xp = static_cast<const T*>(x);
  T* yp = static_cast<T*>(y);
  T* pp = static_cast<T*>(p);
  if (layout == 0) {
    const int64_t nblk = (P.S + block_len<T>() - 1) / block_len<T>();
    return run_parallel(P.N * nblk, P.C * std::min(P.S, block_len<T>()), nthreads,
                        [&](int64_t b, int64_t e) { fwd_nchw<T>(xp, yp, pp, P, b, e); });
  }
  return run_parallel(P.N, P.C, nthreads,
                      [&](int64_t b, int64_t e) { fwd_nhwc<T>(xp, yp, pp, P, b, e); });
}

template <typename T>
int backward_impl(int layout, const void* x, const void* p, const void* g, void* gi, const Params& P,
                  int nthreads) {
  const T* xp = static_cast<const T*>(x);
  const T* pp = static_cast<const T*>(p);
  const T* gp = static_cast<const T*>(g);
  T* out = static_cast<T*>(gi);
  if (layout == 0) {
    const int64_t nblk = (P.S + block_len<T>() - 1) / block_len<T>();
    return run_parallel(P.N * nblk, P.C * std::min(P.S, block_len<T>()), nthreads,
                        [&](int64_t b, int64_t e) { bwd_nchw<T>(xp, pp, gp, out, P, b, e); });
  }
  return run_parallel(P.N, P.C, nthreads,
                      [&](int64_t b, int64_t e) { bwd_nhwc<T>(xp, pp, gp, out, P, b, e); });
}

bool make_params(int64_t N, int64_t C, int64_t S, int size, double alpha, double beta, double k,
                 Params* P) {
  if (N < 0 || C < 1 || S < 0 || size < 1) return false;
  P->N = N;
  P->C = C;
  P->S = S;
  P->size = size;
  P->lo = size / 2;
  P->hi = (size - 1) / 2;
  P->alpha = alpha;
  P->beta = beta;
  P->k = k;
  P->pmode = pow_mode(beta);
  return true;
}

}  // namespace

extern "C" {

int lrn_abi_version() { return 1; }

// dtype: 0 = float32, 1 = float64.  layout: 0 = (N, C, S) contiguous,
// 1 = N rows of C contiguous channels (pass S = 1).  p may be NULL (no save).
// Returns 0 on success.
int lrn_forward(int dtype, int layout, const void* x, void* y, void* p, int64_t N, int64_t C,
                int64_t S, int size, double alpha, double beta, double k, int nthreads) {
  Params P;
  if (!make_params(N, C, S, size, alpha, beta, k, &P)) return -1;
  try {
    if (dtype == 0) return forward_impl<float>(layout, x, y, p, P, nthreads);
    if (dtype == 1) return forward_impl<double>(layout, x, y, p, P, nthreads);
  } catch (...) {
    return -3;
  }
  return -2;
}

int lrn_backward(int dtype, int layout, const void* x, const void* p, const void* g, void* gi,
                 int64_t N, int64_t C, int64_t S, int size, double alpha, double beta, double k,
                 int nthreads) {
  Params P;
  if (!make_params(N, C, S, size, alpha, beta, k, &P) || p == nullptr) return -1;
  try {
    if (dtype == 0) return backward_impl<float>(layout, x, p, g, gi, P, nthreads);
    if (dtype == 1) return backward_impl<double>(layout, x, p, g, gi, P, nthreads);
  } catch (...) {
    return -3;
  }
  return -2;
}

}  // extern "C"
