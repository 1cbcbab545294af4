// One layer's elementwise work for the int8 planner, fused into one pass per row:
//   x = base[row's group] + acc * col_scale * row_scale (int32 products, if any)
//       + a @ wa (the few action inputs of a first layer, if any)
//   y = LayerNorm(x) * w + b                   (two-pass mean and variance, like PyTorch)
//   top = max(mish(max_j y_j), 0.30885) / 127  (bounds every |mish(y_j)| / 127)
//   q = round(y * n / ((n + 2) * top)) as int8, i.e. round(mish(y) / top), where
//       n = e (e + 2), e = exp(min(y, 20)), mish(y) = y * n / (n + 2)
// Returns (q [M, N] int8, top [M, 1] float32): the next product's input and its row scales.
// wide: q is [2M, N], the rows' codes u = mish(y) / top in two planes, hi = round(u) in rows
// 0..M-1 and lo = round((u - hi) * 128) in rows M..2M-1 (|lo| <= 64), so hi + lo / 128 is u
// to 1/256 of a step: one product of the 2M rows gives a 15-bit-input product.
// Rows are independent, so a row's result never depends on the batch it is computed in.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr float kLoPlane = 128.f;  // weight of a wide code's second plane: hi + lo / 128

// f(std::integral_constant<int, na>{}) for na in 0..6 (MT30's action sizes and below), else
// f(std::integral_constant<int, -1>{}): lets a row kernel unroll its loop over the action
// inputs (plans of the 1M model 0.6-2.0% faster, session 26; the same sums in that order).
template <class F>
decltype(auto) with_actions(int64_t na, F&& f) {
  switch (na) {
    case 0: return f(std::integral_constant<int, 0>{});
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    default: return f(std::integral_constant<int, -1>{});
  }
}

// Codes: rounded floats (integral values, or NaN) stored as int8 with saturation, as
// at::vec::convert<int8_t> stores them, four vectors at a time. On AVX2 4 conversions, 3 packs
// and one permutation for 32 codes, where convert<int8_t> takes 7 instructions per 8
// (ln_mish_int8 10-15% faster on the 1M model's rows, session 27).
#if defined(CPU_CAPABILITY_AVX2)
inline void store_codes(const Vec (&v)[4], int8_t* out) {
  const __m256i w01 = _mm256_packs_epi32(_mm256_cvtps_epi32(v[0]), _mm256_cvtps_epi32(v[1]));
  const __m256i w23 = _mm256_packs_epi32(_mm256_cvtps_epi32(v[2]), _mm256_cvtps_epi32(v[3]));
  // bytes, per 128-bit lane: v0[0:4] v1[0:4] v2[0:4] v3[0:4] | v0[4:8] v1[4:8] ...
  const __m256i b = _mm256_packs_epi16(w01, w23);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                      _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}
#else
inline void store_codes(const Vec (&v)[4], int8_t* out) {
  for (int t = 0; t < 4; ++t)
    at::vec::convert<int8_t>(v[t]).store(out + t * Vec::size(), Vec::size());
}
#endif

// Codes of u(j) for j = 0..n-1 (u(j) the vector of values at j; scalar_u(j) one value):
// q = round(u), with lo also lo = round((u - q) * 128).
template <class U, class ScalarU>
void store_row_codes(int64_t n, U&& u, ScalarU&& scalar_u, int8_t* q, int8_t* lo) {
  const int64_t V = Vec::size();
  const Vec plane(kLoPlane);
  int64_t j = 0;
  for (; j + 4 * V <= n; j += 4 * V) {
    Vec hi[4], low[4];
    for (int s = 0; s < 4; ++s) {
      const Vec x = u(j + s * V);
      hi[s] = x.round();
      if (lo) low[s] = ((x - hi[s]) * plane).round();
    }
    store_codes(hi, q + j);
    if (lo) store_codes(low, lo + j);
  }
  for (; j + V <= n; j += V) {
    const Vec x = u(j), hi = x.round();
    at::vec::convert<int8_t>(hi).store(q + j, V);
    if (lo) at::vec::convert<int8_t>(((x - hi) * plane).round()).store(lo + j, V);
  }
  for (; j < n; ++j) {
    const float x = scalar_u(j), hi = std::nearbyint(x);
    q[j] = static_cast<int8_t>(hi);
    if (lo) lo[j] = static_cast<int8_t>(std::nearbyint((x - hi) * kLoPlane));
  }
}

float sum_lanes(Vec v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

float max_lanes(Vec v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, v);
}

// exp(min(y, 20)) for Mish, inputs below -80 taken as -80 (Mish is 0 there to float
// precision): exp(y) = 2^k exp(r), k = round(y / ln 2), r = y - k ln 2 in [-ln2/2, ln2/2],
// exp(r) by exp_u20's degree-5 polynomial and 2^k by scalef (AVX-512) or by writing k into
// the exponent bits (AVX2; k is in [-116, 29], so k + 127 is a normal float's exponent):
// 11-13 vector ops where min + exp take ~20-30, same accuracy (relative error ~1e-7).
// Other ISAs: exp_u20.
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
inline Vec times_pow2(Vec p, Vec k) {  // p * 2^k for integral k
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_scalef_ps(p, k);
#else
  const __m256i bits = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
#endif
}

inline Vec mish_exp(Vec y) {
  const Vec x = at::vec::clamp(y, Vec(-80.f), Vec(20.f));
  const Vec k = (x * Vec(1.44269504f)).round();
  const Vec r = at::vec::fmadd(k, Vec(-0.693147182f), x);
  Vec p = at::vec::fmadd(r, Vec(0.00828929059f), Vec(0.0418978221f));
  for (const float c : {0.166676521f, 0.499991506f, 0.999999701f, 1.f})
    p = at::vec::fmadd(r, p, Vec(c));
  return times_pow2(p, k);
}
#else
inline Vec mish_exp(Vec y) { return at::vec::minimum(y, Vec(20.f)).exp_u20(); }
#endif

// mish(y) = y n / (n + 2), n = e (e + 2), e = mish_exp(y), for a vector of y.
inline Vec mish_vec(Vec y) {
  const Vec two(2.f), e = mish_exp(y), nn = (e + two) * e;
  return y * nn / (nn + two);
}

float mish(float y) {
  const float e = std::exp(std::min(y, 20.f)), n = (e + 2.f) * e;
  return y * n / (n + 2.f);
}

// Pre-activation row into buf; returns its sum.
//   x = base + acc * cs * rs (if acc) + a @ wa (if a; wa is [A, >=n] with row stride ldw)
//   (+ (ref_hi + ref_lo / 128) * cs * rs_ref: the reference row's part, in reference mode)
// NA >= 0: na is NA, known when compiled (the action loop unrolls; the same sums in the same
// order); -1: na read at run time.
template <int NA>
float load_row_na(const float* base, const int32_t* acc, const float* cs, float rs,
                  const float* a, int64_t na, const float* wa, int64_t ldw, int64_t n,
                  float* buf, const int32_t* ref_hi, const int32_t* ref_lo, float rs_ref) {
  const int64_t acts = NA >= 0 ? NA : na;
  const int64_t V = Vec::size();
  int64_t j = 0;
  Vec s(0.f);
  using IVec = at::vec::Vectorized<int32_t>;
  for (; j + V <= n; j += V) {
    Vec v = Vec::loadu(base + j);
    if (acc && ref_hi) {
      Vec p = at::vec::convert<float>(IVec::loadu(acc + j)) * Vec(rs) +
              (at::vec::convert<float>(IVec::loadu(ref_hi + j)) +
               at::vec::convert<float>(IVec::loadu(ref_lo + j)) * Vec(1.f / kLoPlane)) *
                  Vec(rs_ref);
      v = v + p * Vec::loadu(cs + j);
    } else if (acc) {
      v = v + at::vec::convert<float>(IVec::loadu(acc + j)) * Vec::loadu(cs + j) * Vec(rs);
    }
#pragma GCC unroll 8
    for (int64_t k = 0; k < acts; ++k)
      v = at::vec::fmadd(Vec(a[k]), Vec::loadu(wa + k * ldw + j), v);
    v.store(buf + j);
    s = s + v;
  }
  float sum = sum_lanes(s);
  for (; j < n; ++j) {
    float v = base[j];
    if (acc && ref_hi)
      v += (float(acc[j]) * rs + (float(ref_hi[j]) + float(ref_lo[j]) / kLoPlane) * rs_ref) *
           cs[j];
    else if (acc)
      v += float(acc[j]) * cs[j] * rs;
    for (int64_t k = 0; k < acts; ++k) v = std::fma(a[k], wa[k * ldw + j], v);
    buf[j] = v;
    sum += v;
  }
  return sum;
}

float load_row(const float* base, const int32_t* acc, const float* cs, float rs,
               const float* a, int64_t na, const float* wa, int64_t ldw, int64_t n,
               float* buf, const int32_t* ref_hi = nullptr, const int32_t* ref_lo = nullptr,
               float rs_ref = 0.f) {
  return with_actions(na, [&](auto acts) {
    return load_row_na<decltype(acts)::value>(base, acc, cs, rs, a, na, wa, ldw, n, buf, ref_hi,
                                              ref_lo, rs_ref);
  });
}

