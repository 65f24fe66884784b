// Matrix-vector products against weights kept in their quantised form, for decode steps.
//
// A model converted from a GGUF holds weights that are exactly d*q + m (Q4_1: q in 0..15, one
// fp16 scale d and offset m per 32 weights) or d*q (Q8_0: q in -127..127). Storing them that
// way reads 0.625 or 1.0625 bytes per weight instead of fp32's 4, and a decode step is bound
// by those reads. The vector kernels sum each group as d * sum(x*q) + m * sum(x), the same
// products as against the fp32 weights regrouped, in fp32; the portable loop rebuilds each
// weight as the GGUF reader did (fl(d*q + m)) and sums in plain order. Either differs from a
// dense fp32 matmul by rounding only (about 1e-6 of the output's size; the tests bound it).
//
// y[m, n] = sum_k x[m, k] * w[n, k], x fp32 (rows, K), y fp32 (rows, N). Built with AVX-512
// (one register per 16 output rows), AVX2 (two) or, elsewhere, plain loops; simd() says which.
// Also here: a Llama RMSNorm in one call, and a Llama decoder layer's decode step in two.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>
#include <limits>

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

// Each group of 32 inputs' sum (what the q4 groups' offsets multiply), for `count` groups of x.
std::vector<float> group_sums(const float* x, int64_t count) {
  std::vector<float> sums(count);
  for (int64_t i = 0; i < count; ++i) {
    float sum = 0.f;
    for (int64_t k = i * kGroup; k < (i + 1) * kGroup; ++k) sum += x[k];
    sums[i] = sum;
  }
  return sums;
}

// The 16 words (one per row of block b) that hold q4 codes of inputs 8t..8t+7, t = k / 8.
inline const uint32_t* words(const uint8_t* codes, int64_t K, int64_t b, int64_t k) {
  return reinterpret_cast<const uint32_t*>(codes + (b * (K / 2) + (k / 8) * 4) * kBlock);
}

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
// The values of 16 rows' codes for inputs k and k + 1 (k even): p holds one 32-bit word per row,
// eight codes to a word, and shift = 4 * (k % 8). By table lookup: vpermps reads only the low 4
// bits of each index, so no mask and no conversion are needed.
inline void nibbles(const uint32_t* p, int shift, V16& low, V16& high) {
  const __m512 values = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i q = _mm512_srli_epi32(_mm512_loadu_si512(p), shift);
  low = {_mm512_permutexvar_ps(q, values)};
  high = {_mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), values)};
}
inline V16 signed_bytes(const int8_t* p) {
  return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
}
// Registers: rows * cols * (split + 1) (partial sums and totals) must fit 32 with room to spare.
// Few rows of x: several blocks per pass; many: one.
constexpr int cols_for(int rows) { return rows <= 1 ? 4 : rows <= 2 ? 2 : 1; }
constexpr int split_for(int rows) { return rows <= 4 ? 2 : 1; }
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
inline void nibbles(const uint32_t* p, int shift, V16& low, V16& high) {
  const __m256i mask = _mm256_set1_epi32(0xF);
  const __m256i q0 = _mm256_srli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), shift);
  const __m256i q1 = _mm256_srli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 8)), shift);
  low = {_mm256_cvtepi32_ps(_mm256_and_si256(q0, mask)), _mm256_cvtepi32_ps(_mm256_and_si256(q1, mask))};
  high = {_mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(q0, 4), mask)),
          _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(q1, 4), mask))};
}
inline V16 signed_bytes(const int8_t* p) {
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))),
          _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8))))};
}
// 16 registers of 8 lanes: fewer accumulators (each V16 takes two).
constexpr int cols_for(int) { return 1; }
constexpr int split_for(int rows) { return rows <= 1 ? 2 : 1; }
#endif

