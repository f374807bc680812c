// ctest for the torch-free core: values checked against transformers' Python smart_resize by hand.
#include <cstdio>
#include <cstdlib>

#include "../core/smart_resize.h"

static int failures = 0;

static void expect(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "FAIL: %s\n", what);
    ++failures;
  }
}

int main() {
  using uae::smart_resize;
  // Exactly on the factor: unchanged.
  auto t = smart_resize(224, 448, 28, 56 * 56, 1 << 30);
  expect(t.height == 224 && t.width == 448, "on-factor size is kept");
  // Round half to even: 42/28 = 1.5 -> 2, 70/28 = 2.5 -> 2 (Python's round), not 3.
  t = smart_resize(42, 70, 28, 0, 1 << 30);
  expect(t.height == 56 && t.width == 56, "ties round to even like Python");
  // Above max_pixels: shrink by sqrt and floor to the factor. 1024x1024 with max 65536 -> 252x252.
  t = smart_resize(1024, 1024, 28, 3136, 65536);
  expect(t.height == 252 && t.width == 252, "max_pixels shrink");
  // Below min_pixels: grow and ceil. 10x10 with min 3136 -> 56x56.
  t = smart_resize(10, 10, 28, 3136, 65536);
  expect(t.height == 56 && t.width == 56, "min_pixels grow");
  // Aspect ratio above 200 is refused.
  bool threw = false;
  try {
    smart_resize(20, 20000, 28, 3136, 65536);
  } catch (const uae::InvalidImageSize&) {
    threw = true;
  }
  expect(threw, "aspect ratio > 200 refused");
  threw = false;
  try {
    smart_resize(0, 5, 28, 3136, 65536);
  } catch (const uae::InvalidImageSize&) {
    threw = true;
  }
  expect(threw, "zero size refused");
  if (failures == 0) std::printf("all smart_resize checks passed\n");
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
