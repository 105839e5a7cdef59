// The int8 Linear for a few rows (decoding): int8 weights with one scale per output row, fp32 input rows that
// the caller has already scaled to max |x| = 1. serve/native.py builds this file at first use and loads it as
// torch.ops.shakespeare_native.int8_linear.
//
// It computes exactly what fbgemm's int8 Linear computes with Int8Linear's fixed input range, bit for bit:
//   q = nearbyint(x * (1 / scale)) + 63 (unsigned, 0..126), acc = sum_k q * w - 63 * sum_k w (an exact
//   integer), y = float(acc) * (scale * w_scale[n]).
// Integer sums are exact in any order, so a row's output never depends on how many rows share the call, and
// serving may switch between this kernel and fbgemm at any moment without changing a single token.
//
// The weights are packed in tiles of 16 output rows x 4 inputs (64 bytes, row n's 4 bytes together), so one
// 512-bit load feeds 16 outputs and each input row's 4 bytes are broadcast: every weight byte is read once
// per call for up to 8 input rows, with no horizontal sums. Two paths, chosen by the caller from the CPU's
// features: AVX-512 VNNI (vpdpbusd) and AVX2 (vpmaddubsw: 126 x 127 x 2 stays below 32,767, so the int16
// pairs never saturate, which is why the input range uses 7 bits).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr int kTile = 16;         // output rows per tile
constexpr int kGroup = 4;         // inputs per group (one int32 lane)
constexpr int kZeroPoint = 63;    // Int8Linear.INPUT_ZERO_POINT
constexpr int kMostRows = 8;      // input rows one pass over the weights serves

// One 16-output tile for `rows` input rows (1..kMostRows): int32 sums of q * w over every group.
template <int kRows>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void tile_vnni(
    const int8_t* tile, const uint8_t* q, int64_t q_stride, int64_t groups, int32_t* sums) {
  __m512i acc[kRows][2];
  for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
  const int32_t* q32 = reinterpret_cast<const int32_t*>(q);
  const int64_t q32_stride = q_stride / kGroup;
  int64_t g = 0;
  for (; g + 2 <= groups; g += 2) {  // two chains per row: vpdpbusd's latency is hidden for one row too
    __m512i w0 = _mm512_loadu_si512(tile + g * 64);
    __m512i w1 = _mm512_loadu_si512(tile + g * 64 + 64);
    for (int r = 0; r < kRows; ++r) {
      acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], _mm512_set1_epi32(q32[r * q32_stride + g]), w0);
      acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], _mm512_set1_epi32(q32[r * q32_stride + g + 1]), w1);
    }
  }
  for (; g < groups; ++g) {
    __m512i w0 = _mm512_loadu_si512(tile + g * 64);
    for (int r = 0; r < kRows; ++r)
      acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], _mm512_set1_epi32(q32[r * q32_stride + g]), w0);
  }
  for (int r = 0; r < kRows; ++r)
    _mm512_storeu_si512(sums + r * kTile, _mm512_add_epi32(acc[r][0], acc[r][1]));
}

template <int kRows>
__attribute__((target("avx2"))) void tile_avx2(
    const int8_t* tile, const uint8_t* q, int64_t q_stride, int64_t groups, int32_t* sums) {
  __m256i acc[kRows][2];
  for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  const int32_t* q32 = reinterpret_cast<const int32_t*>(q);
  const int64_t q32_stride = q_stride / kGroup;
  for (int64_t g = 0; g < groups; ++g) {
    __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + g * 64));       // outputs 0-7
    __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + g * 64 + 32));  // outputs 8-15
    for (int r = 0; r < kRows; ++r) {
      __m256i b = _mm256_set1_epi32(q32[r * q32_stride + g]);
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(b, lo), ones));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(b, hi), ones));
    }
  }
  for (int r = 0; r < kRows; ++r) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(sums + r * kTile), acc[r][0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(sums + r * kTile + 8), acc[r][1]);
  }
}

