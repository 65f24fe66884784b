// Matrix-vector products against weights kept in their quantised form, for decode steps.
//
// A model converted from a GGUF holds weights that are exactly d*q + m (Q4_1: q in 0..15, one
// fp16 scale d and offset m per 32 weights) or d*q (Q8_0: q in -127..127). Storing them that
// way reads 0.625 or 1.0625 bytes per weight instead of fp32's 4, and a decode step is bound
// by those reads. Each weight is rebuilt in registers with the same single rounding the GGUF
// reader used (fl(d*q + m) is one fused multiply-add; d*q is exact in fp32), so the products
// use bit-for-bit the fp32 weights; only the order of the sums differs from a dense matmul.
//
// y[m, n] = sum_k x[m, k] * w[n, k], x fp32 (rows, K), y fp32 (rows, N). Built with AVX-512
// (one register per 16 output rows), AVX2 (two) or, elsewhere, plain loops; simd() says which.
// Also here: a Llama RMSNorm in one call, for the same decode steps.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__F16C__)
#include <immintrin.h>
#define MEMSERVE_SIMD "avx512"
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define MEMSERVE_SIMD "avx2"
#else
#define MEMSERVE_SIMD "scalar"
#endif

namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kBlock = 16;  // output rows per stored block
constexpr int kMaxRows = 8;  // rows of x per pass; their accumulators stay in registers

float half_to_float(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }

// V16: 16 fp32 lanes, one per output row of a stored block: one AVX-512 register, or two AVX2
// ones. The kernels below are written once against it.
#if defined(__AVX512F__) && defined(__F16C__)
struct V16 {
  __m512 v;
};
inline V16 zero() { return {_mm512_setzero_ps()}; }
inline V16 splat(float x) { return {_mm512_set1_ps(x)}; }
inline V16 fmadd(V16 a, V16 b, V16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline V16 mul(V16 a, V16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline V16 add(V16 a, V16 b) { return {_mm512_add_ps(a.v, b.v)}; }
inline void store(float* p, V16 a) { _mm512_storeu_ps(p, a.v); }
inline V16 halves(const uint16_t* p) {
  return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}
inline void nibbles(const uint8_t* p, V16& low, V16& high) {
  const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  low = {_mm512_cvtepi32_ps(_mm512_and_si512(q, _mm512_set1_epi32(0xF)))};
  high = {_mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4))};
}
inline V16 signed_bytes(const int8_t* p) {
  return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
}
// Accumulators: rows * cols * split must fit 32 registers with room to spare. Few rows of x:
// several blocks per pass; many: one. Odd and even inputs apart (measured: sharing broadcasts
// over two blocks at 8 rows with one chain each was 25 % slower).
constexpr int cols_for(int rows) { return rows <= 2 ? 4 : rows <= 4 ? 2 : 1; }
constexpr int split_for(int) { return 2; }
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
struct V16 {
  __m256 lo, hi;
};
inline V16 zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline V16 splat(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
inline V16 fmadd(V16 a, V16 b, V16 c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline V16 mul(V16 a, V16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline V16 add(V16 a, V16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline void store(float* p, V16 a) {
  _mm256_storeu_ps(p, a.lo);
  _mm256_storeu_ps(p + 8, a.hi);
}
inline V16 halves(const uint16_t* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
          _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
}
inline void nibbles(const uint8_t* p, V16& low, V16& high) {
  const __m256i mask = _mm256_set1_epi32(0xF);
  const __m256i q0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m256i q1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8)));
  low = {_mm256_cvtepi32_ps(_mm256_and_si256(q0, mask)), _mm256_cvtepi32_ps(_mm256_and_si256(q1, mask))};
  high = {_mm256_cvtepi32_ps(_mm256_srli_epi32(q0, 4)), _mm256_cvtepi32_ps(_mm256_srli_epi32(q1, 4))};
}
inline V16 signed_bytes(const int8_t* p) {
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))),
          _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8))))};
}
// 16 registers of 8 lanes: fewer accumulators (each V16 takes two).
constexpr int cols_for(int rows) { return rows <= 1 ? 2 : 1; }
constexpr int split_for(int rows) { return rows <= 1 ? 2 : 1; }
#endif

