// ctest for the RL core without Python: rollout buffer storage and FFD packing invariants.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <vector>

#include "../core/packing.h"
#include "../core/rollout_buffer.h"

static int failures = 0;

static void expect(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "FAIL: %s\n", what);
    ++failures;
  }
}

static void test_buffer() {
  uae::RolloutBuffer buf(4, 16);
  const int64_t t0[] = {1, 2, 3}, t1[] = {4, 5};
  buf.add(0, 0, t0, 3, 0, nullptr, nullptr, 1.0f, false);
  buf.add(0, 0, t1, 2, 1, nullptr, nullptr, 3.0f, true);
  expect(buf.size() == 2 && buf.num_tokens() == 5 && buf.offsets_[2] == 5, "sizes and offsets");
  buf.retain_export();
  bool threw = false;
  try {
    std::vector<int64_t> many(100, 7);
    buf.add(1, 1, many.data(), 100, 0, nullptr, nullptr, 0.0f, false);
  } catch (const uae::RolloutError&) {
    threw = true;
  }
  expect(threw && buf.size() == 2, "no reallocation while exported");
  buf.release_export();
  threw = false;
  try {
    buf.add(1, 1, t0, 0, 0, nullptr, nullptr, 0.0f, false);
  } catch (const uae::RolloutError&) {
    threw = true;
  }
  expect(threw, "zero-length sample refused");
}

static void test_packing() {
  std::mt19937 rng(1);
  std::vector<int64_t> len(3000);
  for (auto& v : len) v = 40 + rng() % 561;
  uae::PackOptions opt;
  opt.token_budget = 4096;
  const auto r = uae::pack_sequences(static_cast<int64_t>(len.size()), len.data(), nullptr, nullptr, nullptr, opt);
  int64_t total = std::accumulate(len.begin(), len.end(), int64_t{0});
  bool within = true;
  for (int64_t b = 0; b < r.num_batches(); ++b) {
    within &= r.batch_token_offsets[b + 1] - r.batch_token_offsets[b] <= opt.token_budget;
  }
  expect(within, "every micro-batch within budget");
  expect(r.batch_token_offsets.back() == total && static_cast<int64_t>(r.order.size()) == 3000, "all packed");
  const double fill = static_cast<double>(total) / static_cast<double>(r.num_batches() * opt.token_budget);
  expect(fill > 0.98, "FFD fills micro-batches");
  std::vector<int64_t> sorted = r.order;
  std::sort(sorted.begin(), sorted.end());
  bool perm = true;
  for (int64_t i = 0; i < 3000; ++i) perm &= sorted[i] == i && r.order[r.inverse[i]] == i;
  expect(perm, "order is a permutation and inverse inverts it");
  bool threw = false;
  try {
    const int64_t bad[] = {5, 5000};
    uae::pack_sequences(2, bad, nullptr, nullptr, nullptr, opt);
  } catch (const uae::PackError&) {
    threw = true;
  }
  expect(threw, "oversize refused by default");
}

int main() {
  test_buffer();
  test_packing();
  if (failures == 0) std::printf("all RL core checks passed\n");
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
