// This project's C++ library: Int8Linear's forward pass, and a decoding step's attention (attend, at the end).
//
// Int8Linear's forward pass in one call: int8 weights with one scale per output row, fp32 input rows. Up to a
// configured number of rows (a decoding step) it runs the kernel below; for more (prompt chunks) fbgemm's kernel,
// with Int8Linear's row scaling and bias around it. serve/native.py builds this file at first use and loads it as
// torch.ops.shakespeare_native.
//
// Every path computes exactly what Int8Linear's torch operations around fbgemm compute, bit for bit:
//   s = max(max |x|, 1e-30) per row; a = nearbyint((x / s) * (1 / scale)) (7 bits: -63..63, fbgemm's
//   unsigned input minus its zero point 63); acc = sum_k a * w (an exact integer);
//   y = float(acc) * (scale * w_scale[n]); out = y * s, or bias + y * s in one rounding (as torch's addcmul).
// Integer sums are exact in any order, so a row's output never depends on how many rows share the call, and
// serving may switch between the paths at any moment without changing a single token. It is built with
// -ffp-contract=off: no other multiply and add may fuse into one rounding.
//
// The weights are stored as unsigned bytes (w + 128) in tiles of 16 output rows x 4 inputs (64 bytes, row n's 4
// bytes together), so one 512-bit load feeds 16 outputs, and each input row's 4 signed bytes are broadcast from
// memory into the multiply (vpdpbusd's second operand): every weight byte is read once per call for up to 8
// input rows, with no horizontal sums; acc = sum (w + 128) * a - 128 * sum a. Two paths, chosen by the caller
// from the CPU's features: AVX-512 VNNI (vpdpbusd) and AVX2 (vpmaddubsw: 255 x 63 x 2 stays below 32,767, so
// the int16 pairs never saturate, which is why the input range uses 7 bits).

#include <ATen/Parallel.h>
#include <ATen/native/quantized/PackedParams.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <mutex>
#include <optional>
#include <vector>

namespace {

constexpr int kTile = 16;         // output rows per tile
constexpr int kGroup = 4;         // inputs per group (one int32 lane)
constexpr int kLevels = 63;       // |a| <= 63: Int8Linear's input range (INPUT_ZERO_POINT)
constexpr int kMostRows = 8;      // input rows one pass over the weights serves

// What turns a tile's integer sums into outputs, for the input rows of one pass.
struct Epilogue {
  const float* multipliers;  // the tile's 16
  const float* bias;         // the tile's 16, or null
  const float* row_scale;    // per input row: its max |x|
  const int32_t* correction; // per input row: 128 * sum a
  float* out;                // row 0's first output of the tile
  int64_t out_stride;        // outputs per row (n)
  int64_t width;             // outputs of this tile that exist (16, or fewer in the last tile)
};

// acc - correction, times the multiplier, times the row's scale, plus the bias: torch's addcmul fuses that last
// multiply and add into one rounding (an FMA), so this does too
template <int kRows>
__attribute__((target("avx512f,avx512bw,avx512vnni,fma"))) void tile_vnni(
    const uint8_t* tile, const int8_t* a, int64_t a_stride, int64_t groups, const Epilogue& e) {
  __m512i acc[kRows][2];
  for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
  const int32_t* a32 = reinterpret_cast<const int32_t*>(a);
  const int64_t a32_stride = a_stride / kGroup;
  int64_t g = 0;
  for (; g + 2 <= groups; g += 2) {  // two chains per row: vpdpbusd's latency is hidden for one row too
    __m512i w0 = _mm512_loadu_si512(tile + g * 64);
    __m512i w1 = _mm512_loadu_si512(tile + g * 64 + 64);
    for (int r = 0; r < kRows; ++r) {
      acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], w0, _mm512_set1_epi32(a32[r * a32_stride + g]));
      acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], w1, _mm512_set1_epi32(a32[r * a32_stride + g + 1]));
    }
  }
  for (; g < groups; ++g) {
    __m512i w0 = _mm512_loadu_si512(tile + g * 64);
    for (int r = 0; r < kRows; ++r)
      acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], w0, _mm512_set1_epi32(a32[r * a32_stride + g]));
  }
  const __m512 multipliers = _mm512_loadu_ps(e.multipliers);
  const __mmask16 keep = static_cast<__mmask16>((1u << e.width) - 1);
  for (int r = 0; r < kRows; ++r) {
    __m512i sums = _mm512_sub_epi32(_mm512_add_epi32(acc[r][0], acc[r][1]), _mm512_set1_epi32(e.correction[r]));
    __m512 product = _mm512_mul_ps(_mm512_cvtepi32_ps(sums), multipliers);
    __m512 scale = _mm512_set1_ps(e.row_scale[r]);
    __m512 y = e.bias ? _mm512_fmadd_ps(product, scale, _mm512_loadu_ps(e.bias)) : _mm512_mul_ps(product, scale);
    _mm512_mask_storeu_ps(e.out + r * e.out_stride, keep, y);
  }
}