// rows_rstd (below) with four sums: independent add chains (the float32 kernel's; the int8
// kernel keeps rows_rstd, the summation order its recorded scores were measured with).
float row_rstd4(const float* buf, int64_t n, float mean, float eps) {
  const int64_t V = Vec::size();
  const Vec m(mean);
  Vec q0(0.f), q1(0.f), q2(0.f), q3(0.f);
  int64_t j = 0;
  for (; j + 4 * V <= n; j += 4 * V) {
    const Vec d0 = Vec::loadu(buf + j) - m, d1 = Vec::loadu(buf + j + V) - m;
    const Vec d2 = Vec::loadu(buf + j + 2 * V) - m, d3 = Vec::loadu(buf + j + 3 * V) - m;
    q0 = at::vec::fmadd(d0, d0, q0);
    q1 = at::vec::fmadd(d1, d1, q1);
    q2 = at::vec::fmadd(d2, d2, q2);
    q3 = at::vec::fmadd(d3, d3, q3);
  }
  for (; j + V <= n; j += V) {
    const Vec d = Vec::loadu(buf + j) - m;
    q0 = at::vec::fmadd(d, d, q0);
  }
  float var = sum_lanes((q0 + q1) + (q2 + q3));
  for (; j < n; ++j) var += (buf[j] - mean) * (buf[j] - mean);
  return 1.f / std::sqrt(var / n + eps);
}

// 1 / sqrt(variance + eps) of R rows buf[r] (n values each, means mean[r]) into rstd[r], two
// passes around the mean as PyTorch's LayerNorm computes it, one add chain per row; R rows at
// once put their chains side by side (ln_mish_int8 ~8% faster with R = 2, session 27).
template <int R>
void rows_rstd(const float* const* buf, int64_t n, const float* mean, float eps, float* rstd) {
  const int64_t V = Vec::size();
  Vec sq[R];
  for (int r = 0; r < R; ++r) sq[r] = Vec(0.f);
  int64_t j = 0;
  for (; j + V <= n; j += V)
    for (int r = 0; r < R; ++r) {
      const Vec d = Vec::loadu(buf[r] + j) - Vec(mean[r]);
      sq[r] = sq[r] + d * d;
    }
  for (int r = 0; r < R; ++r) {
    float var = sum_lanes(sq[r]);
    for (int64_t i = j; i < n; ++i) var += (buf[r][i] - mean[r]) * (buf[r][i] - mean[r]);
    rstd[r] = 1.f / std::sqrt(var / n + eps);
  }
}

// Row i loaded into buf by load(i, buf) (returns its sum), then finish(i, mean, rstd, buf).
template <class Load, class Finish>
void one_row(int64_t i, int64_t n, float eps, float* buf, Load&& load, Finish&& finish) {
  const float mean = load(i, buf) / n;
  float rstd;
  rows_rstd<1>(&buf, n, &mean, eps, &rstd);
  finish(i, mean, rstd, buf);
}

// The rows begin..end-1 as one_row takes them, two at a time (their variance chains side by
// side); buf holds 2n.
template <class Load, class Finish>
void rows_in_pairs(int64_t begin, int64_t end, int64_t n, float eps, float* buf, Load&& load,
                   Finish&& finish) {
  float* const bufs[2] = {buf, buf + n};
  int64_t i = begin;
  for (; i + 2 <= end; i += 2) {
    const float mean[2] = {load(i, bufs[0]) / n, load(i + 1, bufs[1]) / n};
    float rstd[2];
    rows_rstd<2>(bufs, n, mean, eps, rstd);
    finish(i, mean[0], rstd[0], bufs[0]);
    finish(i + 1, mean[1], rstd[1], bufs[1]);
  }
  if (i < end) one_row(i, n, eps, buf, load, finish);
}

// LayerNorm (the row's mean and rstd given) + Mish + int8 of the row in buf (n values); writes
// q[0:n] and *top_out, and with lo the second plane lo[0:n] (see wide above).
void finish_row(const float* w, const float* b, int64_t n, float mean, float rstd, float* buf,
                int8_t* q, int8_t* lo, float* top_out) {
  const int64_t V = Vec::size();
  const Vec m(mean);
  const Vec r(rstd);
  Vec mx(-INFINITY);
  float top = -INFINITY;
  int64_t j = 0;
  for (; j + V <= n; j += V) {
    Vec y = (Vec::loadu(buf + j) - m) * r * Vec::loadu(w + j) + Vec::loadu(b + j);
    y.store(buf + j);
    mx = at::vec::maximum(mx, y);
  }
  for (; j < n; ++j) {
    buf[j] = (buf[j] - mean) * rstd * w[j] + b[j];
    top = std::max(top, buf[j]);
  }
  top = std::max(mish(std::max(top, max_lanes(mx))), 0.30885f) / 127.f;
  *top_out = top;
  const Vec t(top), two(2.f);
  store_row_codes(
      n,
      [&](int64_t i) {
        const Vec y = Vec::loadu(buf + i);
        const Vec e = mish_exp(y);  // ~1e-7 relative: far below int8 steps
        const Vec nn = (e + two) * e;
        return y * nn / ((nn + two) * t);
      },
      [&](int64_t i) { return mish(buf[i]) / top; }, q, lo);
}

// Reference mode, step 1: LayerNorm (the row's mean and rstd given) + Mish of the row in buf,
// in place (float outputs); returns max_j |h_j - ref_j| (ref null: max_j |h_j|), the scale
// step 2 needs.
float ln_mish_row(const float* w, const float* b, int64_t n, float mean, float rstd, float* buf,
                  const float* ref) {
  const int64_t V = Vec::size();
  const Vec m(mean);
  const Vec r(rstd);
  Vec mx(0.f);
  int64_t j = 0;
  for (; j + V <= n; j += V) {
    Vec h = mish_vec((Vec::loadu(buf + j) - m) * r * Vec::loadu(w + j) + Vec::loadu(b + j));
    h.store(buf + j);
    mx = at::vec::maximum(mx, (ref ? h - Vec::loadu(ref + j) : h).abs());
  }
  float top = max_lanes(mx);
  for (; j < n; ++j) {
    buf[j] = mish((buf[j] - mean) * rstd * w[j] + b[j]);
    top = std::max(top, std::abs(ref ? buf[j] - ref[j] : buf[j]));
  }
  return top;
}

// Reference mode, step 2: codes of h - ref (ref null: of h) with scale max|.| / 127 in
// *top_out (max|.| from step 1); with lo, 15-bit codes as two planes (hi in q). Vectors are
// multiplied by the scale's reciprocal, or with Divide divided by it as PyTorch's ops do.
template <bool Divide = false>
void code_row(const float* h, const float* ref, int64_t n, float maxabs, int8_t* q, int8_t* lo,
              float* top_out) {
  const float top = std::max(maxabs, 1e-12f) / 127.f;
  *top_out = top;
  const Vec t(top), inv(1.f / top);
  store_row_codes(
      n,
      [&](int64_t i) {
        const Vec d = ref ? Vec::loadu(h + i) - Vec::loadu(ref + i) : Vec::loadu(h + i);
        return Divide ? d / t : d * inv;
      },
      [&](int64_t i) { return (ref ? h[i] - ref[i] : h[i]) / top; }, q, lo);
}

const float* float_ptr(const std::optional<at::Tensor>& t, at::Tensor& keep, int64_t min_numel,
                       const char* name, const char* op = "ln_mish_int8") {
  if (!t) return nullptr;
  keep = t->contiguous();
  TORCH_CHECK(keep.scalar_type() == at::kFloat && keep.numel() >= min_numel,
              op, ": ", name, " must be float32 with at least ", min_numel, " values");
  return keep.data_ptr<float>();
}

