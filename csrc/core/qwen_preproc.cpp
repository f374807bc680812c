#include "qwen_preproc.h"

#include <algorithm>
#include <cstring>
#include <new>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "smart_resize.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace uae {

QwenPlan plan_qwen(const std::vector<std::pair<int64_t, int64_t>>& source_sizes, const QwenConfig& cfg) {
  if (cfg.patch_size <= 0 || cfg.merge_size <= 0 || cfg.temporal_patch_size <= 0) {
    throw std::invalid_argument("qwen_preprocess: patch_size, merge_size and temporal_patch_size must be positive");
  }
  for (int c = 0; c < 3; ++c) {
    if (!(cfg.std[c] != 0.0f)) throw std::invalid_argument("qwen_preprocess: image_std must be non-zero");
  }
  const int64_t n = static_cast<int64_t>(source_sizes.size());
  QwenPlan plan;
  plan.height.resize(n);
  plan.width.resize(n);
  plan.grid_h.resize(n);
  plan.grid_w.resize(n);
  plan.patch_offset.assign(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    const auto [h, w] = source_sizes[i];
    ResizeTarget t{};
    try {
      t = smart_resize(h, w, cfg.factor(), cfg.min_pixels, cfg.max_pixels);
    } catch (const InvalidImageSize& e) {
      throw ImageError(i, "image " + std::to_string(i) + ": " + e.what());
    }
    if (t.height <= 0 || t.width <= 0) {
      // Only reachable with min_pixels below factor^2: a side under factor/2 rounds to zero patches. The
      // processor fails too (a zero-size resize); say what to change instead.
      throw ImageError(i, "image " + std::to_string(i) + ": " + std::to_string(h) + "x" + std::to_string(w) +
                              " resizes to " + std::to_string(t.height) + "x" + std::to_string(t.width) +
                              " (zero patches); raise min_pixels to at least " + std::to_string(cfg.factor()) +
                              "^2");
    }
    plan.height[i] = t.height;
    plan.width[i] = t.width;
    plan.grid_h[i] = t.height / cfg.patch_size;
    plan.grid_w[i] = t.width / cfg.patch_size;
    plan.patch_offset[i + 1] = plan.patch_offset[i] + plan.grid_h[i] * plan.grid_w[i];
  }
  return plan;
}

void make_normalise_lut(const QwenConfig& cfg, float lut[3][256]) {
  for (int c = 0; c < 3; ++c) {
    if (cfg.compat == ResizeCompat::kTorchvision) {
      // torchvision backend: rescale is folded into the statistics (mean * 255, std * 255, float32 products),
      // then float32 (x - mean) / std.
      const float m = cfg.mean[c] * 255.0f;
      const float s = cfg.std[c] * 255.0f;
      for (int v = 0; v < 256; ++v) lut[c][v] = (static_cast<float>(v) - m) / s;
    } else {
      // PIL backend: x * (1/255) in float64 rounded to float32, then float32 (x - mean) / std.
      for (int v = 0; v < 256; ++v) {
        const float x = static_cast<float>(static_cast<double>(v) * (1.0 / 255.0));
        lut[c][v] = (x - cfg.mean[c]) / cfg.std[c];
      }
    }
  }
}