template <int kRows>
__attribute__((target("avx2,fma"))) void tile_avx2(
    const uint8_t* tile, const int8_t* a, int64_t a_stride, int64_t groups, const Epilogue& e) {
  __m256i acc[kRows][2];
  for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  const int32_t* a32 = reinterpret_cast<const int32_t*>(a);
  const int64_t a32_stride = a_stride / kGroup;
  for (int64_t g = 0; g < groups; ++g) {
    __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + g * 64));       // outputs 0-7
    __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + g * 64 + 32));  // outputs 8-15
    for (int r = 0; r < kRows; ++r) {
      __m256i b = _mm256_set1_epi32(a32[r * a32_stride + g]);
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(lo, b), ones));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(hi, b), ones));
    }
  }
  float y[kTile];
  for (int r = 0; r < kRows; ++r) {
    const __m256i correction = _mm256_set1_epi32(e.correction[r]);
    const __m256 scale = _mm256_set1_ps(e.row_scale[r]);
    for (int half = 0; half < 2; ++half) {
      __m256i sums = _mm256_sub_epi32(acc[r][half], correction);
      __m256 product = _mm256_mul_ps(_mm256_cvtepi32_ps(sums), _mm256_loadu_ps(e.multipliers + 8 * half));
      __m256 out = e.bias ? _mm256_fmadd_ps(product, scale, _mm256_loadu_ps(e.bias + 8 * half))
                          : _mm256_mul_ps(product, scale);
      _mm256_storeu_ps(y + 8 * half, out);
    }
    std::memcpy(e.out + r * e.out_stride, y, e.width * sizeof(float));
  }
}

// One input row scaled to max |x| = 1 and quantised as fbgemm quantises it: a = nearbyint((x / s) * inverse),
// half to even; returns s (max |x|, at least 1e-30) and sets *sum to the sum of a. Vectorised: on one thread,
// its scalar form (a libm call per value) took longer than the 768-wide layers' whole product.
// A row's scale as Int8Linear takes it: max |x|, at least 1e-30.
__attribute__((target("avx2,fma"))) float row_scale_of(const float* x, int64_t k) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 top8 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) top8 = _mm256_max_ps(top8, _mm256_and_ps(_mm256_loadu_ps(x + i), magnitude));
  float lanes[8];
  _mm256_storeu_ps(lanes, top8);
  float top = 0.0f;
  for (float lane : lanes) top = std::max(top, lane);
  for (; i < k; ++i) top = std::max(top, std::fabs(x[i]));
  return std::max(top, 1e-30f);
}