#if defined(__AVX512F__) && defined(__F16C__) || defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define MEMSERVE_VECTOR 1
// Weights are stored 16 output rows to a block, so one V16 holds a weight of 16 rows: its
// scales are one load, each input is broadcast once, and nothing is summed across lanes.
//
// A group of 32 weights is d*q + m, so its share of a product is d * sum(x*q) + m * sum(x):
// one multiply-add per weight on the codes' values (small integers, exact in fp32), with d and m
// applied once per group and sum(x) over each group computed once per call. (Rebuilding each
// weight first costs a second multiply-add per weight, and the kernel was bound by those.)
// Rows rows of x against Cols blocks at once, with Split partial sums each (2: odd and even
// inputs apart), so the multiply-adds do not wait on each other. Load2 gives the code values
// of inputs k and k + 1 (k even) of block b; Scales its group g's d and m (m: q4 only).
template <int Rows, int Cols, int Split, bool Offsets, typename Scales, typename Load2>
inline void dot_blocks(const float* x, const float* sums, int64_t K, float* y, int64_t N, int64_t b, Scales scales,
                       Load2 load2) {
  V16 acc[Rows][Cols];
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < Cols; ++c) acc[r][c] = zero();
  const int64_t groups = K / kGroup;
  for (int64_t g = 0; g < groups; ++g) {
    V16 part[Rows][Cols][Split];
#pragma GCC unroll 16
    for (int r = 0; r < Rows; ++r)
#pragma GCC unroll 8
      for (int c = 0; c < Cols; ++c)
#pragma GCC unroll 2
        for (int s = 0; s < Split; ++s) part[r][c][s] = zero();
#pragma GCC unroll 16
    for (int64_t k = g * kGroup; k < (g + 1) * kGroup; k += 2) {
#pragma GCC unroll 8
      for (int c = 0; c < Cols; ++c) {
        V16 q[2];
        load2(b + c, k, q);
#pragma GCC unroll 16
        for (int r = 0; r < Rows; ++r) {
          part[r][c][0] = fmadd(q[0], splat(x[r * K + k]), part[r][c][0]);
          part[r][c][Split - 1] = fmadd(q[1], splat(x[r * K + k + 1]), part[r][c][Split - 1]);
        }
      }
    }
#pragma GCC unroll 8
    for (int c = 0; c < Cols; ++c) {
      V16 d, m;
      scales(b + c, g, d, m);
#pragma GCC unroll 16
      for (int r = 0; r < Rows; ++r) {
        const V16 sum = Split == 2 ? add(part[r][c][0], part[r][c][Split - 1]) : part[r][c][0];
        acc[r][c] = fmadd(d, sum, acc[r][c]);
        if (Offsets) acc[r][c] = fmadd(m, splat(sums[r * groups + g]), acc[r][c]);
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < Cols; ++c) store(y + r * N + (b + c) * kBlock, acc[r][c]);
}

template <int Rows, bool Offsets, typename Scales, typename Load2>
void dot_rows(const float* x, const float* sums, int64_t K, float* y, int64_t N, int64_t b0, int64_t b1,
              Scales scales, Load2 load2) {
  constexpr int Cols = cols_for(Rows), Split = split_for(Rows);
  int64_t b = b0;
  for (; b + Cols <= b1; b += Cols) dot_blocks<Rows, Cols, Split, Offsets>(x, sums, K, y, N, b, scales, load2);
  for (; b < b1; ++b) dot_blocks<Rows, 1, Split, Offsets>(x, sums, K, y, N, b, scales, load2);
}

// q4 codes: (N/16, K/2, 16) bytes; for block b and inputs 8t..8t+7, the 64 bytes from
// (b, 4t, 0) are 16 little-endian 32-bit words, word i row 16b+i's codes of those inputs, input
// 8t+j in bits 4j..4j+3. Scales and offsets: (N/16, K/32, 16) fp16.
template <int Rows>
void q4_block(const float* x, const float* sums, int64_t K, const uint8_t* codes, const uint16_t* scales,
              const uint16_t* offsets, float* y, int64_t N, int64_t b0, int64_t b1) {
  const int64_t groups = K / kGroup;
  dot_rows<Rows, true>(
      x, sums, K, y, N, b0, b1,
      [&](int64_t b, int64_t g, V16& d, V16& m) {
        d = halves(scales + (b * groups + g) * kBlock);
        m = halves(offsets + (b * groups + g) * kBlock);
      },
      [&](int64_t b, int64_t k, V16* q) {
        nibbles(words(codes, K, b, k), static_cast<int>(4 * (k % 8)), q[0], q[1]);
      });
}

// q8 codes: (N/16, K, 16) int8; scales (N/16, K/32, 16) fp16.
template <int Rows>
void q8_block(const float* x, const float* sums, int64_t K, const int8_t* codes, const uint16_t* scales,
              const uint16_t*, float* y, int64_t N, int64_t b0, int64_t b1) {
  const int64_t groups = K / kGroup;
  dot_rows<Rows, false>(
      x, sums, K, y, N, b0, b1,
      [&](int64_t b, int64_t g, V16& d, V16& m) {
        d = halves(scales + (b * groups + g) * kBlock);
        m = d;
      },
      [&](int64_t b, int64_t k, V16* q) {
        const int8_t* at = codes + (b * K + k) * kBlock;
        q[0] = signed_bytes(at);
        q[1] = signed_bytes(at + kBlock);
      });
}
#endif

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512VBMI__)
#define MEMSERVE_VNNI 1
// With AVX-512 VNNI, q4 products run on integers: each row of x is split, per group of 32
// inputs, into three int8 parts, x ~ s * (hi + mid / 254 + lo / 254^2) with s = max|x| / 127
// (the error is at most s / (2 * 254^2), under 1e-7 of the group's largest input: fp32's own
// rounding of the sums is larger; two parts, 1.6e-5, measurably moved the logits), and one
// vpdpbusd multiplies 4 inputs by 16 rows' codes (64 products) exactly into int32. Per 8 inputs
// of 16 rows: one load, two byte shuffles (vpmultishiftqb) and two masks spread the nibbles to
// bytes, and six vpdpbusd take them: about half the vector instructions of the fp32 form.
struct Quantised {
  std::vector<int8_t> hi, mid, lo;  // (rows, K): the three parts
  std::vector<float> scale;  // (rows, K / 32): s
};