std::tuple<at::Tensor, at::Tensor> ln_mish_int8(
    const at::Tensor& base, const std::optional<at::Tensor>& acc,
    const std::optional<at::Tensor>& col_scale, const std::optional<at::Tensor>& row_scale,
    const std::optional<at::Tensor>& a, const std::optional<at::Tensor>& wa,
    const at::Tensor& w, const at::Tensor& b, double eps, bool wide, int64_t ref_groups) {
  TORCH_CHECK(acc || a, "ln_mish_int8: needs products (acc) or actions (a)");
  const int64_t groups = ref_groups, extra = acc && groups > 0 ? 2 * groups : 0;
  const int64_t n = w.numel(), m = acc ? acc->size(0) - extra : a->size(0);
  TORCH_CHECK(groups >= 0 && !(wide && groups > 0) && m > 0 && (groups == 0 || m % groups == 0),
              "ln_mish_int8: ref_groups must divide the rows (and excludes wide)");
  TORCH_CHECK(base.dim() == 2 && base.size(1) >= n && base.size(0) > 0 && m % base.size(0) == 0,
              "ln_mish_int8: base must be [G, >=N] with G dividing M");
  at::Tensor basec = base.contiguous(), wc = w.contiguous(), bc = b.contiguous(), cs, rs, ac,
             wac;
  const int32_t* accp = nullptr;
  int64_t ld = 0;
  if (acc) {
    TORCH_CHECK(acc->scalar_type() == at::kInt && acc->dim() == 2 && acc->stride(1) == 1 &&
                    acc->size(1) >= n, "ln_mish_int8: acc must be int32 [M, >=N], rows contiguous");
    TORCH_CHECK(col_scale && row_scale, "ln_mish_int8: acc needs col_scale and row_scale");
    accp = acc->data_ptr<int32_t>();
    ld = acc->stride(0);
  }
  const float* csp = acc ? float_ptr(col_scale, cs, n, "col_scale") : nullptr;
  const float* rsp = acc ? float_ptr(row_scale, rs, m + extra / 2, "row_scale") : nullptr;
  const float* ap = float_ptr(a, ac, 0, "a");
  const int64_t na = a ? ac.size(1) : 0;
  TORCH_CHECK(!a || (ac.dim() == 2 && ac.size(0) == m && wa && wa->dim() == 2 &&
                     wa->size(0) == na && wa->size(1) >= n),
              "ln_mish_int8: a must be [M, A] with wa [A, >=N]");
  const float* wap = a ? float_ptr(wa, wac, 0, "wa") : nullptr;
  const int64_t ldw = a ? wac.stride(0) : 0, ldb = basec.stride(0), per = m / base.size(0);
  const float* bp0 = float_ptr(basec, basec, n, "base");
  const float* wp = float_ptr(wc, wc, n, "w");
  const float* bp = float_ptr(bc, bc, n, "b");
  const float e = static_cast<float>(eps);
  const int64_t q_rows = groups > 0 ? m + 2 * groups : (wide ? 2 * m : m);
  auto q = at::empty({q_rows, n}, w.options().dtype(at::kChar));
  auto top = at::empty({groups > 0 ? m + groups : m, 1}, w.options());
  int8_t* qp = q.data_ptr<int8_t>();
  float* tp = top.data_ptr<float>();
  if (groups > 0) {  // reference mode: the groups' first rows, then every row's difference
    const int64_t rows = m / groups;
    auto load = [&](int64_t i, float* buf) {
      const int64_t g = i / rows;
      return load_row(bp0 + (i / per) * ldb, accp ? accp + i * ld : nullptr, csp,
                      rsp ? rsp[i] : 0.f, ap ? ap + i * na : nullptr, na, wap, ldw, n, buf,
                      extra ? accp + (m + g) * ld : nullptr,
                      extra ? accp + (m + groups + g) * ld : nullptr,
                      extra ? rsp[m + g] : 0.f);
    };
    std::vector<float> ref(groups * n);
    at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g)
        one_row(g * rows, n, e, ref.data() + g * n, load,
                [&](int64_t, float mean, float rstd, float* h) {
                  const float top = ln_mish_row(wp, bp, n, mean, rstd, h, nullptr);
                  code_row(h, nullptr, n, top, qp + (m + g) * n, qp + (m + groups + g) * n,
                           tp + m + g);
                });
    });
    at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(2 * n);
      rows_in_pairs(begin, end, n, e, buf.data(), load,
                    [&](int64_t i, float mean, float rstd, float* h) {
                      const float* r = ref.data() + (i / rows) * n;
                      const float top = ln_mish_row(wp, bp, n, mean, rstd, h, r);
                      code_row(h, r, n, top, qp + i * n, nullptr, tp + i);
                    });
    });
    return {q, top};
  }
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(2 * n);
    rows_in_pairs(
        begin, end, n, e, buf.data(),
        [&](int64_t i, float* to) {
          return load_row(bp0 + (i / per) * ldb, accp ? accp + i * ld : nullptr, csp,
                          rsp ? rsp[i] : 0.f, ap ? ap + i * na : nullptr, na, wap, ldw, n, to);
        },
        [&](int64_t i, float mean, float rstd, float* h) {
          finish_row(wp, bp, n, mean, rstd, h, qp + i * n, wide ? qp + (m + i) * n : nullptr,
                     tp + i);
        });
  });
  return {q, top};
}

// float32 LayerNorm + Mish of one row's pre-activation into o[0:n]: LayerNorm's two passes
// and the Mish pass, the same exp as above. Pre-activation: xrow (a product's row without its
// bias; may be o itself) + brow (a bias) + arow @ wa (na action inputs, wa [na, >=n] with row
// stride ldw); each part optional (null / na = 0), xrow or arow required.
// NA >= 0: na is NA, known when compiled, so the action loop unrolls (the same sums in the
// same order); -1: na read at run time.
template <int NA>
void ln_mish_f32_row_na(const float* xrow, const float* brow, const float* arow, int64_t na,
                        const float* wap, int64_t ldw, const float* wp, const float* bp,
                        int64_t n, float e, float* o) {
  const int64_t V = Vec::size();
  const int64_t acts = NA >= 0 ? NA : na;
  const bool in_place = !brow && !acts;  // read xrow where it is
  const float* row = in_place ? xrow : o;
  auto pre = [&](int64_t j) {  // the pre-activation's vector at column j
    Vec v = xrow ? Vec::loadu(xrow + j) : Vec(0.f);
    if (brow) v = v + Vec::loadu(brow + j);
#pragma GCC unroll 8
    for (int64_t k = 0; k < acts; ++k)
      v = at::vec::fmadd(Vec(arow[k]), Vec::loadu(wap + k * ldw + j), v);
    return v;
  };
  // four vectors per step into four sums: independent add chains instead of one
  Vec s0(0.f), s1(0.f), s2(0.f), s3(0.f);
  int64_t j = 0;
  for (; j + 4 * V <= n; j += 4 * V) {
    const Vec v0 = pre(j), v1 = pre(j + V), v2 = pre(j + 2 * V), v3 = pre(j + 3 * V);
    if (!in_place) {
      v0.store(o + j);
      v1.store(o + j + V);
      v2.store(o + j + 2 * V);
      v3.store(o + j + 3 * V);
    }
    s0 = s0 + v0;
    s1 = s1 + v1;
    s2 = s2 + v2;
    s3 = s3 + v3;
  }
  for (; j + V <= n; j += V) {
    const Vec v = pre(j);
    if (!in_place) v.store(o + j);
    s0 = s0 + v;
  }
  float sum = sum_lanes((s0 + s1) + (s2 + s3));
  for (; j < n; ++j) {
    float v = xrow ? xrow[j] : 0.f;
    if (brow) v += brow[j];
    for (int64_t k = 0; k < acts; ++k) v = std::fma(arow[k], wap[k * ldw + j], v);
    if (!in_place) o[j] = v;
    sum += v;
  }
  const float mean = sum / n, rstd = row_rstd4(row, n, mean, e);
  const Vec mv(mean), r(rstd);
  auto finish = [&](int64_t j) {
    return mish_vec((Vec::loadu(row + j) - mv) * r * Vec::loadu(wp + j) + Vec::loadu(bp + j));
  };
  for (j = 0; j + 2 * V <= n; j += 2 * V) {  // two vectors per step: more independent work
    const Vec y0 = finish(j), y1 = finish(j + V);
    y0.store(o + j);
    y1.store(o + j + V);
  }
  for (; j + V <= n; j += V) finish(j).store(o + j);
  for (; j < n; ++j) o[j] = mish((row[j] - mean) * rstd * wp[j] + bp[j]);
}

void ln_mish_f32_row(const float* xrow, const float* brow, const float* arow, int64_t na,
                     const float* wap, int64_t ldw, const float* wp, const float* bp, int64_t n,
                     float e, float* o) {
  with_actions(na, [&](auto acts) {
    ln_mish_f32_row_na<decltype(acts)::value>(xrow, brow, arow, na, wap, ldw, wp, bp, n, e, o);
  });
}

// A float32 layer's optional parts (below), checked: base [G, >=n] with G dividing m, and
// a [m, A] with wa [A, >=n]; contiguous copies kept with their pointers.
struct F32Parts {
  at::Tensor basec, ac, wac;
  const float *bsp = nullptr, *ap = nullptr, *wap = nullptr;
  int64_t na = 0, ldw = 0, ldb = 0, per = 1;
};

F32Parts f32_parts(const std::optional<at::Tensor>& base, const std::optional<at::Tensor>& a,
                   const std::optional<at::Tensor>& wa, int64_t m, int64_t n, const char* op) {
  F32Parts p;
  TORCH_CHECK(!a || (a->dim() == 2 && a->size(0) == m && wa && wa->dim() == 2 &&
                     wa->size(0) == a->size(1) && wa->size(1) >= n),
              op, ": a must be [M, A] with wa [A, >=N]");
  p.ap = float_ptr(a, p.ac, 0, "a", op);
  p.wap = a ? float_ptr(wa, p.wac, 0, "wa", op) : nullptr;
  p.na = a ? p.ac.size(1) : 0;
  p.bsp = float_ptr(base, p.basec, 0, "base", op);
  TORCH_CHECK(!base || (p.basec.dim() == 2 && p.basec.size(1) >= n && p.basec.size(0) > 0 &&
                        m % p.basec.size(0) == 0),
              op, ": base must be [G, >=N] with G dividing M");
  p.ldw = a ? p.wac.stride(0) : 0;
  p.ldb = base ? p.basec.stride(0) : 0;
  p.per = base ? m / p.basec.size(0) : 1;
  return p;
}

// float32 LayerNorm + Mish of one layer's pre-activation -> new [M, N], one parallel region
// (ln_mish_f32_row per row). Pre-activation of row i: x[i] (a product without its bias:
// [M, N], rows contiguous, any row stride) + base[i / (M / G)] (the bias, or a first layer's
// task bias per environment: [G, >=N]) + a[i] @ wa (a first layer's action inputs [M, A] and
// weights [A, >=N]); each part optional, x or a required.
at::Tensor ln_mish_f32(const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& base,
                       const std::optional<at::Tensor>& a, const std::optional<at::Tensor>& wa,
                       const at::Tensor& w, const at::Tensor& b, double eps) {
  const int64_t n = w.numel();
  TORCH_CHECK(x || (a && a->dim() == 2), "ln_mish_f32: needs x or a [M, A]");
  TORCH_CHECK(w.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && b.numel() == n,
              "ln_mish_f32: w and b must be float32 [N]");
  TORCH_CHECK(!x || (x->scalar_type() == at::kFloat && x->dim() == 2 && x->size(1) == n &&
                     x->stride(1) == 1),
              "ln_mish_f32: x must be float32 [M, N] with rows contiguous");
  at::Tensor wc = w.contiguous(), bc = b.contiguous();
  const int64_t m = x ? x->size(0) : a->size(0);
  const F32Parts p = f32_parts(base, a, wa, m, n, "ln_mish_f32");
  auto out = at::empty({m, n}, w.options());
  const float* xp = x ? x->data_ptr<float>() : nullptr;
  const float* wp = wc.data_ptr<float>();
  const float* bp = bc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t ld = x ? x->stride(0) : 0;
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      ln_mish_f32_row(xp ? xp + i * ld : nullptr, p.bsp ? p.bsp + (i / p.per) * p.ldb : nullptr,
                      p.ap ? p.ap + i * p.na : nullptr, p.na, p.wap, p.ldw, wp, bp, n,
                      static_cast<float>(eps), op + i * n);
  });
  return out;
}