__attribute__((target("avx2,fma"))) float quantize_row(const float* x, int64_t k, float inverse, int8_t* a,
                                                       int32_t* sum) {
  const float s = row_scale_of(x, k);
  int64_t i = 0;

  const __m256 scale = _mm256_set1_ps(s), inverse8 = _mm256_set1_ps(inverse);
  const __m256 low = _mm256_set1_ps(-static_cast<float>(kLevels)), high = _mm256_set1_ps(127.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  __m256i sums = _mm256_setzero_si256();
  for (; i + 32 <= k; i += 32) {
    __m256i q[4];
    for (int part = 0; part < 4; ++part) {
      __m256 v = _mm256_mul_ps(_mm256_div_ps(_mm256_loadu_ps(x + i + 8 * part), scale), inverse8);
      v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      q[part] = _mm256_cvtps_epi32(_mm256_min_ps(high, _mm256_max_ps(low, v)));
      sums = _mm256_add_epi32(sums, q[part]);
    }
    __m256i q0 = q[0], q1 = q[1], q2 = q[2], q3 = q[3];
    __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a + i), _mm256_permutevar8x32_epi32(bytes, order));
  }
  int32_t parts[8];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(parts), sums);
  int32_t total = 0;
  for (int32_t part : parts) total += part;
  for (; i < k; ++i) {
    const float v = std::nearbyint((x[i] / s) * inverse);
    a[i] = static_cast<int8_t>(std::min(127.0f, std::max(-static_cast<float>(kLevels), v)));
    total += a[i];
  }
  *sum = total;
  return s;
}

using TileFn = void (*)(const uint8_t*, const int8_t*, int64_t, int64_t, const Epilogue&);

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

// x: [..., K] fp32; packed: [N_pad / 16, K_pad / 4, 16, 4] uint8 (w + 128); multipliers: [N_pad] fp32,
// scale * w_scale[n]; bias: [N_pad] fp32 (zeros past n) or none; simd: 2 = AVX-512 VNNI, 1 = AVX2. Returns [..., n] fp32.
at::Tensor own_kernel(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& multipliers,
                       const std::optional<at::Tensor>& bias, int64_t n, double scale, int64_t simd) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.dim() >= 1, "x must be fp32 [..., K]");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 4 && packed.size(2) == kTile &&
              packed.size(3) == kGroup, "packed weights expected");
  TORCH_CHECK(simd == 1 || simd == 2, "simd must be 1 (AVX2) or 2 (AVX-512 VNNI)");
  const at::Tensor x = x_in.contiguous();
  const int64_t k = x.size(-1), rows = k ? x.numel() / k : 0, tiles = packed.size(0), groups = packed.size(1);
  TORCH_CHECK(k <= groups * kGroup && n <= tiles * kTile, "x or n does not match the packed weights");
  TORCH_CHECK(multipliers.scalar_type() == at::kFloat && multipliers.numel() == tiles * kTile &&
              multipliers.is_contiguous(), "multipliers must be a contiguous fp32 [N_pad]");
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->numel() == tiles * kTile && bias->is_contiguous()),
              "bias must be a contiguous fp32 [N_pad]");
  const int64_t k_pad = groups * kGroup;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  at::Tensor out = at::empty(shape, x.options());
  if (rows == 0 || n == 0) return out;

  // each row scaled to max |x| = 1 and quantised as fbgemm quantises it (x * (1 / scale), half to even)
  std::vector<int8_t> a(rows * k_pad, 0);
  std::vector<float> row_scale(rows);
  std::vector<int32_t> correction(rows);  // 128 * sum a: what the weights' +128 adds to each sum
  const float inverse = 1.0f / static_cast<float>(scale);
  const float* xp = x.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    int32_t sum = 0;
    row_scale[r] = quantize_row(xp + r * k, k, inverse, a.data() + r * k_pad, &sum);
    correction[r] = 128 * sum;
  }

  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const float* mp = multipliers.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  float* yp = out.data_ptr<float>();
  // enough tiles per task that a thread streams a long run of weights (grain: ~64 KB of them)
  const int64_t grain = std::max<int64_t>(1, 65536 / (groups * 64));
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const uint8_t* tile = wp + t * groups * 64;
      const int64_t first = t * kTile;
      for (int64_t r0 = 0; r0 < rows; r0 += kMostRows) {
        const int block = static_cast<int>(std::min<int64_t>(kMostRows, rows - r0));
        const Epilogue e{mp + first, bp ? bp + first : nullptr, row_scale.data() + r0, correction.data() + r0,
                         yp + r0 * n + first, n, std::min<int64_t>(kTile, n - first)};
        (simd == 2 ? for_rows<Vnni>(block) : for_rows<Avx2>(block))(tile, a.data() + r0 * k_pad, k_pad, groups, e);
      }
    }
  });
  return out;
}