Quantised quantise(const float* x, int64_t rows, int64_t K) {
  const int64_t groups = rows * K / kGroup;
  Quantised q{std::vector<int8_t>(rows * K), std::vector<int8_t>(rows * K), std::vector<int8_t>(rows * K),
              std::vector<float>(groups)};
  const __m512 magnitude = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  auto to_int8 = [](__m512 v, int8_t* out) {  // v holds integers in -127..127
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));
  };
  for (int64_t group = 0; group < groups; ++group) {
    const float* in = x + group * kGroup;
    const __m512 a = _mm512_loadu_ps(in), b = _mm512_loadu_ps(in + 16);
    const float top = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(a, magnitude), _mm512_and_ps(b, magnitude)));
    const float s = top / 127.f;
    q.scale[group] = s;
    const __m512 inverse = _mm512_set1_ps(s > 0.f ? 1.f / s : 0.f), step = _mm512_set1_ps(s / 254.f);
    const __m512 scale = _mm512_set1_ps(s), limit = _mm512_set1_ps(127.f);
    constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    for (int half = 0; half < 2; ++half) {
      const __m512 v = half ? b : a;
      const int64_t at = group * kGroup + half * 16;
      // hi, then the remainder in steps of s/254, then what remains of that in steps of s/254^2
      const __m512 hi = _mm512_roundscale_ps(_mm512_mul_ps(v, inverse), kNearest);
      const __m512 rest = _mm512_fnmadd_ps(hi, scale, v);
      const __m512 mid = _mm512_min_ps(limit, _mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), limit),
          _mm512_roundscale_ps(_mm512_mul_ps(rest, _mm512_mul_ps(inverse, _mm512_set1_ps(254.f))), kNearest)));
      const __m512 last = _mm512_fnmadd_ps(mid, step, rest);
      const __m512 lo = _mm512_min_ps(limit, _mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), limit),
          _mm512_roundscale_ps(_mm512_mul_ps(last, _mm512_mul_ps(inverse, _mm512_set1_ps(64516.f))), kNearest)));
      to_int8(hi, q.hi.data() + at);
      to_int8(mid, q.mid.data() + at);
      to_int8(lo, q.lo.data() + at);
    }
  }
  return q;
}

