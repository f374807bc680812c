// AVX2 kernels of the two resize passes, for filters whose weights fit int16 (torchvision compatibility).
//
// They compute exactly the integer sums of the scalar passes (same weights, same rounding bias, same floor shift
// and clamp), only faster: _mm256_madd_epi16 multiplies 16 uint8-as-int16 samples by int16 weights and adds
// adjacent pairs, so two taps are accumulated per instruction. The functions carry a target("avx2") attribute
// instead of the whole file being built with -mavx2: then no inline helper compiled here can leak AVX2
// instructions into code that runs on a CPU without it.
#include <algorithm>
#include <cstring>
#include <vector>

#include "resize.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define UAE_HAVE_AVX2_KERNELS 1
#include <immintrin.h>
#endif

namespace uae {

bool cpu_has_avx2() {
#ifdef UAE_HAVE_AVX2_KERNELS
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
#else
  return false;
#endif
}

namespace detail {

#ifdef UAE_HAVE_AVX2_KERNELS

template <int R, bool kInBounds>
__attribute__((target("avx2"))) inline void horizontal_rows_avx2(const uint8_t* src, int64_t src_stride,
                                                                 const uint8_t* src_end, const AxisFilter& f,
                                                                 const int16_t* wv, const int64_t* groups,
                                                                 int64_t max_groups, int32_t half, uint8_t* dst,
                                                                 int64_t dst_stride) {
  // Taps go four at a time: one 16-byte load holds pixels k..k+3 (12 bytes) of the packed RGB row. The shuffle
  // turns them into int16 pairs (r_k, r_k+1), (g_k, g_k+1), (b_k, b_k+1), (0, 0) in the low half and the same for
  // k+2, k+3 in the high half; madd with (w_k, w_k+1) / (w_k+2, w_k+3) pairs gives partial R, G, B sums.
  const __m256i shuffle = _mm256_setr_epi8(0, -1, 3, -1, 1, -1, 4, -1, 2, -1, 5, -1, -1, -1, -1, -1,  //
                                           6, -1, 9, -1, 7, -1, 10, -1, 8, -1, 11, -1, -1, -1, -1, -1);
  const __m256i bias = _mm256_setr_epi32(half, half, half, 0, 0, 0, 0, 0);
  const __m128i shift = _mm_cvtsi32_si128(f.precision);
  for (int64_t x = 0; x < f.out_size; ++x) {
    const int16_t* wx = wv + x * max_groups * 16;
    __m256i acc[R];
    for (int r = 0; r < R; ++r) acc[r] = bias;
    for (int64_t g = 0; g < groups[x]; ++g) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wx + 16 * g));
      for (int r = 0; r < R; ++r) {
        const uint8_t* q = src + r * src_stride + (f.start[x] + 4 * g) * 3;
        __m128i px;
        if (kInBounds || q + 16 <= src_end) {
          px = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
        } else {  // the last pixels of the caller's buffer: never read past its end
          alignas(16) uint8_t tmp[16] = {0};
          std::memcpy(tmp, q, static_cast<size_t>(src_end - q));
          px = _mm_load_si128(reinterpret_cast<const __m128i*>(tmp));
        }
        const __m256i v = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(px), shuffle);
        acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(v, w));
      }
    }
    // All but the last pixel of a row store 4 bytes at once: the 4th lands on the next pixel's R, which is
    // written (correctly) in the next iteration. Byte stores were ~1/4 of this loop's instructions.
    const bool last = x + 1 == f.out_size;
    for (int r = 0; r < R; ++r) {
      __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc[r]), _mm256_extracti128_si256(acc[r], 1));
      s = _mm_sra_epi32(s, shift);
      s = _mm_packus_epi16(_mm_packs_epi32(s, s), s);  // saturating packs = clamp to [0, 255]
      const uint32_t rgb = static_cast<uint32_t>(_mm_cvtsi128_si32(s));
      uint8_t* out = dst + r * dst_stride + 3 * x;
      if (!last) {
        std::memcpy(out, &rgb, 4);
      } else {
        out[0] = static_cast<uint8_t>(rgb);
        out[1] = static_cast<uint8_t>(rgb >> 8);
        out[2] = static_cast<uint8_t>(rgb >> 16);
      }
    }
  }
}