// Two-hot decoding (TD-MPC2's discrete regression) of float32 output rows, one pass per row:
//   out[i] = symexp(T / S), l_j = x[i, j] + b[j], e_j = exp(l_j - max_j l_j), S = sum_j e_j,
//   T = sum_j e_j c[j]
// i.e. symexp of the softmax-weighted mean of the bin centres, with mish_exp's exponential
// (~1e-7 relative) where PyTorch's softmax divides every probability by S first: the same
// value up to float32 rounding; a row with a NaN or infinite maximum gives NaN, as PyTorch's
// softmax does. x [M, K] with rows contiguous (any row stride: the first K columns of a
// padded product, without its bias); b [K] the output layer's bias or null; c [K]; returns a
// new [M]. R rows at once (independent chains, so one row's reductions overlap the others'
// passes); out[r] for the rows at x + r * ld.
template <int R>
void two_hot_rows(const float* x, int64_t ld, const float* b, const float* c, int64_t k,
                  float* out) {
  const int64_t V = Vec::size(), full = k / V * V, rest = k - full;
  float top[R];
  for (int r = 0; r < R; ++r) {
    const float* row = x + r * ld;
    int64_t j = 0;
    top[r] = -std::numeric_limits<float>::infinity();
    auto logit = [&](int64_t j) {
      return b ? Vec::loadu(row + j) + Vec::loadu(b + j) : Vec::loadu(row + j);
    };
    if (full) {
      Vec m = logit(0);
      for (j = V; j < full; j += V) m = at::vec::maximum(m, logit(j));
      top[r] = max_lanes(m);
    }
    for (; j < k; ++j) {
      const float l = b ? row[j] + b[j] : row[j];
      top[r] = l > top[r] || std::isnan(l) ? l : top[r];
    }
  }
  Vec s[R], t[R], tv[R];
  for (int r = 0; r < R; ++r) s[r] = t[r] = Vec(0.f), tv[r] = Vec(top[r]);
  for (int64_t j = 0; j < full; j += V) {
    const Vec cj = Vec::loadu(c + j), bj = b ? Vec::loadu(b + j) : Vec(0.f);
    for (int r = 0; r < R; ++r) {
      const Vec e = mish_exp(Vec::loadu(x + r * ld + j) + bj - tv[r]);
      s[r] = s[r] + e;
      t[r] = at::vec::fmadd(e, cj, t[r]);
    }
  }
  if (rest) {  // the last partial vector: lanes past k load as 0 and are masked out of e
    const Vec keep = Vec::set(Vec(0.f), Vec(1.f), rest), cj = Vec::loadu(c + full, rest);
    const Vec bj = b ? Vec::loadu(b + full, rest) : Vec(0.f);
    for (int r = 0; r < R; ++r) {
      const Vec e = mish_exp(Vec::loadu(x + r * ld + full, rest) + bj - tv[r]) * keep;
      s[r] = s[r] + e;
      t[r] = at::vec::fmadd(e, cj, t[r]);
    }
  }
  for (int r = 0; r < R; ++r)  // the mean; symexp follows in symexp_ (vectorised)
    out[r] = std::isfinite(top[r]) ? sum_lanes(t[r]) / sum_lanes(s[r])
                                   : std::numeric_limits<float>::quiet_NaN();  // as softmax's
}

// The means of two_hot_rows for `rows` rows at x (row stride ld) into out[0:rows], four rows
// at a time.
void two_hot_means(const float* x, int64_t ld, int64_t rows, const float* b, const float* c,
                   int64_t k, float* out) {
  int64_t i = 0;
  for (; i + 4 <= rows; i += 4) two_hot_rows<4>(x + i * ld, ld, b, c, k, out + i);
  for (; i < rows; ++i) two_hot_rows<1>(x + i * ld, ld, b, c, k, out + i);
}

// sign(v) * (exp(|v|) - 1) of one value (NaN stays NaN).
float symexp1(float v) { return std::copysign(std::expm1(std::abs(v)), v); }

// v = sign(v) * (exp(|v|) - 1) for n values in place (NaN stays NaN). Every value goes
// through the vector expm1, the last ones in a zero-padded vector, so a value does not
// depend on where a thread's chunk of rows ends (the scalar expm1 rounds differently).
void symexp_(float* v, int64_t n) {
  const int64_t V = Vec::size();
  auto apply = [](const Vec& x) {
    const Vec e = x.abs().expm1();
    return Vec::blendv(e, Vec(0.f) - e, x < Vec(0.f));
  };
  int64_t j = 0;
  for (; j + V <= n; j += V) apply(Vec::loadu(v + j)).store(v + j);
  if (j < n) apply(Vec::loadu(v + j, n - j)).store(v + j, n - j);
}

at::Tensor two_hot_f32(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                       const at::Tensor& centers) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1,
              "two_hot_f32: logits must be float32 [M, K] with rows contiguous");
  TORCH_CHECK(centers.scalar_type() == at::kFloat && centers.dim() == 1 &&
                  centers.size(0) == x.size(1) && x.size(1) > 0,
              "two_hot_f32: centers must be float32 [K] for logits [M, K], K > 0");
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                        bias->size(0) == x.size(1)),
              "two_hot_f32: bias must be float32 [K] for logits [M, K]");
  const at::Tensor cc = centers.contiguous(), bc = bias ? bias->contiguous() : at::Tensor();
  const int64_t m = x.size(0), k = x.size(1), ld = x.stride(0);
  auto out = at::empty({m}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* bp = bias ? bc.data_ptr<float>() : nullptr;
  const float* cp = cc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, m, 64, [&](int64_t begin, int64_t end) {
    two_hot_means(xp + begin * ld, ld, end - begin, bp, cp, k, op + begin);
    symexp_(op + begin, end - begin);
  });
  return out;
}

// The dynamics' output layer after its bias-free product, one pass per row:
//   y = LayerNorm(x + bias) * w + b, then SimNorm: softmax over each group of s entries
// in the planner's internal latent layout, where group g is the entries g, g + L/s, ...,
// g + (s-1) L/s (the model's latent permuted so that a vector holds one entry of L/s groups):
// out[k * L/s + g] = exp(y_kg - max_k y_kg) / sum_k exp(y_kg - max_k y_kg). The exponential is
// mish_exp's (~1e-7 relative; its clamp at -80 drops terms below 1e-34 of the group's largest).
// x [M, L] with rows contiguous (any row stride); bias, w, b [L]; returns a new [M, L].
void ln_simnorm_row(const float* x, const float* bias, const float* w, const float* b,
                    int64_t n, int64_t s, float eps, float* o) {
  const int64_t V = Vec::size(), g = n / s;
  int64_t j = 0;
  Vec acc(0.f);
  for (; j + V <= n; j += V) {
    const Vec v = Vec::loadu(x + j) + Vec::loadu(bias + j);
    v.store(o + j);
    acc = acc + v;
  }
  float sum = sum_lanes(acc);
  for (; j < n; ++j) {
    o[j] = x[j] + bias[j];
    sum += o[j];
  }
  const float mean = sum / n, rstd = row_rstd4(o, n, mean, eps);
  const Vec mv(mean), r(rstd);
  for (j = 0; j + V <= n; j += V)
    ((Vec::loadu(o + j) - mv) * r * Vec::loadu(w + j) + Vec::loadu(b + j)).store(o + j);
  for (; j < n; ++j) o[j] = (o[j] - mean) * rstd * w[j] + b[j];
  int64_t c = 0;
  for (; c + V <= g; c += V) {  // V groups at once: their s entries are s vectors
    Vec top = Vec::loadu(o + c), tot(0.f);
    for (int64_t k = 1; k < s; ++k) top = at::vec::maximum(top, Vec::loadu(o + k * g + c));
    for (int64_t k = 0; k < s; ++k) {
      const Vec e = mish_exp(Vec::loadu(o + k * g + c) - top);
      e.store(o + k * g + c);
      tot = tot + e;
    }
    const Vec inv = Vec(1.f) / tot;  // one division for the s entries
    for (int64_t k = 0; k < s; ++k) (Vec::loadu(o + k * g + c) * inv).store(o + k * g + c);
  }
  for (; c < g; ++c) {  // the rest one group at a time
    float top = o[c], tot = 0.f;
    for (int64_t k = 1; k < s; ++k) top = std::max(top, o[k * g + c]);
    for (int64_t k = 0; k < s; ++k) tot += o[k * g + c] = std::exp(o[k * g + c] - top);
    for (int64_t k = 0; k < s; ++k) o[k * g + c] /= tot;
  }
}

at::Tensor ln_simnorm_f32(const at::Tensor& x, const at::Tensor& bias, const at::Tensor& w,
                          const at::Tensor& b, int64_t groups_of, double eps) {
  const int64_t n = w.numel();
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == n &&
                  x.stride(1) == 1,
              "ln_simnorm_f32: x must be float32 [M, L] with rows contiguous, L = w's size");
  for (const at::Tensor* t : {&bias, &w, &b})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == n,
                "ln_simnorm_f32: bias, w and b must be float32 [L]");
  TORCH_CHECK(groups_of > 0 && n % groups_of == 0,
              "ln_simnorm_f32: the SimNorm group size must divide L");
  const at::Tensor bc = bias.contiguous(), wc = w.contiguous(), bb = b.contiguous();
  const int64_t m = x.size(0), ld = x.stride(0);
  auto out = at::empty({m, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const float *biasp = bc.data_ptr<float>(), *wp = wc.data_ptr<float>();
  const float* bp = bb.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      ln_simnorm_row(xp + i * ld, biasp, wp, bp, n, groups_of, static_cast<float>(eps),
                     op + i * n);
  });
  return out;
}