// Rows rows of x against Cols blocks from block b.
template <int Rows, int Cols>
inline void q4_integer_blocks(const Quantised& xq, int64_t r0, const float* sums, int64_t K, const uint8_t* codes,
                              const uint16_t* scales, const uint16_t* offsets, float* y, int64_t N, int64_t b) {
  // vpmultishiftqb control: byte j of each 64-bit half takes the 8 bits from this offset.
  // First four inputs of a word: nibbles 0-3 (bits 0, 4, 8, 12; the next word: +32); the
  // other four: nibbles 4-7.
  const __m512i first_four = _mm512_set1_epi64(0x2c2824200c080400LL);
  const __m512i last_four = _mm512_set1_epi64(0x3c3834301c181410LL);
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const int64_t groups = K / kGroup;
  __m512 acc[Rows][Cols];
#pragma GCC unroll 8
  for (int r = 0; r < Rows; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < Cols; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i hi[Rows][Cols], mid[Rows][Cols], lo[Rows][Cols];
#pragma GCC unroll 8
    for (int r = 0; r < Rows; ++r)
#pragma GCC unroll 4
      for (int c = 0; c < Cols; ++c) hi[r][c] = mid[r][c] = lo[r][c] = _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int64_t k = g * kGroup; k < (g + 1) * kGroup; k += 8) {
#pragma GCC unroll 4
      for (int c = 0; c < Cols; ++c) {
        const __m512i packed = _mm512_loadu_si512(words(codes, K, b + c, k));
        const __m512i a = _mm512_and_si512(_mm512_multishift_epi64_epi8(first_four, packed), nibble);
        const __m512i z = _mm512_and_si512(_mm512_multishift_epi64_epi8(last_four, packed), nibble);
#pragma GCC unroll 8
        for (int r = 0; r < Rows; ++r) {
          int32_t h[2], i[2], l[2];
          std::memcpy(h, xq.hi.data() + (r0 + r) * K + k, sizeof(h));
          std::memcpy(i, xq.mid.data() + (r0 + r) * K + k, sizeof(i));
          std::memcpy(l, xq.lo.data() + (r0 + r) * K + k, sizeof(l));
          hi[r][c] = _mm512_dpbusd_epi32(hi[r][c], a, _mm512_set1_epi32(h[0]));
          hi[r][c] = _mm512_dpbusd_epi32(hi[r][c], z, _mm512_set1_epi32(h[1]));
          mid[r][c] = _mm512_dpbusd_epi32(mid[r][c], a, _mm512_set1_epi32(i[0]));
          mid[r][c] = _mm512_dpbusd_epi32(mid[r][c], z, _mm512_set1_epi32(i[1]));
          lo[r][c] = _mm512_dpbusd_epi32(lo[r][c], a, _mm512_set1_epi32(l[0]));
          lo[r][c] = _mm512_dpbusd_epi32(lo[r][c], z, _mm512_set1_epi32(l[1]));
        }
      }
    }
#pragma GCC unroll 4
    for (int c = 0; c < Cols; ++c) {
      const __m512 d = halves(scales + ((b + c) * groups + g) * kBlock).v;
      const __m512 m = halves(offsets + ((b + c) * groups + g) * kBlock).v;
#pragma GCC unroll 8
      for (int r = 0; r < Rows; ++r) {
        const float s = xq.scale[(r0 + r) * groups + g];
        // sum(x * q) over the group, then d * that + m * sum(x), as the fp32 form.
        const __m512 small = _mm512_fmadd_ps(_mm512_cvtepi32_ps(mid[r][c]), _mm512_set1_ps(s / 254.f),
                                             _mm512_mul_ps(_mm512_cvtepi32_ps(lo[r][c]), _mm512_set1_ps(s / 64516.f)));
        const __m512 dot = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi[r][c]), _mm512_set1_ps(s), small);
        acc[r][c] = _mm512_fmadd_ps(d, dot, acc[r][c]);
        acc[r][c] = _mm512_fmadd_ps(m, _mm512_set1_ps(sums[(r0 + r) * groups + g]), acc[r][c]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < Rows; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < Cols; ++c) _mm512_storeu_ps(y + (r0 + r) * N + (b + c) * kBlock, acc[r][c]);
}