using TileFn = void (*)(const int8_t*, const uint8_t*, int64_t, int64_t, int32_t*);

template <template <int> class Pick>
TileFn for_rows(int rows) {
  switch (rows) {
    case 1: return Pick<1>::fn;
    case 2: return Pick<2>::fn;
    case 3: return Pick<3>::fn;
    case 4: return Pick<4>::fn;
    case 5: return Pick<5>::fn;
    case 6: return Pick<6>::fn;
    case 7: return Pick<7>::fn;
    default: return Pick<8>::fn;
  }
}
template <int R> struct Vnni { static constexpr TileFn fn = tile_vnni<R>; };
template <int R> struct Avx2 { static constexpr TileFn fn = tile_avx2<R>; };

// x: [M, K] fp32, each row scaled to max |x| <= 1; packed: [N_pad / 16, K_pad / 4, 16, 4] int8;
// offsets: [N_pad] int32, 63 * sum_k w[n, k]; multipliers: [N_pad] fp32, scale * w_scale[n];
// simd: 2 = AVX-512 VNNI, 1 = AVX2. Returns [M, n] fp32.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& offsets,
                       const at::Tensor& multipliers, int64_t n, double scale, int64_t simd) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous [M, K] fp32");
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == kTile && packed.size(3) == kGroup, "packed weights expected");
  TORCH_CHECK(simd == 1 || simd == 2, "simd must be 1 (AVX2) or 2 (AVX-512 VNNI)");
  const int64_t rows = x.size(0), k = x.size(1), tiles = packed.size(0), groups = packed.size(1);
  TORCH_CHECK(k <= groups * kGroup && n <= tiles * kTile, "x or n does not match the packed weights");
  const int64_t k_pad = groups * kGroup;
  at::Tensor out = at::empty({rows, n}, x.options());
  if (rows == 0 || n == 0) return out;

  // the input rows as fbgemm quantises them: x * (1 / scale), rounded half to even, + the zero point
  std::vector<uint8_t> q(rows * k_pad, 0);
  const float inverse = 1.0f / static_cast<float>(scale);
  const float* xp = x.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < k; ++i) {
      float v = std::nearbyint(xp[r * k + i] * inverse) + static_cast<float>(kZeroPoint);
      q[r * k_pad + i] = static_cast<uint8_t>(std::min(255.0f, std::max(0.0f, v)));
    }

  const int8_t* wp = packed.data_ptr<int8_t>();
  const int32_t* op = offsets.data_ptr<int32_t>();
  const float* mp = multipliers.data_ptr<float>();
  float* yp = out.data_ptr<float>();
  // enough tiles per task that a thread streams a long run of weights (grain: ~64 KB of them)
  const int64_t grain = std::max<int64_t>(1, 65536 / (groups * 64));
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    int32_t sums[kMostRows * kTile];
    for (int64_t t = begin; t < end; ++t) {
      const int8_t* tile = wp + t * groups * 64;
      const int64_t first = t * kTile, width = std::min<int64_t>(kTile, n - first);
      for (int64_t r0 = 0; r0 < rows; r0 += kMostRows) {
        const int block = static_cast<int>(std::min<int64_t>(kMostRows, rows - r0));
        TileFn fn = simd == 2 ? for_rows<Vnni>(block) : for_rows<Avx2>(block);
        fn(tile, q.data() + r0 * k_pad, k_pad, groups, sums);
        for (int r = 0; r < block; ++r)
          for (int64_t j = 0; j < width; ++j)
            yp[(r0 + r) * n + first + j] =
                static_cast<float>(sums[r * kTile + j] - op[first + j]) * mp[first + j];
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(shakespeare_native, m) {
  m.def("int8_linear(Tensor x, Tensor packed, Tensor offsets, Tensor multipliers, int n, float scale, int simd)"
        " -> Tensor");
}

TORCH_LIBRARY_IMPL(shakespeare_native, CPU, m) { m.impl("int8_linear", int8_linear); }