// Epilogue: what a network's output rows become (kRaw: y with its bias; kTwoHot: the two-hot
// decoding of y, one value per row; kSimNorm: SimNorm(LayerNorm(y)), the next latent).
enum Epilogue : int64_t { kRaw = 0, kTwoHot = 1, kSimNorm = 2 };

// Reference-mode codes of float32 x [M, K] (rows contiguous, any row stride) in E = groups
// groups of M / E consecutive rows, bitwise as quantize_rows_ref (fast_model.py) computes them
// with PyTorch's ops: codes [M + 2E, K] int8 (row i < M: round(d_i / s_i), d_i = x_i - x_g, x_g
// its group's first row; row M + g: hi = round(u), row M + E + g: round((u - hi) * 128), u =
// x_g / s_{M+g}) and scales s [M + E, 1] = max(max_j |row_j|, 1e-12) / 127. Divided, not
// multiplied by a reciprocal, as PyTorch divides. Non-finite inputs give unspecified codes (as
// PyTorch's float-to-int8 conversion does). One call per latent coding of an int8 plan in
// place of PyTorch's dozen (sub, abs, amax, clamp, div, round, cat, conversion).
std::tuple<at::Tensor, at::Tensor> ref_codes(const at::Tensor& x, int64_t groups) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1,
              "ref_codes: x must be float32 [M, K] with rows contiguous");
  const int64_t m = x.size(0), k = x.size(1), ld = x.stride(0);
  TORCH_CHECK(groups >= 1 && m >= groups && m % groups == 0,
              "ref_codes: groups must divide the rows (at least one row each)");
  const int64_t per = m / groups;
  at::Tensor codes = at::empty({m + 2 * groups, k}, x.options().dtype(at::kChar));
  at::Tensor scales = at::empty({m + groups, 1}, x.options());
  const float* xp = x.data_ptr<float>();
  int8_t* qp = codes.data_ptr<int8_t>();
  float* sp = scales.data_ptr<float>();
  const int64_t V = Vec::size();
  at::parallel_for(0, m + groups, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const bool first = i >= m;  // a group's first row, coded whole in two planes
      const int64_t g = first ? i - m : i / per;
      const float* row = xp + (first ? g * per : i) * ld;
      const float* ref = first ? nullptr : xp + g * per * ld;
      Vec mx(0.f);
      float maxabs = 0.f;
      int64_t j = 0;
      for (; j + V <= k; j += V)
        mx = at::vec::maximum(
            mx, (ref ? Vec::loadu(row + j) - Vec::loadu(ref + j) : Vec::loadu(row + j)).abs());
      for (; j < k; ++j) maxabs = std::max(maxabs, std::abs(ref ? row[j] - ref[j] : row[j]));
      code_row<true>(row, ref, k, std::max(maxabs, max_lanes(mx)), qp + i * k,
                     first ? qp + (i + groups) * k : nullptr, sp + i);
    }
  });
  return {codes, scales};
}

// The output layer of an int8 network in reference mode (Dense.ref_product's arithmetic) and
// its epilogue, one pass per row, rows in E groups of M / E:
//   ref_g = (hi_g + lo_g / 128) * s[M + g]               (group g's first row, 15-bit codes)
//   y_i = (acc_i * s[i] + ref_g) * col_scale             (row i of group g, 8-bit codes)
// then kRaw: y_i + bias [M, N]; kTwoHot: two_hot_rows' decoding of y_i + bias [M] (symexp_);
// kSimNorm: ln_simnorm_row of y_i + bias with norm_w, norm_b and groups_of [M, N]. acc
// [M + 2E, >=N] int32 with rows contiguous (the hi rows at M, the lo rows at M + E), s [M + E]:
// the product of quantize_rows_ref's (or ln_mish_int8's reference-mode) codes. Rows are
// independent: a row's value does not depend on the thread count or the batch.
at::Tensor int8_ref_outputs(const at::Tensor& acc, const at::Tensor& scales, int64_t groups,
                            const at::Tensor& col_scale, const at::Tensor& bias, int64_t n,
                            int64_t epilogue, const std::optional<at::Tensor>& centers,
                            const std::optional<at::Tensor>& norm_w,
                            const std::optional<at::Tensor>& norm_b, int64_t groups_of,
                            double eps) {
  const char* op = "int8_ref_outputs";
  TORCH_CHECK(acc.scalar_type() == at::kInt && acc.dim() == 2 && acc.stride(1) == 1 &&
                  acc.size(1) >= n && n > 0,
              op, ": acc must be int32 [M + 2E, >=N] with rows contiguous");
  const int64_t m = acc.size(0) - 2 * groups;
  TORCH_CHECK(groups > 0 && m > 0 && m % groups == 0,
              op, ": the groups must divide the M = rows - 2E product rows");
  at::Tensor sc, cs, bc, cc, wc, nb;
  const float* sp = float_ptr(scales, sc, m + groups, "scales", op);
  const float* csp = float_ptr(col_scale, cs, n, "col_scale", op);
  const float* bp = float_ptr(bias, bc, n, "bias", op);
  TORCH_CHECK(epilogue == kRaw || epilogue == kTwoHot || epilogue == kSimNorm,
              op, ": unknown epilogue ", epilogue);
  const float* cp = epilogue == kTwoHot ? float_ptr(centers, cc, n, "centers", op) : nullptr;
  const float* wp = epilogue == kSimNorm ? float_ptr(norm_w, wc, n, "norm_w", op) : nullptr;
  const float* nbp = epilogue == kSimNorm ? float_ptr(norm_b, nb, n, "norm_b", op) : nullptr;
  TORCH_CHECK(epilogue != kTwoHot || cp, op, ": two_hot needs the bin centres");
  TORCH_CHECK(epilogue != kSimNorm || (wp && nbp && groups_of > 0 && n % groups_of == 0),
              op, ": simnorm needs norm_w, norm_b and a group size dividing N");
  const int32_t* ap = acc.data_ptr<int32_t>();
  const int64_t ld = acc.stride(0), rows = m / groups, V = Vec::size();
  using IVec = at::vec::Vectorized<int32_t>;
  std::vector<float> ref(groups * n);  // the groups' first rows, as ref_product sums them
  for (int64_t g = 0; g < groups; ++g) {
    const int32_t *hi = ap + (m + g) * ld, *lo = ap + (m + groups + g) * ld;
    const float s = sp[m + g];
    float* r = ref.data() + g * n;
    int64_t j = 0;
    for (; j + V <= n; j += V)
      ((at::vec::convert<float>(IVec::loadu(lo + j)) / Vec(kLoPlane) +
        at::vec::convert<float>(IVec::loadu(hi + j))) * Vec(s)).store(r + j);
    for (; j < n; ++j) r[j] = (float(lo[j]) / kLoPlane + float(hi[j])) * s;
  }
  // row i without the bias into o[0:n]
  auto dequant = [&](int64_t i, float* o) {
    const int32_t* row = ap + i * ld;
    const float* r = ref.data() + (i / rows) * n;
    const Vec s(sp[i]);
    int64_t j = 0;
    for (; j + V <= n; j += V)
      ((at::vec::convert<float>(IVec::loadu(row + j)) * s + Vec::loadu(r + j)) *
       Vec::loadu(csp + j)).store(o + j);
    for (; j < n; ++j) o[j] = (float(row[j]) * sp[i] + r[j]) * csp[j];
  };
  const float e = static_cast<float>(eps);
  auto out = epilogue == kTwoHot ? at::empty({m}, bias.options())
                                 : at::empty({m, n}, bias.options());
  float* outp = out.data_ptr<float>();
  constexpr int64_t kBlock = 16;  // rows dequantised at once for the decoding
  at::parallel_for(0, m, kBlock, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(kBlock * n);
    if (epilogue == kTwoHot) {
      for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
        const int64_t b1 = std::min(end, b0 + kBlock);
        for (int64_t i = b0; i < b1; ++i) dequant(i, buf.data() + (i - b0) * n);
        two_hot_means(buf.data(), n, b1 - b0, bp, cp, n, outp + b0);
      }
      symexp_(outp + begin, end - begin);
      return;
    }
    for (int64_t i = begin; i < end; ++i) {
      if (epilogue == kSimNorm) {
        dequant(i, buf.data());
        ln_simnorm_row(buf.data(), bp, wp, nbp, n, groups_of, e, outp + i * n);
      } else {
        float* o = outp + i * n;
        dequant(i, o);
        int64_t j = 0;
        for (; j + V <= n; j += V) (Vec::loadu(bp + j) + Vec::loadu(o + j)).store(o + j);
        for (; j < n; ++j) o[j] = bp[j] + o[j];
      }
    }
  });
  return out;
}

// Whole float32 TD-MPC2 networks (two LayerNorm+Mish layers, then a plain output layer),
// one or more at once (P networks, e.g. dynamics and reward on the same inputs):
//   h1 = mish(LN1(x @ w1 + base + a @ wa)), h2 = mish(LN2(h1 @ w2 + b2)), y = h2 @ w3 + b3
// -> a new [M_p, N3_p] per network, in one parallel region: every thread takes one contiguous
// block of rows (at least kMinRows) of every network through all three layers, with
// one-thread BLAS products and the row kernel on the rows its own products just wrote, so the
// threads never wait for each other (or for the dispatch of the next operation) between
// layers, nor between networks. x [M, K] float32 rows contiguous, or absent (the first
// layer's latent part already in base); base [G, >=D], a and wa as for ln_mish_f32; weights
// [in, out] with rows contiguous: w1 [K, D], w2 [D, D], w3 [D, N3]; b2 [D], b3 [N3],
// LayerNorm affines [D].
constexpr int64_t kMinRows = 16;  // BLAS rounds products of fewer rows differently