#if defined(__AVX512F__) && defined(__F16C__) || defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define MEMSERVE_VECTOR 1
// Weights are stored 16 output rows to a block, so one V16 holds a weight of 16 rows: its
// scales are one load, each input is broadcast once, and nothing is summed across lanes.
// Rows rows of x against Cols blocks at once, with Split accumulators each (2: odd and even
// inputs apart): Rows * Cols * Split independent chains, so the fused multiply-adds do not wait
// on each other. Load2 rebuilds the weights of inputs k and k + 1 (k even) of block b.
template <int Rows, int Cols, int Split, typename Scales, typename Load2>
inline void dot_blocks(const float* x, int64_t K, float* y, int64_t N, int64_t b, Scales scales, Load2 load2) {
  V16 acc[Rows][Cols][Split];
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < Cols; ++c)
#pragma GCC unroll 2
      for (int s = 0; s < Split; ++s) acc[r][c][s] = zero();
  const int64_t groups = K / kGroup;
  for (int64_t g = 0; g < groups; ++g) {
    V16 d[Cols], m[Cols];
#pragma GCC unroll 8
    for (int c = 0; c < Cols; ++c) scales(b + c, g, d[c], m[c]);
    for (int64_t k = g * kGroup; k < (g + 1) * kGroup; k += 2) {
#pragma GCC unroll 8
      for (int c = 0; c < Cols; ++c) {
        V16 w[2];
        load2(b + c, k, d[c], m[c], w);
#pragma GCC unroll 16
        for (int r = 0; r < Rows; ++r) {
          acc[r][c][0] = fmadd(w[0], splat(x[r * K + k]), acc[r][c][0]);
          acc[r][c][Split - 1] = fmadd(w[1], splat(x[r * K + k + 1]), acc[r][c][Split - 1]);
        }
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < Cols; ++c)
      store(y + r * N + (b + c) * kBlock, Split == 2 ? add(acc[r][c][0], acc[r][c][Split - 1]) : acc[r][c][0]);
}

template <int Rows, typename Scales, typename Load2>
void dot_rows(const float* x, int64_t K, float* y, int64_t N, int64_t b0, int64_t b1, Scales scales, Load2 load2) {
  constexpr int Cols = cols_for(Rows), Split = split_for(Rows);
  int64_t b = b0;
  for (; b + Cols <= b1; b += Cols) dot_blocks<Rows, Cols, Split>(x, K, y, N, b, scales, load2);
  for (; b < b1; ++b) dot_blocks<Rows, 1, 2>(x, K, y, N, b, scales, load2);
}

// q4 codes: (N/16, K/2, 16) bytes; byte (b, k/2, i) holds input k of row 16b+i in its low
// nibble and input k+1 in its high one. Scales and offsets: (N/16, K/32, 16) fp16.
template <int Rows>
void q4_block(const float* x, int64_t K, const uint8_t* codes, const uint16_t* scales, const uint16_t* offsets,
              float* y, int64_t N, int64_t b0, int64_t b1) {
  const int64_t groups = K / kGroup;
  dot_rows<Rows>(
      x, K, y, N, b0, b1,
      [&](int64_t b, int64_t g, V16& d, V16& m) {
        d = halves(scales + (b * groups + g) * kBlock);
        m = halves(offsets + (b * groups + g) * kBlock);
      },
      [&](int64_t b, int64_t k, const V16& d, const V16& m, V16* w) {
        V16 low, high;
        nibbles(codes + (b * (K / 2) + k / 2) * kBlock, low, high);
        // fl(d*q + m): one rounding, as the GGUF reader's fp32 d*q (exact) + m.
        w[0] = fmadd(d, low, m);
        w[1] = fmadd(d, high, m);
      });
}

// q8 codes: (N/16, K, 16) int8; scales (N/16, K/32, 16) fp16.
template <int Rows>
void q8_block(const float* x, int64_t K, const int8_t* codes, const uint16_t* scales, const uint16_t*,
              float* y, int64_t N, int64_t b0, int64_t b1) {
  const int64_t groups = K / kGroup;
  dot_rows<Rows>(
      x, K, y, N, b0, b1,
      [&](int64_t b, int64_t g, V16& d, V16& m) {
        d = halves(scales + (b * groups + g) * kBlock);
        m = d;
      },
      [&](int64_t b, int64_t k, const V16& d, const V16&, V16* w) {
        const int8_t* q = codes + (b * K + k) * kBlock;
        w[0] = mul(d, signed_bytes(q));
        w[1] = mul(d, signed_bytes(q + kBlock));
      });
}
#endif

// The portable version: the same weights and roundings, summed in plain order. Weight(b, i, k)
// rebuilds the weight of input k for row i of block b.
template <typename Weight>
void scalar_rows(const float* x, int64_t K, float* y, int64_t N, int64_t rows, int64_t b0, int64_t b1,
                 Weight weight) {
  for (int64_t n = b0 * kBlock; n < b1 * kBlock; ++n) {
    for (int64_t r = 0; r < rows; ++r) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += weight(n / kBlock, n % kBlock, k) * x[r * K + k];
      y[r * N + n] = acc;
    }
  }
}

