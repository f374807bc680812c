// Qwen2-VL / Qwen2.5-VL image preprocessing from decoded uint8 RGB images straight to the model inputs:
// smart_resize target, antialiased bicubic resize, rescale + normalise, temporal duplication and patchify into
// pixel_values [sum of patches, 3 * T * P * P] in transformers' element order, plus image_grid_thw.
//
// The resized image is uint8 in both reference processors, so rescale + normalise is a 256-entry lookup table per
// channel; the table is computed with each processor's own float arithmetic, which makes the output bit-exact.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "resize.h"

namespace uae {

struct QwenConfig {
  int64_t patch_size = 14;
  int64_t merge_size = 2;
  int64_t temporal_patch_size = 2;
  int64_t min_pixels = 56 * 56;
  int64_t max_pixels = 28 * 28 * 1280;
  // OpenAI CLIP statistics, as transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD.
  float mean[3] = {0.48145466f, 0.4578275f, 0.40821073f};
  float std[3] = {0.26862954f, 0.26130258f, 0.27577711f};
  ResizeCompat compat = ResizeCompat::kTorchvision;
  SimdMode simd = SimdMode::kAuto;

  int64_t factor() const { return patch_size * merge_size; }
  int64_t patch_dim() const { return 3 * temporal_patch_size * patch_size * patch_size; }
};

// A bad image or argument, with the index of the image it concerns (-1 when it concerns none).
class ImageError : public std::invalid_argument {
 public:
  ImageError(int64_t index, const std::string& what) : std::invalid_argument(what), index_(index) {}
  int64_t index() const { return index_; }

 private:
  int64_t index_;
};

// Where each image goes: resized size, patch grid and first row in pixel_values.
struct QwenPlan {
  std::vector<int64_t> height, width;  // resized size (multiples of the factor)
  std::vector<int64_t> grid_h, grid_w;  // patches per side
  std::vector<int64_t> patch_offset;    // size n + 1: image i owns rows [patch_offset[i], patch_offset[i + 1])
  int64_t total_patches() const { return patch_offset.empty() ? 0 : patch_offset.back(); }
};

// Computes the plan from the ORIGINAL image sizes (height, width). Throws ImageError naming the image for sizes
// the processor refuses (aspect ratio above 200, or a side that rounds to zero patches when min_pixels is 0) and
// std::invalid_argument for an invalid configuration.
QwenPlan plan_qwen(const std::vector<std::pair<int64_t, int64_t>>& source_sizes, const QwenConfig& cfg);

// A decoded image: packed RGB rows, `row_stride` bytes apart. It may be smaller than the original (a reduced-scale
// decode); the resize goes from this size to the planned one.
struct ImageView {
  const uint8_t* data = nullptr;
  int64_t height = 0;
  int64_t width = 0;
  int64_t row_stride = 0;
};

// lut[c][v] = normalised value of channel c at level v, with the float arithmetic of the processor named by
// cfg.compat.
void make_normalise_lut(const QwenConfig& cfg, float lut[3][256]);

// Writes the grid_h * grid_w rows of one resized image (height x width x 3, packed) to `out`.
void patchify_image(const uint8_t* resized, int64_t height, int64_t width, const float lut[3][256],
                    const QwenConfig& cfg, float* out);

// Resizes, normalises and patchifies image `index` of `plan` into its rows of `out` (the whole
// [plan.total_patches(), cfg.patch_dim()] array); `lut` from make_normalise_lut. Callers that decode one image at a
// time use this to process each image while its pixels are still in cache. Throws std::invalid_argument on a bad
// buffer.
void qwen_preprocess_image(const ImageView& img, int64_t index, const QwenPlan& plan, const QwenConfig& cfg,
                           const float lut[3][256], float* out);

// Resizes, normalises and patchifies every image into `out` ([plan.total_patches(), cfg.patch_dim()]), one image
// per task on up to `threads` OpenMP threads (<= 0: OpenMP's default). Throws ImageError naming the first failing
// image after all tasks end.
void qwen_preprocess(const std::vector<ImageView>& images, const QwenPlan& plan, const QwenConfig& cfg, float* out,
                     int threads);

}  // namespace uae
