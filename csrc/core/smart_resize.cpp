#include "smart_resize.h"

#include <algorithm>
#include <cmath>

namespace uae {

namespace {

// Python's round(): ties go to the even neighbour. std::nearbyint honours the current rounding mode, which is
// round-to-nearest-even unless someone changed it; std::round would round ties away from zero and disagree.
int64_t round_half_even(double x) { return static_cast<int64_t>(std::nearbyint(x)); }

}  // namespace

ResizeTarget smart_resize(int64_t height, int64_t width, int64_t factor, int64_t min_pixels, int64_t max_pixels) {
  if (height <= 0 || width <= 0) {
    throw InvalidImageSize("image size must be positive, got " + std::to_string(height) + "x" + std::to_string(width));
  }
  if (factor <= 0 || min_pixels < 0 || max_pixels <= 0 || min_pixels > max_pixels) {
    throw std::invalid_argument("smart_resize: need factor > 0 and 0 <= min_pixels <= max_pixels");
  }
  const double h = static_cast<double>(height);
  const double w = static_cast<double>(width);
  const double f = static_cast<double>(factor);
  if (std::max(h, w) / std::min(h, w) > 200.0) {
    throw InvalidImageSize("absolute aspect ratio must be smaller than 200, got " +
                           std::to_string(std::max(h, w) / std::min(h, w)));
  }
  int64_t h_bar = round_half_even(h / f) * factor;
  int64_t w_bar = round_half_even(w / f) * factor;
  if (h_bar * w_bar > max_pixels) {
    const double beta = std::sqrt(h * w / static_cast<double>(max_pixels));
    h_bar = std::max(factor, static_cast<int64_t>(std::floor(h / beta / f)) * factor);
    w_bar = std::max(factor, static_cast<int64_t>(std::floor(w / beta / f)) * factor);
  } else if (h_bar * w_bar < min_pixels) {
    const double beta = std::sqrt(static_cast<double>(min_pixels) / (h * w));
    h_bar = static_cast<int64_t>(std::ceil(h * beta / f)) * factor;
    w_bar = static_cast<int64_t>(std::ceil(w * beta / f)) * factor;
  }
  return {h_bar, w_bar};
}

}  // namespace uae
