#include "rollout_buffer.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <unordered_map>

namespace uae {

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

template <typename T>
void reserve_at_least(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.capacity()) < n) v.reserve(static_cast<size_t>(n));
}

}  // namespace

RolloutBuffer::RolloutBuffer(int64_t sample_capacity, int64_t token_capacity) {
  if (sample_capacity < 0 || token_capacity < 0) throw RolloutError("RolloutBuffer: capacities must be >= 0");
  offsets_.push_back(0);
  for (auto* v : {&prompt_id_, &group_id_, &prompt_len_}) reserve_at_least(*v, sample_capacity);
  reserve_at_least(offsets_, sample_capacity + 1);
  for (auto* v : {&reward_, &advantage_}) reserve_at_least(*v, sample_capacity);
  for (auto* v : {&truncated_, &skipped_}) reserve_at_least(*v, sample_capacity);
  reserve_at_least(tokens_, token_capacity);
  reserve_at_least(old_logprob_, token_capacity);
  reserve_at_least(ref_logprob_, token_capacity);
}

void RolloutBuffer::ensure_room(int64_t samples, int64_t tokens) {
  const int64_t need_s = size() + samples, need_t = num_tokens() + tokens;
  const bool moves = need_s > static_cast<int64_t>(prompt_id_.capacity()) ||
                     need_s + 1 > static_cast<int64_t>(offsets_.capacity()) ||
                     need_t > static_cast<int64_t>(tokens_.capacity());
  if (!moves) return;
  if (exports_ > 0) {
    throw RolloutError("RolloutBuffer: appending " + std::to_string(samples) + " samples / " +
                       std::to_string(tokens) + " tokens exceeds the capacity (" +
                       std::to_string(prompt_id_.capacity()) + " samples, " + std::to_string(tokens_.capacity()) +
                       " tokens) while " + std::to_string(exports_) +
                       " array views are alive; drop the views or create the buffer with a larger capacity");
  }
  // Grow geometrically so a loop of appends stays amortised O(1).
  const int64_t cap_s = std::max<int64_t>(need_s, 2 * static_cast<int64_t>(prompt_id_.capacity()));
  const int64_t cap_t = std::max<int64_t>(need_t, 2 * static_cast<int64_t>(tokens_.capacity()));
  for (auto* v : {&prompt_id_, &group_id_, &prompt_len_}) reserve_at_least(*v, cap_s);
  reserve_at_least(offsets_, cap_s + 1);
  for (auto* v : {&reward_, &advantage_}) reserve_at_least(*v, cap_s);
  for (auto* v : {&truncated_, &skipped_}) reserve_at_least(*v, cap_s);
  reserve_at_least(tokens_, cap_t);
  reserve_at_least(old_logprob_, cap_t);
  reserve_at_least(ref_logprob_, cap_t);
}

int64_t RolloutBuffer::add(int64_t prompt_id, int64_t group_id, const int64_t* tokens, int64_t length,
                           int64_t prompt_len, const float* old_logprob, const float* ref_logprob, float reward,
                           bool truncated) {
  const uint8_t t = truncated ? 1 : 0;
  add_batch(1, &prompt_id, &group_id, &length, tokens, &prompt_len, old_logprob, ref_logprob, &reward, &t);
  return size() - 1;
}

void RolloutBuffer::add_batch(int64_t n, const int64_t* prompt_ids, const int64_t* group_ids, const int64_t* lengths,
                              const int64_t* tokens, const int64_t* prompt_lens, const float* old_logprob,
                              const float* ref_logprob, const float* rewards, const uint8_t* truncated) {
  if (n < 0 || prompt_ids == nullptr || group_ids == nullptr || lengths == nullptr) {
    throw RolloutError("RolloutBuffer.add_batch: need n >= 0 and prompt ids, group ids and lengths");
  }
  // Validate everything before touching the storage, so a bad sample leaves the buffer unchanged.
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t index = size() + i;
    if (lengths[i] <= 0) {
      throw RolloutError("sample " + std::to_string(index) + ": has " + std::to_string(lengths[i]) +
                         " tokens; a rollout needs at least one (drop it or store its end-of-sequence token)");
    }
    const int64_t pl = prompt_lens ? prompt_lens[i] : 0;
    if (pl < 0 || pl > lengths[i]) {
      throw RolloutError("sample " + std::to_string(index) + ": prompt_len " + std::to_string(pl) +
                         " outside [0, " + std::to_string(lengths[i]) + "]");
    }
    total += lengths[i];
  }
  if (total > 0 && tokens == nullptr) throw RolloutError("RolloutBuffer.add_batch: tokens missing");
  ensure_room(n, total);
  tokens_.insert(tokens_.end(), tokens, tokens + total);
  if (old_logprob) {
    old_logprob_.insert(old_logprob_.end(), old_logprob, old_logprob + total);
  } else {
    old_logprob_.resize(old_logprob_.size() + static_cast<size_t>(total), 0.0f);
  }
  if (ref_logprob) {
    ref_logprob_.insert(ref_logprob_.end(), ref_logprob, ref_logprob + total);
  } else {
    ref_logprob_.resize(ref_logprob_.size() + static_cast<size_t>(total), 0.0f);
  }
  for (int64_t i = 0; i < n; ++i) {
    prompt_id_.push_back(prompt_ids[i]);
    group_id_.push_back(group_ids[i]);
    prompt_len_.push_back(prompt_lens ? prompt_lens[i] : 0);
    offsets_.push_back(offsets_.back() + lengths[i]);
    reward_.push_back(rewards ? rewards[i] : kNaN);
    advantage_.push_back(0.0f);
    truncated_.push_back(truncated ? (truncated[i] ? 1 : 0) : 0);
    skipped_.push_back(0);
  }
}

void RolloutBuffer::clear() {
  for (auto* v : {&prompt_id_, &group_id_, &prompt_len_, &tokens_}) v->clear();
  offsets_.assign(1, 0);
  for (auto* v : {&old_logprob_, &ref_logprob_, &reward_, &advantage_}) v->clear();
  truncated_.clear();
  skipped_.clear();
}

}  // namespace uae
