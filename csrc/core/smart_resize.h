// Qwen2-VL / Qwen2.5-VL target-size rule ("smart_resize"), torch-free.
//
// The vision tower consumes patches of `factor` = patch_size * merge_size pixels, so both sides of the resized
// image must be multiples of `factor`, while the pixel count stays within [min_pixels, max_pixels] and the aspect
// ratio is kept as closely as possible. This reproduces transformers' Python rule exactly, including Python's
// round-half-to-even, because a one-pixel disagreement changes `image_grid_thw` and therefore the token count.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace uae {

struct ResizeTarget {
  int64_t height;
  int64_t width;
};

// Thrown for inputs the Python rule also refuses (non-positive sizes, aspect ratio above 200).
class InvalidImageSize : public std::invalid_argument {
 public:
  explicit InvalidImageSize(const std::string& what) : std::invalid_argument(what) {}
};

ResizeTarget smart_resize(int64_t height, int64_t width, int64_t factor, int64_t min_pixels, int64_t max_pixels);

}  // namespace uae
