// Packing ragged sequences into variable-length micro-batches under a token budget (first-fit decreasing).
//
// Each micro-batch is one flat token stream with cu_seqlens (flash-attention's varlen layout) and position ids that
// restart at 0 for every sequence, so no token is padding. Sequences can be kept together per group when the loss
// normalises over a group inside a micro-batch.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace uae {

// A sequence or option the packer refuses; the message names the sequence (or group).
class PackError : public std::invalid_argument {
 public:
  explicit PackError(const std::string& what) : std::invalid_argument(what) {}
};

enum class Oversize : int {
  kError = 0,     // a sequence (or kept group) longer than the budget is an error (the default)
  kOwnBatch = 1,  // ... or it gets a micro-batch of its own, over budget
};

struct PackOptions {
  int64_t token_budget = 0;
  bool keep_groups = false;  // all sequences of a group go to the same micro-batch
  Oversize oversize = Oversize::kError;
  // Optional, with keep_groups: per sequence, the tokens of the prompt its group shares (a prefix forwarded once
  // per group, e.g. an image prompt before G captions). It counts once per group against the budget and is not
  // part of the packed token stream. Read from the group's first sequence.
  const int64_t* shared_prefix = nullptr;
};

struct PackResult {
  std::vector<int64_t> order;                // [S] sequence indices, micro-batch by micro-batch
  std::vector<int64_t> batch_seq_offsets;    // [B + 1] micro-batch b holds order[offs[b]:offs[b+1]]
  std::vector<int64_t> batch_token_offsets;  // [B + 1] its tokens are packed rows [offs[b], offs[b+1])
  std::vector<int32_t> cu_seqlens;           // [S + B] per-batch cumulative lengths (each starts at 0), concatenated
  std::vector<int32_t> max_seqlen;           // [B]
  std::vector<int64_t> position_ids;         // [T] position of each packed token inside its sequence
  std::vector<int64_t> token_index;          // [T] packed token -> index into the unpacked (flat) token array
  std::vector<int64_t> inverse;              // [N] sequence -> position in `order`, -1 if not packed
  int64_t num_batches() const { return static_cast<int64_t>(max_seqlen.size()); }
};

// Packs n sequences. `lengths[i]` tokens each, stored in a flat array at `offsets[i]` (null: the exclusive cumulative
// sum of lengths); `group_ids` may be null unless keep_groups; `include` (null: all) masks out sequences that are
// not packed (e.g. skipped rollouts). Zero-length included sequences are refused. Deterministic: ties keep the
// input order.
PackResult pack_sequences(int64_t n, const int64_t* lengths, const int64_t* offsets, const int64_t* group_ids,
                          const uint8_t* include, const PackOptions& options);

}  // namespace uae