void q4_scalar(const float* x, int64_t K, const uint8_t* codes, const uint16_t* scales, const uint16_t* offsets,
               float* y, int64_t N, int64_t rows, int64_t b0, int64_t b1) {
  const int64_t groups = K / kGroup;
  scalar_rows(x, K, y, N, rows, b0, b1, [&](int64_t b, int64_t i, int64_t k) {
    const int64_t at = (b * groups + k / kGroup) * kBlock + i;
    const uint8_t byte = codes[(b * (K / 2) + k / 2) * kBlock + i];
    const float q = static_cast<float>(k % 2 ? byte >> 4 : byte & 0xF);
    return __builtin_fmaf(half_to_float(scales[at]), q, half_to_float(offsets[at]));
  });
}

void q8_scalar(const float* x, int64_t K, const int8_t* codes, const uint16_t* scales, const uint16_t*,
               float* y, int64_t N, int64_t rows, int64_t b0, int64_t b1) {
  const int64_t groups = K / kGroup;
  scalar_rows(x, K, y, N, rows, b0, b1, [&](int64_t b, int64_t i, int64_t k) {
    const float d = half_to_float(scales[(b * groups + k / kGroup) * kBlock + i]);
    return d * static_cast<float>(codes[(b * K + k) * kBlock + i]);
  });
}

void check(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales, int64_t per_byte) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(),
              "packed linear: x must be a contiguous fp32 CPU matrix");
  TORCH_CHECK(codes.dim() == 3 && codes.size(2) == kBlock && codes.is_contiguous(),
              "packed linear: codes must be (N/16, K/", per_byte == 2 ? 2 : 1, ", 16)");
  TORCH_CHECK(x.size(1) % kGroup == 0 && codes.size(1) * per_byte == x.size(1),
              "packed linear: x has ", x.size(1), " columns, the weights ", codes.size(1) * per_byte);
  TORCH_CHECK(scales.scalar_type() == torch::kFloat16 && scales.dim() == 3 && scales.is_contiguous() &&
                  scales.size(0) == codes.size(0) && scales.size(1) == x.size(1) / kGroup && scales.size(2) == kBlock,
              "packed linear: scales must be fp16 (N/16, K/32, 16)");
}