// fbgemm's kernel with the torch operations Int8Linear wraps it in: each row divided by its scale, fbgemm's int8
// Linear (it quantises with the fixed range itself), then y * s or bias + y * s (one rounding, as addcmul).
__attribute__((target("avx2,fma"))) at::Tensor fbgemm_kernel(const at::Tensor& x_in, LinearPackedParamsBase& fbgemm,
                                                             const std::optional<at::Tensor>& bias, int64_t n,
                                                             double scale) {
  const at::Tensor x = x_in.contiguous();
  const int64_t k = x.size(-1), rows = k ? x.numel() / k : 0;
  at::Tensor scaled = at::empty({rows, k}, x.options());
  std::vector<float> row_scale(rows);
  const float* xp = x.data_ptr<float>();
  float* sp = scaled.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float s = row_scale_of(xp + r * k, k);
    const __m256 s8 = _mm256_set1_ps(s);
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) _mm256_storeu_ps(sp + r * k + i, _mm256_div_ps(_mm256_loadu_ps(xp + r * k + i), s8));
    for (; i < k; ++i) sp[r * k + i] = xp[r * k + i] / s;
    row_scale[r] = s;
  }
  at::Tensor y = fbgemm.apply_with_input_q_dq_qweight_dq_output_fp32(scaled, scale, kLevels);
  TORCH_CHECK(y.is_contiguous() && y.numel() == rows * n, "fbgemm's output is not [rows, n]");
  float* yp = y.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  for (int64_t r = 0; r < rows; ++r) {
    const __m256 s8 = _mm256_set1_ps(row_scale[r]);
    float* row = yp + r * n;
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      const __m256 v = _mm256_loadu_ps(row + j);
      _mm256_storeu_ps(row + j, bp ? _mm256_fmadd_ps(v, s8, _mm256_loadu_ps(bp + j)) : _mm256_mul_ps(v, s8));
    }
    for (; j < n; ++j) row[j] = bp ? std::fma(row[j], row_scale[r], bp[j]) : row[j] * row_scale[r];
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return y.view(shape);
}

// The layers this process serves, by number: fbgemm's packed weights and this kernel's, side by side.
struct Layer {
  c10::intrusive_ptr<LinearPackedParamsBase> fbgemm;
  at::Tensor packed, multipliers;
  std::optional<at::Tensor> bias;  // padded to N_pad, for this kernel's tiles
  int64_t n;
  double scale;
};
std::mutex registry_lock;
std::deque<Layer> registry;
int64_t configured_simd = 0, configured_most_rows = 0;  // set by configure(): no own kernel until then

int64_t register_layer(c10::intrusive_ptr<LinearPackedParamsBase> fbgemm, at::Tensor packed, at::Tensor multipliers,
                       std::optional<at::Tensor> bias, int64_t n, double scale) {
  std::lock_guard<std::mutex> guard(registry_lock);
  registry.push_back(Layer{std::move(fbgemm), std::move(packed), std::move(multipliers), std::move(bias), n, scale});
  return static_cast<int64_t>(registry.size()) - 1;
}

void configure(int64_t simd, int64_t most_rows) {
  TORCH_CHECK(simd == 0 || simd == 1 || simd == 2, "simd must be 0 (none), 1 (AVX2) or 2 (AVX-512 VNNI)");
  configured_simd = simd;
  configured_most_rows = most_rows;
}

// The path a call of this many rows takes by default: the configured one for up to the configured rows, else fbgemm.
int64_t chosen_path(int64_t rows) {
  return configured_simd != 0 && rows <= configured_most_rows ? configured_simd : 0;
}

