// Storage for one RL step's rollouts, torch-free.
//
// Samples are ragged token sequences stored end to end (CSR: offsets[i]..offsets[i + 1] are sample i's tokens),
// with per-token old / reference log-probs and per-sample ids, reward, advantage and flags. Python reads and writes
// the arrays in place through zero-copy views; while any view is alive (`exports() > 0`) the storage must not move,
// so an append that would reallocate is refused instead of leaving the views dangling.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace uae {

// A sample or argument the buffer refuses; the message names the sample index.
class RolloutError : public std::invalid_argument {
 public:
  explicit RolloutError(const std::string& what) : std::invalid_argument(what) {}
};

class RolloutBuffer {
 public:
  RolloutBuffer(int64_t sample_capacity, int64_t token_capacity);

  int64_t size() const { return static_cast<int64_t>(prompt_id_.size()); }
  int64_t num_tokens() const { return static_cast<int64_t>(tokens_.size()); }

  // Appends one sample and returns its index. `old_logprob` / `ref_logprob` may be null (stored as 0 and filled in
  // later through the views); `prompt_len` leading tokens are context, not completion (no loss on them).
  int64_t add(int64_t prompt_id, int64_t group_id, const int64_t* tokens, int64_t length, int64_t prompt_len,
              const float* old_logprob, const float* ref_logprob, float reward, bool truncated);

  // Appends n samples whose tokens are concatenated in `tokens` (lengths[i] each). Per-sample arrays may be null
  // (prompt_len 0, reward NaN = not scored yet, truncated false). All-or-nothing: on error nothing is appended.
  void add_batch(int64_t n, const int64_t* prompt_ids, const int64_t* group_ids, const int64_t* lengths,
                 const int64_t* tokens, const int64_t* prompt_lens, const float* old_logprob,
                 const float* ref_logprob, const float* rewards, const uint8_t* truncated);

  // Empties the buffer for the next step, keeping the allocation (views stay valid, their values become stale).
  void clear();


  // Raw storage, for zero-copy views.
  std::vector<int64_t> prompt_id_, group_id_, prompt_len_, offsets_, tokens_;
  std::vector<float> old_logprob_, ref_logprob_, reward_, advantage_;
  std::vector<uint8_t> truncated_, skipped_;

  // Live views over the storage; maintained by the bindings.
  int64_t exports() const { return exports_; }
  void retain_export() { ++exports_; }
  void release_export() { --exports_; }

 private:
  void ensure_room(int64_t samples, int64_t tokens);
  int64_t exports_ = 0;
};

}  // namespace uae