template <typename Code, typename Block, typename Scalar>
torch::Tensor run(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales,
                  const torch::Tensor& offsets, Block block_for, Scalar scalar) {
  const int64_t rows = x.size(0), K = x.size(1), blocks = codes.size(0), N = blocks * kBlock;
  auto y = torch::empty({rows, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const Code* cp = reinterpret_cast<const Code*>(codes.data_ptr());
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr());
  const uint16_t* op = offsets.defined() ? reinterpret_cast<const uint16_t*>(offsets.data_ptr()) : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {
      const int64_t count = std::min<int64_t>(kMaxRows, rows - r0);
      const float* xr = xp + r0 * K;
      float* yr = yp + r0 * N;
      auto block = block_for(count);
      if (block != nullptr) {
        block(xr, K, cp, sp, op, yr, N, b0, b1);
      } else {
        scalar(xr, K, cp, sp, op, yr, N, count, b0, b1);
      }
    }
  });
  return y;
}

template <typename Code>
using BlockFn = void (*)(const float*, int64_t, const Code*, const uint16_t*, const uint16_t*, float*, int64_t,
                         int64_t, int64_t);

template <typename Code, template <int> class Pick>
BlockFn<Code> pick(int64_t count) {
#if defined(MEMSERVE_VECTOR)
  switch (count) {
    case 1: return Pick<1>::fn;
    case 2: return Pick<2>::fn;
    case 3: return Pick<3>::fn;
    case 4: return Pick<4>::fn;
    case 5: return Pick<5>::fn;
    case 6: return Pick<6>::fn;
    case 7: return Pick<7>::fn;
    case 8: return Pick<8>::fn;
  }
#endif
  (void)count;
  return nullptr;
}

#if defined(MEMSERVE_VECTOR)
template <int R> struct Q4 { static constexpr BlockFn<uint8_t> fn = &q4_block<R>; };
template <int R> struct Q8 { static constexpr BlockFn<int8_t> fn = &q8_block<R>; };
#else
template <int R> struct Q4 { static constexpr BlockFn<uint8_t> fn = nullptr; };
template <int R> struct Q8 { static constexpr BlockFn<int8_t> fn = nullptr; };
#endif

torch::Tensor q4_linear(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales,
                        const torch::Tensor& offsets) {
  check(x, codes, scales, 2);
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && offsets.sizes() == scales.sizes() &&
                  offsets.scalar_type() == torch::kFloat16 && offsets.is_contiguous(),
              "packed linear: q4 needs uint8 codes and fp16 offsets shaped like the scales");
  return run<uint8_t>(x, codes, scales, offsets, pick<uint8_t, Q4>, q4_scalar);
}

torch::Tensor q8_linear(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales) {
  check(x, codes, scales, 1);
  TORCH_CHECK(codes.scalar_type() == torch::kInt8, "packed linear: q8 needs int8 codes");
  return run<int8_t>(x, codes, scales, torch::Tensor(), pick<int8_t, Q8>, q8_scalar);
}

// weight * (x / sqrt(mean(x^2) + eps)) per row, as a Llama RMSNorm computes it in fp32, in one
// call instead of six ops (a decode step runs two per layer).
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "rms_norm: x must be a contiguous fp32 CPU tensor");
  const int64_t K = x.size(-1), rows = K ? x.numel() / K : 0;
  TORCH_CHECK(weight.scalar_type() == torch::kFloat32 && weight.is_contiguous() && weight.numel() == K,
              "rms_norm: weight must be fp32 with one value per column");
  auto y = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = xp + r * K;
    double squares = 0.0;  // in double: a plain running sum of fp32 squares would drift
    for (int64_t k = 0; k < K; ++k) squares += static_cast<double>(xr[k]) * xr[k];
    const float mean = static_cast<float>(squares / static_cast<double>(K));
    const float scale = 1.f / std::sqrt(mean + static_cast<float>(eps));
    for (int64_t k = 0; k < K; ++k) yp[r * K + k] = wp[k] * (xr[k] * scale);
  }
  return y;
}

std::string simd() { return MEMSERVE_SIMD; }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("q4_linear", &q4_linear, "x @ w.T for Q4_1-packed w");
  m.def("q8_linear", &q8_linear, "x @ w.T for Q8_0-packed w");
  m.def("rms_norm", &rms_norm, "a Llama RMSNorm of fp32 rows");
  m.def("simd", &simd, "the instruction set the kernels were built for");
}