// out = in @ w (+ bias) on the calling thread; fewer than kMinRows rows go through a
// zero-padded block of kMinRows rows, so a row's numbers never depend on the block's size.
void block_product(at::Tensor out, const at::Tensor& in, const at::Tensor& w,
                   const at::Tensor* bias) {
  const int64_t rows = in.size(0);
  if (rows < kMinRows) {
    at::Tensor padded = at::zeros({kMinRows, in.size(1)}, in.options());
    padded.slice(0, 0, rows).copy_(in);
    out.copy_((bias ? at::addmm(*bias, padded, w) : at::mm(padded, w)).slice(0, 0, rows));
  } else if (bias) {
    at::addmm_out(out, *bias, in, w);
  } else {
    at::mm_out(out, in, w);
  }
}

// One network's checked arguments and buffers.
struct Net {
  std::optional<at::Tensor> x, w1;
  at::Tensor ln1_w, ln1_b, w2, b2, ln2_w, ln2_b, w3, b3, h1, h2, out;
  F32Parts parts;
  int64_t m = 0, d = 0;
};

Net check_net(const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& w1,
              const std::optional<at::Tensor>& base, const std::optional<at::Tensor>& a,
              const std::optional<at::Tensor>& wa, const at::Tensor& ln1_w,
              const at::Tensor& ln1_b, const at::Tensor& w2, const at::Tensor& b2,
              const at::Tensor& ln2_w, const at::Tensor& ln2_b, const at::Tensor& w3,
              const at::Tensor& b3) {
  const char* op = "mlps_f32";
  TORCH_CHECK(x || (a && a->dim() == 2), op, ": needs x or a [M, A]");
  Net net;
  net.d = ln1_w.numel();
  const int64_t d = net.d, n3 = w3.dim() == 2 ? w3.size(1) : 0;
  net.m = x ? x->size(0) : a->size(0);
  auto vec = [d](const at::Tensor& t) {
    return t.scalar_type() == at::kFloat && t.dim() == 1 && t.numel() == d && t.is_contiguous();
  };
  auto mat = [](const at::Tensor& t, int64_t rows, int64_t cols) {
    return t.scalar_type() == at::kFloat && t.dim() == 2 && t.size(0) == rows &&
           (cols < 0 || t.size(1) == cols) && t.stride(1) == 1;
  };
  TORCH_CHECK(vec(ln1_w) && vec(ln1_b) && vec(ln2_w) && vec(ln2_b) && vec(b2), op,
              ": LayerNorm affines and b2 must be float32 [D], contiguous");
  TORCH_CHECK(mat(w2, d, d) && mat(w3, d, -1) && b3.scalar_type() == at::kFloat &&
                  b3.dim() == 1 && b3.numel() == n3 && b3.is_contiguous(),
              op, ": w2 must be float32 [D, D], w3 [D, N3], b3 [N3] (rows contiguous)");
  TORCH_CHECK(!x == !w1, op, ": x and w1 come together");
  TORCH_CHECK(!x || (mat(*x, net.m, -1) && mat(*w1, x->size(1), d)),
              op, ": x must be float32 [M, K] and w1 [K, D] (rows contiguous)");
  TORCH_CHECK(net.m > 0, op, ": needs rows");
  net.parts = f32_parts(base, a, wa, net.m, d, op);
  net.x = x;
  net.w1 = w1;
  net.ln1_w = ln1_w, net.ln1_b = ln1_b, net.w2 = w2, net.b2 = b2;
  net.ln2_w = ln2_w, net.ln2_b = ln2_b, net.w3 = w3, net.b3 = b3;
  net.h1 = at::empty({net.m, d}, w2.options());
  net.h2 = at::empty({net.m, d}, w2.options());
  net.out = at::empty({net.m, n3}, w2.options());
  return net;
}

// Rows r0..r1 of one network through its three layers, on the calling thread.
void run_block(const Net& net, int64_t r0, int64_t r1, float e) {
  const F32Parts& p = net.parts;
  const int64_t d = net.d;
  float *p1 = net.h1.data_ptr<float>(), *p2 = net.h2.data_ptr<float>();
  const at::Tensor in1 = net.h1.slice(0, r0, r1), in2 = net.h2.slice(0, r0, r1);
  if (net.x) block_product(in1, net.x->slice(0, r0, r1), *net.w1, nullptr);
  for (int64_t i = r0; i < r1; ++i)
    ln_mish_f32_row(net.x ? p1 + i * d : nullptr, p.bsp ? p.bsp + (i / p.per) * p.ldb : nullptr,
                    p.ap ? p.ap + i * p.na : nullptr, p.na, p.wap, p.ldw,
                    net.ln1_w.data_ptr<float>(), net.ln1_b.data_ptr<float>(), d, e, p1 + i * d);
  block_product(in2, in1, net.w2, nullptr);
  for (int64_t i = r0; i < r1; ++i)
    ln_mish_f32_row(p2 + i * d, net.b2.data_ptr<float>(), nullptr, 0, nullptr, 0,
                    net.ln2_w.data_ptr<float>(), net.ln2_b.data_ptr<float>(), d, e, p2 + i * d);
  block_product(net.out.slice(0, r0, r1), in2, net.w3, &net.b3);
}

std::vector<at::Tensor> mlps_f32(
    const std::vector<std::optional<at::Tensor>>& x,
    const std::vector<std::optional<at::Tensor>>& w1,
    const std::vector<std::optional<at::Tensor>>& base,
    const std::vector<std::optional<at::Tensor>>& a,
    const std::vector<std::optional<at::Tensor>>& wa, at::TensorList ln1_w,
    at::TensorList ln1_b, at::TensorList w2, at::TensorList b2, at::TensorList ln2_w,
    at::TensorList ln2_b, at::TensorList w3, at::TensorList b3, double eps) {
  const size_t nets = x.size();
  TORCH_CHECK(nets > 0 && w1.size() == nets && base.size() == nets && a.size() == nets &&
                  wa.size() == nets && ln1_w.size() == nets && ln1_b.size() == nets &&
                  w2.size() == nets && b2.size() == nets && ln2_w.size() == nets &&
                  ln2_b.size() == nets && w3.size() == nets && b3.size() == nets,
              "mlps_f32: every argument list needs one entry per network");
  std::vector<Net> net;
  for (size_t k = 0; k < nets; ++k)
    net.push_back(check_net(x[k], w1[k], base[k], a[k], wa[k], ln1_w[k], ln1_b[k], w2[k], b2[k],
                            ln2_w[k], ln2_b[k], w3[k], b3[k]));
  struct Task {
    size_t net;
    int64_t r0, r1;
  };
  std::vector<Task> tasks;  // thread by thread: its block of every network
  const int64_t threads = at::get_num_threads();
  for (int64_t t = 0; t < threads; ++t)
    for (size_t k = 0; k < nets; ++k) {
      const int64_t m = net[k].m, blocks = std::max<int64_t>(1, std::min(threads, m / kMinRows));
      if (t < blocks) tasks.push_back({k, m * t / blocks, m * (t + 1) / blocks});
    }
  const float e = static_cast<float>(eps);
  at::parallel_for(0, int64_t(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) run_block(net[tasks[t].net], tasks[t].r0, tasks[t].r1, e);
  });
  std::vector<at::Tensor> out;
  for (const Net& n : net) out.push_back(n.out);
  return out;
}

// ------------------------------------------------------------------ panel-packed networks
// Whole float32 networks as mlps_f32 computes them, on this file's own products instead of
// BLAS (AVX-512 and AVX2): weights packed once into column panels (pack below) that stay in a
// core's cache, and rows taken kPackedBlock at a time through all three layers, so a block's
// activations never leave the core between layers. Each output is one FMA chain over k in
// order (k = 0..K-1), so a row's numbers do not depend on the block, thread or batch it is
// computed in. The products' chains are the same on AVX2, whose panels are 16 columns (two
// 8-float vectors) where AVX-512's are 64; the row kernels' sums follow the vector width.
// MKL's AVX-512 kernels sum these products in the same order: the values came out bitwise
// equal to mlps_f32's there; its AVX2 kernels sum in another order (eager plans' actions up
// to 7e-6 apart on the 1M model). Tests allow float32 rounding.
//
// Packed weight of w [K, N] (y = x @ w): N rounded up to a multiple of 16 (zero columns) and
// cut into panels of kPanel columns (AVX-512: 64, the last one 16, 32, 48 or 64 wide; AVX2:
// 16); panel p is w[:, n0:n0+width] stored [K][width], the panels one after another:
// K * round16(N) floats.
// A network's parameters, packed into one float32 vector (network_params_size): the first
// layer's latent weights packed [K1 x D] (K1 = 0: none), its action weights [A, D] as they
// are (A = 0: none), LayerNorm 1 weight and bias [D], the second layer's weights packed
// [D x D] and bias [D], LayerNorm 2 weight and bias [D], the output weights packed [D x N3]
// and bias [round16(N3)] (zero beyond N3).
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// Panel width: 64 columns on AVX-512 (4 vectors of 16); 16 on AVX2 (two vectors of 8), so
// that the K x 16 floats its kernel walks down are contiguous: 256-byte rows of 64-wide panels
// map to a quarter of L1's sets, and float32 plans on AVX2 were 10-12% slower with them
// (session 26).
#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kPanel = 64, kPackedBlock = 24;
#else
constexpr int64_t kPanel = 16, kPackedBlock = 24;
#endif

