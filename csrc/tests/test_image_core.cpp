// ctest for the image core without Python: AVX2 and scalar passes agree bit for bit (random sizes, images whose
// last row ends exactly at the buffer end), filters are normalised, and the Qwen plan/patchify follow transformers.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "../core/qwen_preproc.h"
#include "../core/resize.h"

static int failures = 0;

static void expect(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "FAIL: %s\n", what);
    ++failures;
  }
}

static void test_simd_equals_scalar() {
  if (!uae::cpu_has_avx2()) {
    std::printf("no AVX2 on this CPU: only the scalar path runs\n");
    return;
  }
  std::mt19937 rng(0);
  for (int trial = 0; trial < 60; ++trial) {
    const int64_t h = 1 + rng() % 90, w = 1 + rng() % 90, oh = 1 + rng() % 120, ow = 1 + rng() % 120;
    // Exactly h * w * 3 bytes on the heap: an over-read of the last row would be caught by sanitizers.
    std::vector<uint8_t> src(static_cast<size_t>(h * w * 3));
    for (auto& v : src) v = static_cast<uint8_t>(rng());
    std::vector<uint8_t> a(static_cast<size_t>(oh * ow * 3)), b(a.size());
    uae::resize_bicubic_rgb(src.data(), h, w, w * 3, a.data(), oh, ow, uae::ResizeCompat::kTorchvision,
                            uae::SimdMode::kAuto);
    uae::resize_bicubic_rgb(src.data(), h, w, w * 3, b.data(), oh, ow, uae::ResizeCompat::kTorchvision,
                            uae::SimdMode::kScalar);
    expect(a == b, "AVX2 and scalar resize agree");
  }
}

static void test_filter_properties() {
  for (auto compat : {uae::ResizeCompat::kTorchvision, uae::ResizeCompat::kPil}) {
    const uae::AxisFilter f = uae::make_bicubic_filter(1000, 333, compat);
    bool sums_ok = true;
    for (int64_t i = 0; i < f.out_size; ++i) {
      int64_t s = 0;
      for (int64_t k = 0; k < f.size[i]; ++k) s += f.weight[i * f.taps + k];
      // Normalised weights sum to 2^precision up to one rounding step per tap.
      sums_ok &= std::llabs(s - (int64_t{1} << f.precision)) <= f.size[i];
    }
    expect(sums_ok, "weights sum to one");
    if (compat == uae::ResizeCompat::kPil) {
      expect(f.precision == 22, "Pillow precision is 22 bits");
    } else {  // torch: as many bits as keep the largest weight (x2) inside int16
      const int32_t w_max = *std::max_element(f.weight.begin(), f.weight.end());
      expect(w_max < (1 << 15) && 2 * w_max >= (1 << 14), "torch precision fills int16");
    }
  }
  // A constant image stays constant (the normalisation is exact enough for every level).
  std::vector<uint8_t> grey(37 * 53 * 3, 200), out(11 * 97 * 3);
  uae::resize_bicubic_rgb(grey.data(), 37, 53, 53 * 3, out.data(), 11, 97, uae::ResizeCompat::kTorchvision,
                          uae::SimdMode::kAuto);
  bool flat = true;
  for (uint8_t v : out) flat &= v == 200;
  expect(flat, "constant image stays constant");
}

static void test_plan_and_patchify() {
  uae::QwenConfig cfg;
  cfg.max_pixels = 448 * 448;
  const auto plan = uae::plan_qwen({{448, 448}, {1, 1}, {56, 84}}, cfg);
  expect(plan.grid_h[0] == 32 && plan.grid_w[0] == 32, "on-factor size kept");
  expect(plan.grid_h[1] == 4 && plan.grid_w[1] == 4, "1x1 upscaled to min_pixels");
  expect(plan.patch_offset[3] == 32 * 32 + 16 + 4 * 6, "patch offsets");
  bool threw = false;
  try {
    uae::plan_qwen({{10, 10}, {2, 500}}, cfg);
  } catch (const uae::ImageError& e) {
    threw = e.index() == 1 && std::string(e.what()).rfind("image 1:", 0) == 0;
  }
  expect(threw, "aspect ratio error names image 1");
  // Patchify: 28x28 image whose red channel is the row index; patch 1 is the top-right 14x14 block.
  std::vector<uint8_t> img(28 * 28 * 3, 0);
  for (int y = 0; y < 28; ++y)
    for (int x = 0; x < 28; ++x) {
      img[(y * 28 + x) * 3] = static_cast<uint8_t>(y);
      img[(y * 28 + x) * 3 + 1] = static_cast<uint8_t>(x);
    }
  float lut[3][256];
  for (int c = 0; c < 3; ++c)
    for (int v = 0; v < 256; ++v) lut[c][v] = static_cast<float>(v);
  std::vector<float> out(4 * cfg.patch_dim());
  uae::patchify_image(img.data(), 28, 28, lut, cfg, out.data());
  const float* p1 = out.data() + cfg.patch_dim();
  expect(p1[0] == 0.0f && p1[2 * 196 + 0] == 14.0f, "patch 1 = top-right block, green plane after red x2");
  expect(p1[196 + 15] == p1[15], "temporal copy");
  const float* p2 = out.data() + 2 * cfg.patch_dim();
  expect(p2[0] == 14.0f, "patch 2 = bottom-left block");
}

int main() {
  test_simd_equals_scalar();
  test_filter_properties();
  test_plan_and_patchify();
  if (failures == 0) std::printf("all image core checks passed\n");
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