// Blocks b0..b1, four at a time; for each four, every row of x in passes of at most 4, so the
// codes of a pass's blocks are still in cache for the next.
template <int Rows>
void q4_integer_pass(const Quantised& xq, int64_t r0, const float* sums, int64_t K, const uint8_t* codes,
                     const uint16_t* scales, const uint16_t* offsets, float* y, int64_t N, int64_t b, int64_t end) {
  constexpr int Cols = Rows == 1 ? 4 : Rows == 2 ? 2 : 1;
  for (; b + Cols <= end; b += Cols)
    q4_integer_blocks<Rows, Cols>(xq, r0, sums, K, codes, scales, offsets, y, N, b);
  for (; b < end; ++b) q4_integer_blocks<Rows, 1>(xq, r0, sums, K, codes, scales, offsets, y, N, b);
}

void q4_integer(const Quantised& xq, int64_t rows, const float* sums, int64_t K, const uint8_t* codes,
                const uint16_t* scales, const uint16_t* offsets, float* y, int64_t N, int64_t b0, int64_t b1) {
  constexpr int64_t kTile = 4;
  for (int64_t tile = b0; tile < b1; tile += kTile) {
    const int64_t end = std::min(tile + kTile, b1);
    for (int64_t r0 = 0; r0 < rows; r0 += 4) {
      switch (std::min<int64_t>(4, rows - r0)) {
        case 1: q4_integer_pass<1>(xq, r0, sums, K, codes, scales, offsets, y, N, tile, end); break;
        case 2: q4_integer_pass<2>(xq, r0, sums, K, codes, scales, offsets, y, N, tile, end); break;
        case 3: q4_integer_pass<3>(xq, r0, sums, K, codes, scales, offsets, y, N, tile, end); break;
        default: q4_integer_pass<4>(xq, r0, sums, K, codes, scales, offsets, y, N, tile, end); break;
      }
    }
  }
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
    uint32_t word;
    std::memcpy(&word, words(codes, K, b, k) + i, sizeof(word));
    const float q = static_cast<float>((word >> (4 * (k % 8))) & 0xF);
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
  const int64_t groups = K / kGroup;
  const std::vector<float> sums = op != nullptr ? group_sums(xp, rows * groups) : std::vector<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {
      const int64_t count = std::min<int64_t>(kMaxRows, rows - r0);
      const float* xr = xp + r0 * K;
      float* yr = yp + r0 * N;
      auto block = block_for(count);
      if (block != nullptr) {
        block(xr, sums.data() + r0 * groups, K, cp, sp, op, yr, N, b0, b1);
      } else {
        scalar(xr, K, cp, sp, op, yr, N, count, b0, b1);
      }
    }
  });
  return y;
}

template <typename Code>
using BlockFn = void (*)(const float*, const float*, int64_t, const Code*, const uint16_t*, const uint16_t*, float*, int64_t,
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
#if defined(MEMSERVE_VNNI)
  const int64_t rows = x.size(0), K = x.size(1), blocks = codes.size(0), N = blocks * kBlock;
  auto y = torch::empty({rows, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const std::vector<float> sums = group_sums(xp, rows * K / kGroup);
  const Quantised xq = quantise(xp, rows, K);
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr());
  const uint16_t* op = reinterpret_cast<const uint16_t*>(offsets.data_ptr());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    q4_integer(xq, rows, sums.data(), K, cp, sp, op, yp, N, b0, b1);
  });
  return y;
#else
  return run<uint8_t>(x, codes, scales, offsets, pick<uint8_t, Q4>, q4_scalar);
#endif
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

// A packed weight as the layer below holds it: q4 (with offsets) or q8 codes.
struct Weight {
  torch::Tensor codes, scales, offsets;
  torch::Tensor operator()(const torch::Tensor& x) const {
    return offsets.defined() ? q4_linear(x, codes, scales, offsets) : q8_linear(x, codes, scales);
  }
};