// Int8Linear's forward pass for layer `layer`: path 1 or 2 this kernel (AVX2, AVX-512 VNNI), 0 fbgemm's, -1 the
// configured path for calls of up to the configured rows and fbgemm's for more. Every path gives the same bits.
// with_bias false leaves the bias out: on rows already scaled to max |x| = 1 that is fbgemm's int8 product alone.
at::Tensor linear(const at::Tensor& x, int64_t layer, int64_t out_features, int64_t path, bool with_bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() >= 1, "x must be fp32 [..., K]");
  Layer* entry;
  {
    std::lock_guard<std::mutex> guard(registry_lock);
    TORCH_CHECK(layer >= 0 && layer < static_cast<int64_t>(registry.size()), "no int8 layer number ", layer);
    entry = &registry[layer];  // a deque keeps its elements in place as it grows
  }
  TORCH_CHECK(entry->n == out_features, "layer ", layer, " has ", entry->n, " outputs, not ", out_features);
  if (path < 0) path = chosen_path(x.size(-1) ? x.numel() / x.size(-1) : 0);
  std::optional<at::Tensor> bias;
  if (with_bias && entry->bias) bias = path == 0 ? entry->bias->narrow(0, 0, entry->n) : *entry->bias;
  if (path == 0) return fbgemm_kernel(x, *entry->fbgemm, bias, entry->n, entry->scale);
  return own_kernel(x, entry->packed, entry->multipliers, bias, entry->n, entry->scale, path);
}

// The sum of a vector's 8 lanes, in one fixed order.
__attribute__((target("avx2,fma"))) inline float lane_sum(__m256 v) {
  float lanes[8];
  _mm256_storeu_ps(lanes, v);
  return ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
}

// One query (d values, d a multiple of 8) against positions 0 .. n-1 of one head of one cache slot (keys, values:
// n rows of d): scores = (q . k) * scale, softmax, then the weighted sum of the values, every sum in one fixed
// order. The work is this row's alone: its result never depends on the rows beside it in the call. kD: d known
// at compile time (64 in every GPT-2), so the output stays in registers; 0 reads d at run time.
template <int kD>
__attribute__((target("avx2,fma"))) void attend_row(const float* q, const float* keys, const float* values,
                                                     int64_t n, int64_t d_run, float scale, float* scores, float* y) {
  const int64_t d = kD ? kD : d_run;
  float top = -INFINITY;
  int64_t p = 0;
  for (; p + 4 <= n; p += 4) {  // four positions at once: four independent chains of multiply-adds
    const float* k = keys + p * d;
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (int64_t i = 0; i < d; i += 8) {
      const __m256 q8 = _mm256_loadu_ps(q + i);
      s0 = _mm256_fmadd_ps(q8, _mm256_loadu_ps(k + i), s0);
      s1 = _mm256_fmadd_ps(q8, _mm256_loadu_ps(k + d + i), s1);
      s2 = _mm256_fmadd_ps(q8, _mm256_loadu_ps(k + 2 * d + i), s2);
      s3 = _mm256_fmadd_ps(q8, _mm256_loadu_ps(k + 3 * d + i), s3);
    }
    scores[p] = lane_sum(s0) * scale;
    scores[p + 1] = lane_sum(s1) * scale;
    scores[p + 2] = lane_sum(s2) * scale;
    scores[p + 3] = lane_sum(s3) * scale;
  }
  for (; p < n; ++p) {  // the same sums, one position at a time
    __m256 s0 = _mm256_setzero_ps();
    for (int64_t i = 0; i < d; i += 8)
      s0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(keys + p * d + i), s0);
    scores[p] = lane_sum(s0) * scale;
  }
  for (p = 0; p < n; ++p) top = std::max(top, scores[p]);
  float total = 0.0f;
  for (p = 0; p < n; ++p) {
    scores[p] = std::exp(scores[p] - top);
    total += scores[p];
  }
  if constexpr (kD > 0) {
    __m256 out[kD / 8];
    for (int i = 0; i < kD / 8; ++i) out[i] = _mm256_setzero_ps();
    for (p = 0; p < n; ++p) {
      const __m256 weight = _mm256_set1_ps(scores[p] / total);
      for (int i = 0; i < kD / 8; ++i)
        out[i] = _mm256_fmadd_ps(weight, _mm256_loadu_ps(values + p * kD + 8 * i), out[i]);
    }
    for (int i = 0; i < kD / 8; ++i) _mm256_storeu_ps(y + 8 * i, out[i]);
  } else {
    for (int64_t i = 0; i < d; ++i) y[i] = 0.0f;
    for (p = 0; p < n; ++p) {
      const __m256 weight = _mm256_set1_ps(scores[p] / total);
      for (int64_t i = 0; i < d; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(weight, _mm256_loadu_ps(values + p * d + i), _mm256_loadu_ps(y + i)));
    }
  }
}