__attribute__((target("avx2"))) void horizontal_pass_avx2(const uint8_t* src, int64_t rows, int64_t src_stride,
                                                          const uint8_t* src_end, const AxisFilter& f, uint8_t* dst,
                                                          int64_t dst_stride) {
  // Weights expanded once per output pixel into the madd layout of horizontal_rows_avx2.
  const int64_t max_groups = (f.taps + 3) / 4;
  std::vector<int16_t> wv(static_cast<size_t>(f.out_size * max_groups * 16), 0);
  std::vector<int64_t> groups(static_cast<size_t>(f.out_size));
  for (int64_t x = 0; x < f.out_size; ++x) {
    groups[x] = (f.size[x] + 3) / 4;
    const int32_t* w = &f.weight[static_cast<size_t>(x * f.taps)];
    for (int64_t g = 0; g < groups[x]; ++g) {
      int16_t q[4];
      for (int t = 0; t < 4; ++t) {
        const int64_t k = 4 * g + t;
        q[t] = k < f.size[x] ? static_cast<int16_t>(w[k]) : int16_t{0};  // padded taps read real pixels x 0
      }
      int16_t* out = &wv[static_cast<size_t>((x * max_groups + g) * 16)];
      for (int i = 0; i < 4; ++i) {
        out[2 * i] = q[0];
        out[2 * i + 1] = q[1];
        out[8 + 2 * i] = q[2];
        out[8 + 2 * i + 1] = q[3];
      }
    }
  }
  const int32_t half = int32_t{1} << (f.precision - 1);
  // Four rows share each weight load and give four independent accumulation chains: with one row the loop is
  // bound by the madd -> add latency, not by throughput.
  // A 16-byte load starts at most 3 * (width - 1) bytes into a row, so a block whose last row has 13 bytes after
  // it in the buffer needs no bounds check at all.
  const int64_t row_bytes = f.in_size * 3;
  int64_t y = 0;
  for (; y + 4 <= rows; y += 4) {
    const uint8_t* s = src + y * src_stride;
    uint8_t* d = dst + y * dst_stride;
    if (s + 3 * src_stride + row_bytes + 13 <= src_end) {
      horizontal_rows_avx2<4, true>(s, src_stride, src_end, f, wv.data(), groups.data(), max_groups, half, d,
                                    dst_stride);
    } else {
      horizontal_rows_avx2<4, false>(s, src_stride, src_end, f, wv.data(), groups.data(), max_groups, half, d,
                                     dst_stride);
    }
  }
  for (; y < rows; ++y) {
    horizontal_rows_avx2<1, false>(src + y * src_stride, src_stride, src_end, f, wv.data(), groups.data(),
                                   max_groups, half, dst + y * dst_stride, dst_stride);
  }
}

__attribute__((target("avx2"))) void vertical_pass_avx2(const uint8_t* src, int64_t row_bytes, int64_t src_stride,
                                                        const AxisFilter& f, uint8_t* dst, int64_t dst_stride) {
  // 16 bytes of a row at a time; rows k and k+1 are interleaved byte-wise so one madd applies both weights.
  // Only whole 16-byte chunks go through SIMD (no read or write past a row); the tail uses scalar code.
  const int32_t half = int32_t{1} << (f.precision - 1);
  const __m256i bias = _mm256_set1_epi32(half);
  const __m128i shift = _mm_cvtsi32_si128(f.precision);
  const __m128i zero = _mm_setzero_si128();
  for (int64_t y = 0; y < f.out_size; ++y) {
    const int32_t* w = &f.weight[static_cast<size_t>(y * f.taps)];
    const int64_t n = f.size[y];
    const uint8_t* base = src + f.start[y] * src_stride;
    uint8_t* out = dst + y * dst_stride;
    int64_t j = 0;
    for (; j + 16 <= row_bytes; j += 16) {
      __m256i lo = bias, hi = bias;
      int64_t k = 0;
      for (; k + 1 < n; k += 2) {
        const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(base + k * src_stride + j));
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(base + (k + 1) * src_stride + j));
        const __m256i wp = _mm256_set1_epi32(static_cast<int32_t>((static_cast<uint32_t>(w[k]) & 0xffffu) |
                                                                  (static_cast<uint32_t>(w[k + 1]) << 16)));
        lo = _mm256_add_epi32(lo, _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_unpacklo_epi8(a, b)), wp));
        hi = _mm256_add_epi32(hi, _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_unpackhi_epi8(a, b)), wp));
      }
      if (k < n) {
        const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(base + k * src_stride + j));
        const __m256i wp = _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(w[k]) & 0xffffu));
        lo = _mm256_add_epi32(lo, _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_unpacklo_epi8(a, zero)), wp));
        hi = _mm256_add_epi32(hi, _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_unpackhi_epi8(a, zero)), wp));
      }
      lo = _mm256_sra_epi32(lo, shift);
      hi = _mm256_sra_epi32(hi, shift);
      // packs works per 128-bit lane: [lo0-3 hi0-3 | lo4-7 hi4-7]; the permute restores [lo0-7 | hi0-7].
      const __m256i words = _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8);
      const __m128i bytes = _mm_packus_epi16(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j), bytes);
    }
    for (; j < row_bytes; ++j) {
      int32_t acc = half;
      for (int64_t k = 0; k < n; ++k) acc += w[k] * base[k * src_stride + j];
      const int32_t v = acc >> f.precision;
      out[j] = static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
    }
  }
}

#else  // no AVX2 kernels on this compiler/architecture: cpu_has_avx2() is false, so these are never called

void horizontal_pass_avx2(const uint8_t* src, int64_t rows, int64_t src_stride, const uint8_t*, const AxisFilter& f,
                          uint8_t* dst, int64_t dst_stride) {
  horizontal_pass_scalar(src, rows, src_stride, f, dst, dst_stride);
}

void vertical_pass_avx2(const uint8_t* src, int64_t row_bytes, int64_t src_stride, const AxisFilter& f, uint8_t* dst,
                        int64_t dst_stride) {
  vertical_pass_scalar(src, row_bytes, src_stride, f, dst, dst_stride);
}

#endif

}  // namespace detail
}  // namespace uae
