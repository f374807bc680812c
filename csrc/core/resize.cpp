#include "resize.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

namespace uae {

namespace {

// Keys' cubic convolution kernel with a = -0.5, written in the same operation order as Pillow's bicubic_filter
// so the double weights are identical before quantisation.
double keys_cubic(double x) {
  constexpr double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
  if (x < 2.0) return (((x - 5.0) * x + 8.0) * x - 4.0) * a;
  return 0.0;
}

inline uint8_t clamp_shift(int32_t acc, int precision) {
  const int32_t v = acc >> precision;  // arithmetic shift = floor, as both libraries do
  return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

}  // namespace

AxisFilter make_bicubic_filter(int64_t in_size, int64_t out_size, ResizeCompat compat) {
  if (in_size <= 0 || out_size <= 0) {
    throw std::invalid_argument("resize: sizes must be positive, got " + std::to_string(in_size) + " -> " +
                                std::to_string(out_size));
  }
  AxisFilter f;
  f.in_size = in_size;
  f.out_size = out_size;
  const double scale = static_cast<double>(in_size) / static_cast<double>(out_size);
  const double filter_scale = std::max(scale, 1.0);  // upscaling keeps the plain kernel; downscaling widens it
  const double support = 2.0 * filter_scale;
  const double inv = 1.0 / filter_scale;
  f.taps = static_cast<int64_t>(std::ceil(support)) * 2 + 1;
  f.start.resize(out_size);
  f.size.resize(out_size);
  std::vector<double> w(static_cast<size_t>(out_size * f.taps), 0.0);
  double w_max = 0.0;
  for (int64_t i = 0; i < out_size; ++i) {
    const double center = scale * (static_cast<double>(i) + 0.5);
    // Truncation toward zero of (x + 0.5) is the libraries' rounding; reproduce it, not std::round.
    const int64_t lo = std::max<int64_t>(static_cast<int64_t>(center - support + 0.5), 0);
    int64_t n = std::min<int64_t>(static_cast<int64_t>(center + support + 0.5), in_size) - lo;
    n = std::clamp<int64_t>(n, 0, f.taps);
    double* wi = &w[static_cast<size_t>(i * f.taps)];
    double total = 0.0;
    for (int64_t k = 0; k < n; ++k) {
      wi[k] = keys_cubic((static_cast<double>(k + lo) - center + 0.5) * inv);
      total += wi[k];
    }
    if (total != 0.0) {
      for (int64_t k = 0; k < n; ++k) {
        wi[k] /= total;
        w_max = std::max(w_max, wi[k]);
      }
    }
    f.start[i] = lo;
    f.size[i] = n;
  }
  if (compat != ResizeCompat::kTorchvision) {
    f.precision = 22;  // Pillow: 32 - 8 bits of pixel - 2 bits of headroom
  } else {
    // torch: the largest precision (< 22) at which the largest weight still fits int16 with one bit to spare.
    int p = 0;
    for (; p < 22; ++p) {
      if (static_cast<int>(0.5 + w_max * static_cast<double>(1 << (p + 1))) >= (1 << 15)) break;
    }
    f.precision = p;
  }
  f.weight.resize(w.size());
  const double one = static_cast<double>(int64_t{1} << f.precision);
  for (size_t j = 0; j < w.size(); ++j) {
    const double v = w[j] * one;
    f.weight[j] = static_cast<int32_t>(v < 0 ? -0.5 + v : 0.5 + v);  // round half away from zero
  }
  return f;
}

namespace detail {

void horizontal_pass_scalar(const uint8_t* src, int64_t rows, int64_t src_stride, const AxisFilter& f, uint8_t* dst,
                            int64_t dst_stride) {
  // int32 accumulators suffice: |sum| <= 2^22 * 1.3 (weights incl. negative lobes) * 255 < 2^31.
  const int32_t half = int32_t{1} << (f.precision - 1);
  for (int64_t y = 0; y < rows; ++y) {
    const uint8_t* row = src + y * src_stride;
    uint8_t* out = dst + y * dst_stride;
    for (int64_t x = 0; x < f.out_size; ++x) {
      const int32_t* w = &f.weight[static_cast<size_t>(x * f.taps)];
      const uint8_t* p = row + f.start[x] * 3;
      int32_t r = half, g = half, b = half;
      for (int64_t k = 0; k < f.size[x]; ++k) {
        r += w[k] * p[3 * k];
        g += w[k] * p[3 * k + 1];
        b += w[k] * p[3 * k + 2];
      }
      out[3 * x] = clamp_shift(r, f.precision);
      out[3 * x + 1] = clamp_shift(g, f.precision);
      out[3 * x + 2] = clamp_shift(b, f.precision);
    }
  }
}

void vertical_pass_scalar(const uint8_t* src, int64_t row_bytes, int64_t src_stride, const AxisFilter& f,
                          uint8_t* dst, int64_t dst_stride) {
  const int32_t half = int32_t{1} << (f.precision - 1);
  std::vector<int32_t> acc(static_cast<size_t>(row_bytes));
  for (int64_t y = 0; y < f.out_size; ++y) {
    const int32_t* w = &f.weight[static_cast<size_t>(y * f.taps)];
    std::fill(acc.begin(), acc.end(), half);
    for (int64_t k = 0; k < f.size[y]; ++k) {
      const uint8_t* in = src + (f.start[y] + k) * src_stride;
      const int32_t wk = w[k];
      for (int64_t j = 0; j < row_bytes; ++j) acc[j] += wk * in[j];  // auto-vectorised
    }
    uint8_t* out = dst + y * dst_stride;
    for (int64_t j = 0; j < row_bytes; ++j) out[j] = clamp_shift(acc[j], f.precision);
  }
}

}  // namespace detail

namespace {

bool fits_int16(const AxisFilter& f) {
  for (int32_t v : f.weight) {
    if (v < std::numeric_limits<int16_t>::min() || v > std::numeric_limits<int16_t>::max()) return false;
  }
  return true;
}

}  // namespace

void resize_bicubic_rgb(const uint8_t* src, int64_t height, int64_t width, int64_t src_row_stride, uint8_t* dst,
                        int64_t out_height, int64_t out_width, ResizeCompat compat, SimdMode simd) {
  if (height <= 0 || width <= 0 || out_height <= 0 || out_width <= 0) {
    throw std::invalid_argument("resize: sizes must be positive, got " + std::to_string(height) + "x" +
                                std::to_string(width) + " -> " + std::to_string(out_height) + "x" +
                                std::to_string(out_width));
  }
  if (src_row_stride < width * 3) throw std::invalid_argument("resize: row stride shorter than a row");
  const int64_t out_row = out_width * 3;
  const bool need_h = out_width != width;
  const bool need_v = out_height != height;
  if (!need_h && !need_v) {
    for (int64_t y = 0; y < height; ++y) std::copy_n(src + y * src_row_stride, out_row, dst + y * out_row);
    return;
  }
  const bool avx2 = simd == SimdMode::kAuto && cpu_has_avx2();
  auto horizontal = [&](const uint8_t* in, int64_t rows, int64_t stride, const uint8_t* in_end, uint8_t* out) {
    const AxisFilter fx = make_bicubic_filter(width, out_width, compat);
    if (avx2 && fits_int16(fx)) {
      detail::horizontal_pass_avx2(in, rows, stride, in_end, fx, out, out_row);
    } else {
      detail::horizontal_pass_scalar(in, rows, stride, fx, out, out_row);
    }
  };
  auto vertical = [&](const uint8_t* in, int64_t row_bytes, int64_t stride, uint8_t* out) {
    const AxisFilter fy = make_bicubic_filter(height, out_height, compat);
    if (avx2 && fits_int16(fy)) {
      detail::vertical_pass_avx2(in, row_bytes, stride, fy, out, row_bytes);
    } else {
      detail::vertical_pass_scalar(in, row_bytes, stride, fy, out, row_bytes);
    }
  };
  const uint8_t* src_end = src + (height - 1) * src_row_stride + width * 3;
  const int64_t shrink_y = height - out_height, shrink_x = width - out_width;
  const bool vertical_first =
      compat == ResizeCompat::kPil && need_h && need_v && shrink_y > 0 && shrink_y > 2 * shrink_x;
  if (need_h && need_v) {
    if (vertical_first) {
      std::vector<uint8_t> mid(static_cast<size_t>(out_height * width * 3));
      vertical(src, width * 3, src_row_stride, mid.data());
      horizontal(mid.data(), out_height, width * 3, mid.data() + mid.size(), dst);
    } else {
      std::vector<uint8_t> mid(static_cast<size_t>(height * out_row));
      horizontal(src, height, src_row_stride, src_end, mid.data());
      vertical(mid.data(), out_row, out_row, dst);
    }
  } else if (need_h) {
    horizontal(src, height, src_row_stride, src_end, dst);
  } else {
    vertical(src, out_row, src_row_stride, dst);
  }
}

}  // namespace uae
