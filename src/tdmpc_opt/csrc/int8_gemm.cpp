// Exact int8 matrix products on AVX2 CPUs that have no VNNI (where PyTorch's torch._int_mm
// runs a reference loop):  out[M, N] int32 = x[M, K] int8 @ w[K, N] int8, equal to _int_mm.
//
// The only AVX2 int8 multiply, vpmaddubsw, takes an unsigned and a signed operand and adds
// each pair of products into a *saturating* int16. With |x| <= 128 as the unsigned operand
// and w * sign(x) (|w| <= 127) as the signed one, a pair sums to at most 2 * 128 * 127 =
// 32512 < 2^15, so nothing saturates and every product keeps its sign; vpmaddwd with ones
// then adds pairs of pairs into int32 lanes. Weights of -128 are refused at packing (their
// sign cannot be flipped in int8); the planner's weights are symmetric codes in [-127, 127].
//
// Layout: the weight is packed once into panels of 16 columns, [ceil(N/16)][ceil(K/4)][16][4]
// (4 consecutive k of one column in one int32 lane), zero-padded. A 4-row x 16-column block
// of the output (or 2 x 32, two panels at once) lives in 8 registers for the whole K loop. The
// work is split into (panel, 64-row chunk) tasks over the OpenMP threads; integer sums are
// exact, so the result does not depend on the thread count or the split. Measured on a 2-core
// Zen 3 (benchmarks/README.md): about 1.4x float32 BLAS for the planner's shapes at first,
// 5-10% more with two panels per pass (session 27).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kPanel = 16;  // output columns per packed panel (two 8-lane registers)
constexpr int64_t kRows = 4;    // output rows per register block
constexpr int64_t kChunk = 64;  // rows per parallel task

#if defined(__AVX2__)
// out[r, 0:16 P] = sum_k x[r, k] w[k, col] for R rows and P panels side by side (b: the first,
// the others panel_size bytes apart); the last panel's first last_cols columns are written.
// Two panels share each row's broadcast and abs: products ~5-10% faster (session 27).
template <int R, int P>
void block(const int8_t* x, int64_t ldx, const int8_t* b, int64_t panel_size, int64_t k4,
           int32_t* out, int64_t ldo, int64_t last_cols) {
  constexpr int V = 2 * P;  // 8-lane column vectors
  __m256i acc[R][V];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[r][v] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  // unrolled: 12-14% faster with two threads on Zen 3, the same with one (benchmarks/README.md)
#pragma GCC unroll 4
  for (int64_t k = 0; k < k4; ++k) {
    __m256i w[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v)
      w[v] = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(b + (v / 2) * panel_size + k * 64 + (v % 2) * 32));
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      int32_t four;
      std::memcpy(&four, x + r * ldx + k * 4, 4);
      const __m256i xs = _mm256_set1_epi32(four);
      const __m256i xu = _mm256_abs_epi8(xs);  // -128 -> 0x80, i.e. 128 unsigned
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) {
        const __m256i pairs = _mm256_maddubs_epi16(xu, _mm256_sign_epi8(w[v], xs));
        acc[r][v] = _mm256_add_epi32(acc[r][v], _mm256_madd_epi16(pairs, ones));
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    int32_t* row = out + r * ldo;
#pragma GCC unroll 4
    for (int v = 0; v < V - 2; ++v)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + 8 * v), acc[r][v]);
    int32_t* tail = row + 16 * (P - 1);
    if (last_cols == kPanel) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(tail), acc[r][V - 2]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(tail + 8), acc[r][V - 1]);
    } else {
      alignas(32) int32_t tmp[kPanel];
      _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), acc[r][V - 2]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(tmp + 8), acc[r][V - 1]);
      std::copy(tmp, tmp + last_cols, tail);
    }
  }
}
#endif

at::Tensor int8_pack(const at::Tensor& w) {
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 2,
              "int8_pack: needs an int8 [K, N] weight");
  TORCH_CHECK(w.numel() == 0 || w.min().item<int8_t>() > -128,
              "int8_pack: weights must lie in [-127, 127]");
  const int64_t k = w.size(0), n = w.size(1);
  const int64_t k4 = (k + 3) / 4, panels = (n + kPanel - 1) / kPanel;
  at::Tensor packed = at::zeros({panels, k4, kPanel, 4}, w.options());
  const auto src = w.accessor<int8_t, 2>();
  int8_t* dst = packed.data_ptr<int8_t>();
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < n; ++j)
      dst[((j / kPanel) * k4 + i / 4) * kPanel * 4 + (j % kPanel) * 4 + i % 4] = src[i][j];
  return packed;
}