int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

int64_t network_params_size(int64_t k1, int64_t na, int64_t d, int64_t n3) {
  return k1 * d + na * d + 2 * d + d * d + d + 2 * d + d * round16(n3) + round16(n3);
}

// f(std::integral_constant<int, R>{}, r0) over rows 0..rows-1: 6 rows at a time, then the last
// 1-5 rows in one call (each call one pass of a product kernel over its weights).
template <class F>
void by_row_groups(int64_t rows, F&& f) {
  int64_t r = 0;
  for (; r + 6 <= rows; r += 6) f(std::integral_constant<int, 6>{}, r);
  switch (rows - r) {
    case 5: return f(std::integral_constant<int, 5>{}, r);
    case 4: return f(std::integral_constant<int, 4>{}, r);
    case 3: return f(std::integral_constant<int, 3>{}, r);
    case 2: return f(std::integral_constant<int, 2>{}, r);
    case 1: return f(std::integral_constant<int, 1>{}, r);
    default: return;
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// C[r, 0:16 NV] = A[r, :] @ panel for R rows; panel [K][16 NV]; A row stride lda.
template <int R, int NV>
void panel_rows(const float* a, int64_t lda, const float* panel, int64_t k, float* c,
                int64_t ldc) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t j = 0; j < k; ++j) {
    __m512 w[NV];
    for (int v = 0; v < NV; ++v) w[v] = _mm512_loadu_ps(panel + j * 16 * NV + 16 * v);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_set1_ps(a[r * lda + j]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(x, w[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + r * ldc + 16 * v, acc[r][v]);
}

template <int R>
void panel_rows_nv(int nv, const float* a, int64_t lda, const float* panel, int64_t k,
                   float* c, int64_t ldc) {
  switch (nv) {
    case 4: return panel_rows<R, 4>(a, lda, panel, k, c, ldc);
    case 3: return panel_rows<R, 3>(a, lda, panel, k, c, ldc);
    case 2: return panel_rows<R, 2>(a, lda, panel, k, c, ldc);
    default: return panel_rows<R, 1>(a, lda, panel, k, c, ldc);
  }
}

// c[0:rows, 0:16 nv] = a[0:rows, 0:k] @ panel [k][16 nv].
void panel_product(int nv, const float* a, int64_t lda, int64_t rows, const float* panel,
                   int64_t k, float* c, int64_t ldc) {
  by_row_groups(rows, [&](auto group, int64_t r) {
    panel_rows_nv<decltype(group)::value>(nv, a + r * lda, lda, panel, k, c + r * ldc, ldc);
  });
}
#else
// AVX2 has 16 vector registers: a panel (16 columns here, two 8-float vectors) is taken R <= 6
// rows at a time (12 accumulators, 2 weight vectors, 1 broadcast input).
// C[r, 0:16] = A[r, :] @ panel for R rows; panel [K][16].
template <int R>
void panel_rows(const float* a, int64_t lda, const float* panel, int64_t k, float* c,
                int64_t ldc) {
  __m256 acc[R][2];  // every loop over it fully unrolled, so that it lives in registers
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) acc[r][0] = _mm256_setzero_ps(), acc[r][1] = _mm256_setzero_ps();
  for (int64_t j = 0; j < k; ++j) {
    const __m256 w0 = _mm256_loadu_ps(panel + j * 16), w1 = _mm256_loadu_ps(panel + j * 16 + 8);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256 x = _mm256_broadcast_ss(a + r * lda + j);
      acc[r][0] = _mm256_fmadd_ps(x, w0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(x, w1, acc[r][1]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(c + r * ldc, acc[r][0]);
    _mm256_storeu_ps(c + r * ldc + 8, acc[r][1]);
  }
}

// c[0:rows, 0:16] = a[0:rows, 0:k] @ panel [k][16] (nv is 1: kPanel is 16 here).
void panel_product(int /*nv*/, const float* a, int64_t lda, int64_t rows, const float* panel,
                   int64_t k, float* c, int64_t ldc) {
  by_row_groups(rows, [&](auto group, int64_t r) {
    panel_rows<decltype(group)::value>(a + r * lda, lda, panel, k, c + r * ldc, ldc);
  });
}
#endif

// c[0:rows, 0:round16(n)] = a[0:rows, 0:k] @ packed w [k x n] (+ bias [round16(n)] if given).
void packed_product(const float* a, int64_t lda, int64_t rows, const float* packed, int64_t k,
                    int64_t n, const float* bias, float* c, int64_t ldc) {
  const int64_t width = round16(n);
  for (int64_t n0 = 0; n0 < width; n0 += kPanel)
    panel_product(static_cast<int>(std::min(kPanel, width - n0) / 16), a, lda, rows,
                  packed + k * n0, k, c + n0, ldc);
  if (bias)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < width; j += Vec::size())
        (Vec::loadu(c + r * ldc + j) + Vec::loadu(bias + j)).store(c + r * ldc + j);
}

// One network's pointers into its parameter vector (see network_params_size).
struct PackedNet {
  const float *w1, *wa, *ln1_w, *ln1_b, *w2, *b2, *ln2_w, *ln2_b, *w3, *b3;
  const float* base;
  int64_t ldb = 0, per = 1, n3 = 0, epilogue = kRaw;
  float* out;
};

// The epilogues' shared inputs: bin centres [N3] (kTwoHot), the LayerNorm affine [N3] and
// SimNorm group size (kSimNorm).
struct EpilogueArgs {
  const float *centers = nullptr, *norm_w = nullptr, *norm_b = nullptr;
  int64_t groups_of = 0;
};

PackedNet packed_net(const at::Tensor& params, const at::Tensor& base, int64_t k1, int64_t na,
                     int64_t d, int64_t n3, int64_t epilogue, int64_t m, at::Tensor& out) {
  const char* op = "mlp_pair_f32";
  TORCH_CHECK(params.scalar_type() == at::kFloat && params.dim() == 1 &&
                  params.is_contiguous() &&
                  params.numel() == network_params_size(k1, na, d, n3),
              op, ": params must be a contiguous float32 vector of network_params_size floats");
  TORCH_CHECK(base.scalar_type() == at::kFloat && base.dim() == 2 && base.size(1) >= d &&
                  base.stride(1) == 1 && base.size(0) > 0 && m % base.size(0) == 0,
              op, ": base must be float32 [G, >=D] (rows contiguous) with G dividing M");
  PackedNet p;
  const float* q = params.data_ptr<float>();
  auto take = [&q](int64_t n) { const float* at = q; q += n; return at; };
  p.w1 = take(k1 * d), p.wa = take(na * d), p.ln1_w = take(d), p.ln1_b = take(d);
  p.w2 = take(d * d), p.b2 = take(d), p.ln2_w = take(d), p.ln2_b = take(d);
  p.w3 = take(d * round16(n3)), p.b3 = take(round16(n3));
  p.base = base.data_ptr<float>(), p.ldb = base.stride(0), p.per = m / base.size(0);
  p.n3 = n3, p.epilogue = epilogue;
  out = epilogue == kTwoHot ? at::empty({m}, params.options())
                            : at::empty({m, epilogue == kSimNorm ? n3 : round16(n3)},
                                        params.options());
  p.out = out.data_ptr<float>();
  return p;
}

// Rows r0..r1 of network p through its three layers, kPackedBlock rows at a time; h1, h2:
// this thread's [kPackedBlock, d] buffers.
void run_packed_rows(const PackedNet& p, const EpilogueArgs& epi, const float* x, int64_t k1,
                     const float* a, int64_t na, int64_t d, int64_t r0, int64_t r1, float e,
                     float* h1, float* h2, float* h3) {
  const int64_t ldo = round16(p.n3);
  for (int64_t b0 = r0; b0 < r1; b0 += kPackedBlock) {
    const int64_t rows = std::min(kPackedBlock, r1 - b0);
    if (x) packed_product(x + b0 * k1, k1, rows, p.w1, k1, d, nullptr, h1, d);
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t row = b0 + i;
      ln_mish_f32_row(x ? h1 + i * d : nullptr, p.base + (row / p.per) * p.ldb,
                      a ? a + row * na : nullptr, a ? na : 0, p.wa, d, p.ln1_w, p.ln1_b, d, e,
                      h1 + i * d);
    }
    packed_product(h1, d, rows, p.w2, d, d, nullptr, h2, d);
    for (int64_t i = 0; i < rows; ++i)
      ln_mish_f32_row(h2 + i * d, p.b2, nullptr, 0, nullptr, 0, p.ln2_w, p.ln2_b, d, e,
                      h2 + i * d);
    if (p.epilogue == kRaw) {
      packed_product(h2, d, rows, p.w3, d, p.n3, p.b3, p.out + b0 * ldo, ldo);
      continue;
    }
    packed_product(h2, d, rows, p.w3, d, p.n3, nullptr, h3, ldo);  // bias in the epilogue
    if (p.epilogue == kSimNorm) {
      for (int64_t i = 0; i < rows; ++i)
        ln_simnorm_row(h3 + i * ldo, p.b3, epi.norm_w, epi.norm_b, p.n3, epi.groups_of, e,
                       p.out + (b0 + i) * p.n3);
      continue;
    }
    two_hot_means(h3, ldo, rows, p.b3, epi.centers, p.n3, p.out + b0);
    // symexp one value at a time, the same for every row. symexp_ (row-invariant too since
    // a6d3eac) rounds some values differently and would change which elite compiled plans
    // pick on 17 of 120 test states, so the scalar path stays.
    for (int64_t i = 0; i < rows; ++i)
      p.out[b0 + i] = symexp1(p.out[b0 + i]);
  }
}
#endif

// One or two float32 networks on the same inputs (dynamics and reward; two Q members; the
// policy alone), each given by its packed parameters (above): x [M, K1] latents (rows
// contiguous) or None (their part already in base), a [M, A] action inputs or None, base_i
// [G, >=D] the first layer's bias per group of rows. Returns per network its epilogue's
// result: kRaw [M, N3] (a view of a [M, round16(N3)] buffer; bias added), kTwoHot [M]
// (two_hot_rows with the centres [N3], symexp one value at a time), kSimNorm [M, N3]
// (ln_simnorm_row with norm_w, norm_b [N3] and groups_of); the second empty without a second
// network. Two networks on two or more threads: each takes half of the threads, every thread
// a contiguous block of its network's rows; otherwise every thread a block of each network's.
std::tuple<at::Tensor, at::Tensor> mlp_pair_f32(
    const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& a,
    const at::Tensor& base0, const at::Tensor& params0, int64_t n3_0, int64_t epilogue0,
    const std::optional<at::Tensor>& base1, const std::optional<at::Tensor>& params1,
    int64_t n3_1, int64_t epilogue1, int64_t d, double eps,
    const std::optional<at::Tensor>& centers, const std::optional<at::Tensor>& norm_w,
    const std::optional<at::Tensor>& norm_b, int64_t groups_of) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  const char* op = "mlp_pair_f32";
  TORCH_CHECK(x || a, op, ": needs x or a");
  TORCH_CHECK(!base1 == !params1, op, ": base1 and params1 come together");
  TORCH_CHECK(!x || (x->scalar_type() == at::kFloat && x->dim() == 2 && x->stride(1) == 1),
              op, ": x must be float32 [M, K1] with rows contiguous");
  TORCH_CHECK(!a || (a->scalar_type() == at::kFloat && a->dim() == 2), op,
              ": a must be float32 [M, A]");
  const int64_t m = x ? x->size(0) : a->size(0);
  TORCH_CHECK(!x || !a || a->size(0) == m, op, ": x and a need the same rows");
  const at::Tensor xc = x ? x->contiguous() : at::Tensor(), ac = a ? a->contiguous() : at::Tensor();
  const int64_t k1 = x ? xc.size(1) : 0, na = a ? ac.size(1) : 0;
  // the first layer's latent weights are in params whether or not x is given this call
  const int64_t k1_params = x ? k1 : -1;
  at::Tensor out0, out1;
  EpilogueArgs epi;
  at::Tensor cc, nw, nb;  // contiguous copies the pointers in epi point into
  auto vec = [&](const std::optional<at::Tensor>& t, int64_t n, at::Tensor& keep,
                 const char* what) -> const float* {
    TORCH_CHECK(t && t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == n, op,
                ": ", what, " must be float32 [N3] for this epilogue");
    keep = t->contiguous();
    return keep.data_ptr<float>();
  };
  auto check_epilogue = [&](int64_t kind, int64_t n3) {
    TORCH_CHECK(kind == kRaw || kind == kTwoHot || kind == kSimNorm, op,
                ": epilogue must be 0 (raw), 1 (two-hot) or 2 (LayerNorm + SimNorm)");
    if (kind == kTwoHot) epi.centers = vec(centers, n3, cc, "centers");
    if (kind == kSimNorm) {
      epi.norm_w = vec(norm_w, n3, nw, "norm_w"), epi.norm_b = vec(norm_b, n3, nb, "norm_b");
      TORCH_CHECK(groups_of > 0 && n3 % groups_of == 0, op,
                  ": the SimNorm group size must divide N3");
      epi.groups_of = groups_of;
    }
  };
  auto make = [&](const at::Tensor& params, const at::Tensor& base, int64_t n3, int64_t kind,
                  at::Tensor& out) {
    check_epilogue(kind, n3);
    int64_t k = k1_params;
    if (k < 0) {  // infer K1 from the vector's size
      const int64_t rest = params.numel() - network_params_size(0, na, d, n3);
      TORCH_CHECK(d > 0 && rest >= 0 && rest % d == 0, op, ": params do not fit these sizes");
      k = rest / d;
    }
    return packed_net(params, base, k, na, d, n3, kind, m, out);
  };
  std::vector<PackedNet> nets{make(params0, base0, n3_0, epilogue0, out0)};
  if (params1) nets.push_back(make(*params1, *base1, n3_1, epilogue1, out1));
  const float* xp = x ? xc.data_ptr<float>() : nullptr;
  const float* ap = a ? ac.data_ptr<float>() : nullptr;
  const float e = static_cast<float>(eps);
  int64_t widest = 0;
  for (const PackedNet& p : nets) widest = std::max(widest, round16(p.n3));
  // Two networks and two or more threads: each network gets its own half of the threads, so a
  // core reads one network's weights per call instead of both (plans 1.4-2.6% faster than
  // every thread taking rows of both, 1M model, two threads). Otherwise every thread takes a
  // block of rows of each network. A row's values are the same either way.
  const int64_t threads = at::get_num_threads();
  const bool by_network = nets.size() == 2 && threads >= 2;
  const int64_t first_threads = by_network ? threads / 2 : threads;
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> h(kPackedBlock * (2 * d + widest));
    float *h1 = h.data(), *h2 = h1 + kPackedBlock * d, *h3 = h2 + kPackedBlock * d;
    for (int64_t t = t0; t < t1; ++t) {
      if (!by_network) {
        for (const PackedNet& p : nets)
          run_packed_rows(p, epi, xp, k1, ap, na, d, m * t / threads, m * (t + 1) / threads,
                          e, h1, h2, h3);
        continue;
      }
      const bool second = t >= first_threads;
      const int64_t i = second ? t - first_threads : t;
      const int64_t n = second ? threads - first_threads : first_threads;
      run_packed_rows(nets[second], epi, xp, k1, ap, na, d, m * i / n, m * (i + 1) / n, e, h1,
                      h2, h3);
    }
  });
  if (epilogue0 == kRaw) out0 = out0.narrow(1, 0, n3_0);
  if (!params1) out1 = at::empty({0}, params0.options());
  else if (epilogue1 == kRaw) out1 = out1.narrow(1, 0, n3_1);
  return {out0, out1};