// A decoding step's attention: row b's query q[b] (heads x d) over positions 0 .. positions[b] of its cache slot
// slots[b] (keys, values: slots x heads x context x d, the new position already written), every (row, head) a task
// of its own, spread over the threads. Returns [rows, heads, d].
at::Tensor attend(const at::Tensor& q_in, const at::Tensor& keys, const at::Tensor& values, const at::Tensor& slots_in,
                  const at::Tensor& positions_in, double scale) {
  TORCH_CHECK(q_in.scalar_type() == at::kFloat && q_in.dim() == 3, "q must be fp32 [rows, heads, head size]");
  TORCH_CHECK(keys.scalar_type() == at::kFloat && keys.dim() == 4 && keys.is_contiguous() &&
                  values.scalar_type() == at::kFloat && values.is_contiguous() && values.sizes() == keys.sizes(),
              "keys and values must be one layer's cache");
  const at::Tensor q = q_in.contiguous(), slots = slots_in.to(at::kLong).contiguous(),
                   positions = positions_in.to(at::kLong).contiguous();
  const int64_t rows = q.size(0), heads = q.size(1), d = q.size(2), context = keys.size(2);
  TORCH_CHECK(keys.size(1) == heads && keys.size(3) == d && slots.numel() == rows && positions.numel() == rows,
              "q, the cache, slots and positions do not match");
  TORCH_CHECK(d % 8 == 0, "the head size must be a multiple of 8, not ", d);
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t* position = positions.data_ptr<int64_t>();
  for (int64_t b = 0; b < rows; ++b)
    TORCH_CHECK(slot[b] >= 0 && slot[b] < keys.size(0) && position[b] >= 0 && position[b] < context,
                "row ", b, ": slot ", slot[b], " or position ", position[b], " is outside the cache");
  at::Tensor out = at::empty({rows, heads, d}, q.options());
  const float *q_data = q.data_ptr<float>(), *k_data = keys.data_ptr<float>(), *v_data = values.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  at::parallel_for(0, rows * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(context);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / heads, h = task % heads;
      const int64_t offset = (slot[b] * heads + h) * context * d;
      (d == 64 ? attend_row<64> : attend_row<0>)(q_data + task * d, k_data + offset, v_data + offset, position[b] + 1,
                                                   d, static_cast<float>(scale), scores.data(), out_data + task * d);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(shakespeare_native, m) {
  m.def("register_layer(__torch__.torch.classes.quantized.LinearPackedParamsBase fbgemm, Tensor packed, "
        "Tensor multipliers, Tensor? bias, int n, float scale) -> int", register_layer);
  m.def("configure(int simd, int most_rows) -> ()", configure);
  m.def("chosen_path(int rows) -> int", chosen_path);
  m.def("linear(Tensor x, int layer, int out_features, int path=-1, bool with_bias=True) -> Tensor");
  m.def("attend(Tensor q, Tensor keys, Tensor values, Tensor slots, Tensor positions, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(shakespeare_native, CPU, m) {
  m.impl("linear", linear);
  m.impl("attend", attend);
}