// A Llama decoder layer at a decode step (one position per row), in two calls around the KV
// cache's update: `attention_in` (norm, q/k/v, rotary embedding) and `attention_out` (attention
// over the cache, output projection, residual, norm, gate/up, SiLU * up, down, residual). The
// same operations, in the same order, as the layer's own forward in fp32; in two calls instead
// of about forty.
class DecodeLayer {
 public:
  DecodeLayer(torch::Tensor input_norm, double input_eps, torch::Tensor post_norm, double post_eps,
              std::vector<torch::Tensor> qkv, std::vector<torch::Tensor> o, std::vector<torch::Tensor> gate_up,
              std::vector<torch::Tensor> down, int64_t heads, int64_t kv_heads, int64_t head_dim, double scaling)
      : input_norm_(std::move(input_norm)), post_norm_(std::move(post_norm)), input_eps_(input_eps),
        post_eps_(post_eps), qkv_(weight(qkv)), o_(weight(o)), gate_up_(weight(gate_up)), down_(weight(down)),
        heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim), scaling_(static_cast<float>(scaling)) {
    TORCH_CHECK(head_dim % 2 == 0 && heads % kv_heads == 0, "decode layer: odd head size or head counts");
  }

  // x (B, D) -> q (B, H, 1, hd), k and v (B, Hkv, 1, hd), q and k rotated by cos, sin (B, hd).
  std::vector<torch::Tensor> attention_in(const torch::Tensor& x, const torch::Tensor& cos,
                                          const torch::Tensor& sin) const {
    const int64_t rows = x.size(0), hd = head_dim_;
    TORCH_CHECK(cos.scalar_type() == torch::kFloat32 && cos.is_contiguous() && cos.numel() == rows * hd &&
                    sin.scalar_type() == torch::kFloat32 && sin.is_contiguous() && sin.numel() == rows * hd,
                "decode layer: cos and sin must be contiguous fp32 (B, 1, head_dim)");
    const torch::Tensor qkv = qkv_(rms_norm(x, input_norm_, input_eps_));
    const int64_t width = qkv.size(1);
    TORCH_CHECK(width == (heads_ + 2 * kv_heads_) * hd, "decode layer: q/k/v width ", width);
    auto q = torch::empty({rows, heads_, 1, hd}, x.options());
    auto k = torch::empty({rows, kv_heads_, 1, hd}, x.options());
    auto v = torch::empty({rows, kv_heads_, 1, hd}, x.options());
    const float* in = qkv.data_ptr<float>();
    const float* cp = cos.data_ptr<float>();
    const float* sp = sin.data_ptr<float>();
    float* qp = q.data_ptr<float>();
    float* kp = k.data_ptr<float>();
    float* vp = v.data_ptr<float>();
    const int64_t half = hd / 2;
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = in + r * width;
      const float* c = cp + r * hd;
      const float* s = sp + r * hd;
      // x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1), as Llama's rotary embedding.
      auto rotate = [&](const float* from, float* to) {
        for (int64_t i = 0; i < half; ++i) {
          to[i] = from[i] * c[i] + (-from[i + half]) * s[i];
          to[i + half] = from[i + half] * c[i + half] + from[i] * s[i + half];
        }
      };
      for (int64_t h = 0; h < heads_; ++h) rotate(row + h * hd, qp + (r * heads_ + h) * hd);
      for (int64_t h = 0; h < kv_heads_; ++h) {
        rotate(row + (heads_ + h) * hd, kp + (r * kv_heads_ + h) * hd);
        std::memcpy(vp + (r * kv_heads_ + h) * hd, row + (heads_ + kv_heads_ + h) * hd, hd * sizeof(float));
      }
    }
    return {q, k, v};
  }

  // The rest of the layer: x (B, D) the layer's input, q from attention_in, keys and values
  // (B, Hkv, L, hd) the cache after its update, mask (B, L) bool (true: attend) or undefined.
  torch::Tensor attention_out(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& keys,
                              const torch::Tensor& values, const c10::optional<torch::Tensor>& mask) const {
    const int64_t rows = x.size(0), hd = head_dim_, length = keys.size(2);
    TORCH_CHECK(keys.dim() == 4 && keys.size(0) == rows && keys.size(1) == kv_heads_ && keys.size(3) == hd &&
                    keys.stride(3) == 1 && values.sizes() == keys.sizes() && values.stride(3) == 1 &&
                    keys.scalar_type() == torch::kFloat32 && values.scalar_type() == torch::kFloat32,
                "decode layer: keys and values must be fp32 (B, kv_heads, L, head_dim)");
    const bool* allowed = nullptr;
    if (mask.has_value() && mask->defined()) {
      TORCH_CHECK(mask->scalar_type() == torch::kBool && mask->is_contiguous() && mask->numel() == rows * length,
                  "decode layer: the mask must be a contiguous bool (B, L)");
      allowed = mask->data_ptr<bool>();
    }
    auto attended = torch::empty({rows, heads_ * hd}, x.options());
    const float* qp = q.data_ptr<float>();
    const float* kp = keys.data_ptr<float>();
    const float* vp = values.data_ptr<float>();
    float* ap = attended.data_ptr<float>();
    const int64_t group = heads_ / kv_heads_;
    const auto ks = keys.strides(), vs = values.strides();
    at::parallel_for(0, rows * heads_, 1, [&](int64_t first, int64_t last) {
      std::vector<float> scores(length);
      for (int64_t item = first; item < last; ++item) {
        const int64_t r = item / heads_, h = item % heads_, kv = h / group;
        const float* query = qp + item * hd;
        const float* key = kp + r * ks[0] + kv * ks[1];
        const float* value = vp + r * vs[0] + kv * vs[1];
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < length; ++t) {
          if (allowed != nullptr && !allowed[r * length + t]) {
            scores[t] = -std::numeric_limits<float>::infinity();
            continue;
          }
          const float* at = key + t * ks[2];
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t i = 0; i < hd; ++i) dot += query[i] * at[i];
          scores[t] = dot * scaling_;
          top = std::max(top, scores[t]);
        }
        float total = 0.f;
        for (int64_t t = 0; t < length; ++t) {
          scores[t] = std::exp(scores[t] - top);
          total += scores[t];
        }
        float* out = ap + r * heads_ * hd + h * hd;
        std::fill(out, out + hd, 0.f);
        for (int64_t t = 0; t < length; ++t) {
          if (scores[t] == 0.f) continue;
          const float p = scores[t] / total;
          for (int64_t i = 0; i < hd; ++i) out[i] += p * value[t * vs[2] + i];
        }
      }
    });
    const torch::Tensor mid = x + o_(attended);
    const torch::Tensor gate_up = gate_up_(rms_norm(mid, post_norm_, post_eps_));
    const int64_t inner = gate_up.size(1) / 2;
    auto act = torch::empty({rows, inner}, x.options());
    const float* gp = gate_up.data_ptr<float>();
    float* actp = act.data_ptr<float>();
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t i = 0; i < inner; ++i) {
        const float g = gp[r * 2 * inner + i];
        actp[r * inner + i] = g / (1.f + std::exp(-g)) * gp[r * 2 * inner + inner + i];
      }
    }
    return mid + down_(act);
  }

 private:
  static Weight weight(const std::vector<torch::Tensor>& parts) {
    TORCH_CHECK(parts.size() == 2 || parts.size() == 3, "decode layer: a weight is codes, scales[, offsets]");
    return {parts[0], parts[1], parts.size() == 3 ? parts[2] : torch::Tensor()};
  }

  torch::Tensor input_norm_, post_norm_;
  double input_eps_, post_eps_;
  Weight qkv_, o_, gate_up_, down_;
  int64_t heads_, kv_heads_, head_dim_;
  float scaling_;
};

std::string simd() {
#if defined(MEMSERVE_VNNI)
  return MEMSERVE_SIMD "-vnni";
#else
  return MEMSERVE_SIMD;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("q4_linear", &q4_linear, "x @ w.T for Q4_1-packed w");
  m.def("q8_linear", &q8_linear, "x @ w.T for Q8_0-packed w");
  m.def("rms_norm", &rms_norm, "a Llama RMSNorm of fp32 rows");
  m.def("simd", &simd, "the instruction set the kernels were built for");
  pybind11::class_<DecodeLayer>(m, "DecodeLayer")
      .def(pybind11::init<torch::Tensor, double, torch::Tensor, double, std::vector<torch::Tensor>,
                          std::vector<torch::Tensor>, std::vector<torch::Tensor>, std::vector<torch::Tensor>, int64_t,
                          int64_t, int64_t, double>())
      .def("attention_in", &DecodeLayer::attention_in)
      .def("attention_out", &DecodeLayer::attention_out);
}