at::Tensor int8_mm_packed(const at::Tensor& x_in, const at::Tensor& packed, int64_t n) {
#if defined(__AVX2__)
  TORCH_CHECK(x_in.scalar_type() == at::kChar && x_in.dim() == 2,
              "int8_mm_packed: needs int8 [M, K] inputs");
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.dim() == 4 &&
                  packed.size(2) == kPanel && packed.size(3) == 4 && packed.is_contiguous(),
              "int8_mm_packed: the weight must come from int8_pack");
  const int64_t m = x_in.size(0), k = x_in.size(1), k4 = packed.size(1);
  TORCH_CHECK((k + 3) / 4 == k4 && n > 0 && (n + kPanel - 1) / kPanel == packed.size(0),
              "int8_mm_packed: inputs [", m, ", ", k, "] do not match the packed weight");
  at::Tensor out = at::empty({m, n}, x_in.options().dtype(at::kInt));
  if (m == 0) return out;
  // rows read 4 bytes at a time: pad K to a multiple of 4 (zeros add nothing)
  at::Tensor x = x_in;
  if (k % 4 != 0 || x.stride(1) != 1) {
    x = at::zeros({m, k4 * 4}, x_in.options());
    x.narrow(1, 0, k).copy_(x_in);
  }
  const int8_t* xp = x.data_ptr<int8_t>();
  const int64_t ldx = x.stride(0);
  const int8_t* bp = packed.data_ptr<int8_t>();
  int32_t* op = out.data_ptr<int32_t>();
  const int64_t chunks = (m + kChunk - 1) / kChunk, panels = packed.size(0);
  const int64_t panel_size = k4 * kPanel * 4;
  // P panels from panel p for the rows of the chunk starting at row first: kRows / P rows at a
  // time (4 x 16 or 2 x 32 columns: 8 accumulators), then one at a time.
  auto run = [&](auto panels_at_once, int64_t p, int64_t first) {
    constexpr int P = decltype(panels_at_once)::value, R = kRows / P;
    const int64_t last = std::min(m, first + kChunk);
    const int64_t last_cols = std::min(kPanel, n - (p + P - 1) * kPanel);
    const int8_t* panel = bp + p * panel_size;
    int64_t r = first;
    for (; r + R <= last; r += R)
      block<R, P>(xp + r * ldx, ldx, panel, panel_size, k4, op + r * n + p * kPanel, n,
                  last_cols);
    for (; r < last; ++r)
      block<1, P>(xp + r * ldx, ldx, panel, panel_size, k4, op + r * n + p * kPanel, n,
                  last_cols);
  };
  // Tasks: (panel, chunk), ordered by pair of panels, chunk, panel within the pair (an odd
  // last panel alone), split evenly over the threads; a thread takes both panels of a pair for
  // one chunk in one pass wherever its range holds both.
  const int64_t paired_tasks = (panels / 2) * 2 * chunks;
  using One = std::integral_constant<int, 1>;
  using Two = std::integral_constant<int, 2>;
  at::parallel_for(0, panels * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end;) {
      if (task >= paired_tasks) {  // the odd last panel
        run(One{}, panels - 1, (task - paired_tasks) * kChunk);
        ++task;
        continue;
      }
      const int64_t pair = task / (2 * chunks), rem = task % (2 * chunks);
      const int64_t p = 2 * pair + rem % 2, first = (rem / 2) * kChunk;
      if (rem % 2 == 0 && task + 1 < end) {
        run(Two{}, p, first);
        task += 2;
      } else {
        run(One{}, p, first);
        ++task;
      }
    }
  });
  return out;
#else
  TORCH_CHECK(false, "int8_mm_packed: built without AVX2");
#endif
}

bool int8_mm_built() {
#if defined(__AVX2__)
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tdmpc_opt_cpu, m) {
  m.def("int8_pack(Tensor w) -> Tensor");
  m.def("int8_mm_packed(Tensor x, Tensor packed, int n) -> Tensor");
  m.def("int8_mm_built() -> bool", &int8_mm_built);
}

TORCH_LIBRARY_IMPL(tdmpc_opt_cpu, CPU, m) {
  m.impl("int8_pack", &int8_pack);
  m.impl("int8_mm_packed", &int8_mm_packed);
}