#else
  TORCH_CHECK(false, "mlp_pair_f32 is built for AVX-512 and AVX2 CPUs only");
#endif
}

bool mlp_pair_built() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  return true;
#else
  return false;
#endif
}

// The panel width packed weights are cut into for mlp_pair_f32 here (0: not built).
int64_t mlp_pair_panel() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  return kPanel;
#else
  return 0;
#endif
}

}  // namespace

// The op's name carries a version that changes with its schema: inductor caches compiled
// graphs (with their C++ calls of the op) by op name, so a renamed op never meets a stale one.
TORCH_LIBRARY(tdmpc_opt_cpu, m) {
  m.def("ln_mish_int8_v3(Tensor base, Tensor? acc, Tensor? col_scale, Tensor? row_scale, "
        "Tensor? a, Tensor? wa, Tensor w, Tensor b, float eps, bool wide=False, "
        "int ref_groups=0) -> (Tensor, Tensor)");
  m.def("ln_mish_f32_v2(Tensor? x, Tensor? base, Tensor? a, Tensor? wa, Tensor w, Tensor b, "
        "float eps) -> Tensor");
  m.def("mlps_f32_v1(Tensor?[] x, Tensor?[] w1, Tensor?[] base, Tensor?[] a, Tensor?[] wa, "
        "Tensor[] ln1_w, Tensor[] ln1_b, Tensor[] w2, Tensor[] b2, Tensor[] ln2_w, "
        "Tensor[] ln2_b, Tensor[] w3, Tensor[] b3, float eps) -> Tensor[]");
  m.def("two_hot_f32_v1(Tensor x, Tensor? bias, Tensor centers) -> Tensor");
  m.def("ln_simnorm_f32_v1(Tensor x, Tensor bias, Tensor w, Tensor b, int groups_of, "
        "float eps) -> Tensor");
  m.def("mlp_pair_f32_v2(Tensor? x, Tensor? a, Tensor base0, Tensor params0, int n3_0, "
        "int epilogue0, Tensor? base1, Tensor? params1, int n3_1, int epilogue1, int d, "
        "float eps, Tensor? centers, Tensor? norm_w, Tensor? norm_b, int groups_of) "
        "-> (Tensor, Tensor)");
  m.def("int8_ref_outputs_v1(Tensor acc, Tensor scales, int groups, Tensor col_scale, "
        "Tensor bias, int n, int epilogue, Tensor? centers, Tensor? norm_w, Tensor? norm_b, "
        "int groups_of, float eps) -> Tensor");
  m.def("ref_codes_v1(Tensor x, int groups) -> (Tensor, Tensor)");
  m.def("mlp_pair_built() -> bool", &mlp_pair_built);
  m.def("mlp_pair_panel() -> int", &mlp_pair_panel);
}

TORCH_LIBRARY_IMPL(tdmpc_opt_cpu, CPU, m) {
  m.impl("ln_mish_int8_v3", &ln_mish_int8);
  m.impl("ln_mish_f32_v2", &ln_mish_f32);
  m.impl("mlps_f32_v1", &mlps_f32);
  m.impl("two_hot_f32_v1", &two_hot_f32);
  m.impl("ln_simnorm_f32_v1", &ln_simnorm_f32);
  m.impl("mlp_pair_f32_v2", &mlp_pair_f32);
  m.impl("int8_ref_outputs_v1", &int8_ref_outputs);
  m.impl("ref_codes_v1", &ref_codes);
}