namespace {

// Copies n floats to the output. pixel_values is written once and read much later (by the model, after the whole
// batch), so on x86 it goes out with non-temporal stores: no read-for-ownership of each line and no eviction of the
// resize buffers from the cache (measured: 1.8x faster patchify into memory that is not in cache).
inline void store_stream(float* dst, const float* src, int64_t n) {
#if defined(__SSE2__)
  if ((reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
    int64_t k = 0;
    for (; k + 4 <= n; k += 4) _mm_stream_ps(dst + k, _mm_loadu_ps(src + k));
    for (; k < n; ++k) dst[k] = src[k];
    return;
  }
#endif
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
}

}  // namespace

void patchify_image(const uint8_t* resized, int64_t height, int64_t width, const float lut[3][256],
                    const QwenConfig& cfg, float* out) {
  // transformers' order: patches by (block row, block column, row in block, column in block) of merge x merge
  // blocks; inside a patch [channel][temporal copy][y][x].
  const int64_t p = cfg.patch_size, m = cfg.merge_size, t_copies = cfg.temporal_patch_size;
  const int64_t gh = height / p, gw = width / p;
  const int64_t plane = p * p;
  const int64_t dim = cfg.patch_dim();
  std::vector<float> stage(static_cast<size_t>(3 * plane));  // one patch, [channel][y][x]
  float* s0 = stage.data();
  float* s1 = s0 + plane;
  float* s2 = s1 + plane;
  int64_t row = 0;
  for (int64_t bh = 0; bh < gh / m; ++bh) {
    for (int64_t bw = 0; bw < gw / m; ++bw) {
      for (int64_t mh = 0; mh < m; ++mh) {
        for (int64_t mw = 0; mw < m; ++mw, ++row) {
          const int64_t ph = bh * m + mh, pw = bw * m + mw;
          for (int64_t py = 0; py < p; ++py) {
            const uint8_t* src = resized + ((ph * p + py) * width + pw * p) * 3;
            for (int64_t px = 0; px < p; ++px) {
              s0[py * p + px] = lut[0][src[3 * px]];
              s1[py * p + px] = lut[1][src[3 * px + 1]];
              s2[py * p + px] = lut[2][src[3 * px + 2]];
            }
          }
          // The temporal axis repeats the single frame (an image is a one-frame video).
          float* o = out + row * dim;
          for (int64_t c = 0; c < 3; ++c) {
            for (int64_t t = 0; t < t_copies; ++t) store_stream(o + (c * t_copies + t) * plane, s0 + c * plane, plane);
          }
        }
      }
    }
  }
#if defined(__SSE2__)
  _mm_sfence();  // order the non-temporal stores before anything another thread may do after this returns
#endif
}

void qwen_preprocess_image(const ImageView& img, int64_t i, const QwenPlan& plan, const QwenConfig& cfg,
                           const float lut[3][256], float* out) {
  if (i < 0 || i >= static_cast<int64_t>(plan.height.size())) {
    throw std::invalid_argument("image index " + std::to_string(i) + " out of range for a plan of " +
                                std::to_string(plan.height.size()) + " images");
  }
  if (img.data == nullptr || img.height <= 0 || img.width <= 0 || img.row_stride < img.width * 3) {
    throw std::invalid_argument("invalid image buffer (" + std::to_string(img.height) + "x" +
                                std::to_string(img.width) + ")");
  }
  const int64_t h = plan.height[i], w = plan.width[i];
  std::vector<uint8_t> resized(static_cast<size_t>(h * w * 3));
  resize_bicubic_rgb(img.data, img.height, img.width, img.row_stride, resized.data(), h, w, cfg.compat, cfg.simd);
  patchify_image(resized.data(), h, w, lut, cfg, out + plan.patch_offset[i] * cfg.patch_dim());
}

void qwen_preprocess(const std::vector<ImageView>& images, const QwenPlan& plan, const QwenConfig& cfg, float* out,
                     int threads) {
  const int64_t n = static_cast<int64_t>(images.size());
  if (static_cast<int64_t>(plan.height.size()) != n) {
    throw std::invalid_argument("qwen_preprocess: plan has " + std::to_string(plan.height.size()) +
                                " images, got " + std::to_string(n));
  }
  float lut[3][256];
  make_normalise_lut(cfg, lut);
  // Exceptions must not leave an OpenMP region: each task records its error and the first one is rethrown after.
  std::vector<std::string> errors(static_cast<size_t>(n));
#ifdef _OPENMP
  const int nt = threads > 0 ? threads : omp_get_max_threads();
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
#else
  (void)threads;
#endif
  for (int64_t i = 0; i < n; ++i) {
    try {
      qwen_preprocess_image(images[i], i, plan, cfg, lut, out);
    } catch (const std::bad_alloc&) {
      errors[i] = "out of memory while resizing";
    } catch (const std::exception& e) {
      errors[i] = e.what();
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    if (!errors[i].empty()) throw ImageError(i, "image " + std::to_string(i) + ": " + errors[i]);
  }
}

}  // namespace uae
