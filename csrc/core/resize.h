// Antialiased bicubic resize of 8-bit RGB images, bit-exact with the two resizers transformers' Qwen2-VL image
// processors call: torch's uint8 `interpolate(mode="bicubic", antialias=True)` (the torchvision backend) and
// Pillow's `Image.resize(BICUBIC)` (the PIL backend).
//
// Both are the same separable algorithm (Keys cubic, a = -0.5, support stretched by the downscale factor, weights
// normalised per output pixel, horizontal pass first, the intermediate rounded to uint8). They differ only in how
// the double weights are quantised: torch uses int16 with a per-axis precision chosen so the largest weight fits,
// Pillow uses int32 with 22 fractional bits. Reproducing the quantisation and the pass order exactly is what makes
// the outputs identical rather than merely close (a different pass order alone changes ~20% of the pixels by one
// level).
#pragma once

#include <cstdint>
#include <vector>

namespace uae {

// Which library's integer arithmetic to reproduce. Pillow 13 (python-pillow PR #9549) runs the vertical pass first
// when the height shrinks by more than twice as many pixels as the width; earlier Pillow always went horizontal
// first. The pass order changes ~10-20% of the pixels by one level, so both behaviours are kept.
enum class ResizeCompat : int { kTorchvision = 0, kPil = 1, kPilLegacy = 2 };

// Which code path runs the passes. kAuto picks AVX2 when the CPU has it and the weights fit int16 (torchvision
// compatibility); kScalar forces the portable loops (tests use it to cover both paths).
enum class SimdMode : int { kAuto = 0, kScalar = 1 };

// Fixed-point filter of one axis: output i reads `size[i]` source samples starting at `start[i]`, with integer
// weights `weight[i * taps + k]` (zero beyond size[i]) scaled by 2^precision.
struct AxisFilter {
  int64_t in_size = 0;
  int64_t out_size = 0;
  int64_t taps = 0;  // row length of `weight` (>= every size[i])
  int precision = 0;
  std::vector<int64_t> start;
  std::vector<int64_t> size;
  std::vector<int32_t> weight;
};

// Builds the filter for resizing an axis of `in_size` samples to `out_size`. Throws std::invalid_argument on
// non-positive sizes.
AxisFilter make_bicubic_filter(int64_t in_size, int64_t out_size, ResizeCompat compat);

// True when the AVX2 kernels are compiled in and the running CPU supports them.
bool cpu_has_avx2();

// Resizes an RGB uint8 image (`src_row_stride` bytes between rows, pixels packed as 3 bytes) to
// out_height x out_width, writing a packed RGB image with rows of out_width * 3 bytes to `dst`.
// A pass whose size does not change is skipped, as both reference libraries do. Weights are quantised the
// torch way for kTorchvision and the Pillow way (22 bits) for both Pillow modes.
void resize_bicubic_rgb(const uint8_t* src, int64_t height, int64_t width, int64_t src_row_stride, uint8_t* dst,
                        int64_t out_height, int64_t out_width, ResizeCompat compat, SimdMode simd);

namespace detail {

// One pass over rows: dst[y][x][c] = clamp((half + sum_k w[x][k] * src[y][start[x] + k][c]) >> precision).
void horizontal_pass_scalar(const uint8_t* src, int64_t rows, int64_t src_stride, const AxisFilter& f, uint8_t* dst,
                            int64_t dst_stride);
// One pass over columns: dst[y][j] = clamp((half + sum_k w[y][k] * src[start[y] + k][j]) >> precision).
void vertical_pass_scalar(const uint8_t* src, int64_t row_bytes, int64_t src_stride, const AxisFilter& f,
                          uint8_t* dst, int64_t dst_stride);

// AVX2 versions; only valid when cpu_has_avx2() and every weight fits int16. `src_end` bounds every read of the
// caller's buffer (loads that would cross it go through a zero-padded copy).
void horizontal_pass_avx2(const uint8_t* src, int64_t rows, int64_t src_stride, const uint8_t* src_end,
                          const AxisFilter& f, uint8_t* dst, int64_t dst_stride);
void vertical_pass_avx2(const uint8_t* src, int64_t row_bytes, int64_t src_stride, const AxisFilter& f, uint8_t* dst,
                        int64_t dst_stride);

}  // namespace detail
}  // namespace uae
