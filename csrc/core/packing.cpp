#include "packing.h"

#include <algorithm>
#include <limits>
#include <numeric>
#include <unordered_map>

namespace uae {

namespace {

// Max segment tree over bin capacities: finds the leftmost bin with at least `need` tokens free in O(log bins),
// which keeps first-fit O(n log n) instead of O(n * bins).
class FirstFitTree {
 public:
  FirstFitTree(int64_t bins, int64_t capacity) {
    size_ = 1;
    while (size_ < std::max<int64_t>(bins, 1)) size_ *= 2;
    tree_.assign(static_cast<size_t>(2 * size_), 0);
    for (int64_t b = 0; b < bins; ++b) tree_[size_ + b] = capacity;
    for (int64_t i = size_ - 1; i >= 1; --i) tree_[i] = std::max(tree_[2 * i], tree_[2 * i + 1]);
  }
  int64_t leftmost_at_least(int64_t need) const {
    if (tree_[1] < need) return -1;
    int64_t i = 1;
    while (i < size_) i = tree_[2 * i] >= need ? 2 * i : 2 * i + 1;
    return i - size_;
  }
  int64_t free(int64_t bin) const { return tree_[size_ + bin]; }
  void set(int64_t bin, int64_t value) {
    int64_t i = size_ + bin;
    tree_[i] = value;
    for (i /= 2; i >= 1; i /= 2) tree_[i] = std::max(tree_[2 * i], tree_[2 * i + 1]);
  }

 private:
  int64_t size_;
  std::vector<int64_t> tree_;
};

struct Item {
  int64_t length = 0;  // packed tokens
  int64_t cost = 0;    // tokens against the budget: length + the group's shared prefix (once)
  std::vector<int64_t> seqs;  // in input order
};

}  // namespace

PackResult pack_sequences(int64_t n, const int64_t* lengths, const int64_t* offsets, const int64_t* group_ids,
                          const uint8_t* include, const PackOptions& options) {
  const int64_t budget = options.token_budget;
  if (budget <= 0 || budget > std::numeric_limits<int32_t>::max()) {
    throw PackError("pack: token_budget must be in [1, 2^31 - 1], got " + std::to_string(budget));
  }
  if (n < 0 || (n > 0 && lengths == nullptr)) throw PackError("pack: lengths missing");
  if (options.keep_groups && n > 0 && group_ids == nullptr) throw PackError("pack: keep_groups needs group ids");
  if (options.shared_prefix != nullptr && !options.keep_groups) {
    throw PackError("pack: a shared prefix is per group: it needs keep_groups");
  }

  // Items: one per included sequence, or one per group.
  std::vector<Item> items;
  std::unordered_map<int64_t, int64_t> item_of_group;
  for (int64_t i = 0; i < n; ++i) {
    if (include && !include[i]) continue;
    if (lengths[i] <= 0) {
      throw PackError("sequence " + std::to_string(i) + ": length " + std::to_string(lengths[i]) +
                      "; zero-length sequences cannot be packed (drop them or mark them skipped)");
    }
    if (options.keep_groups) {
      auto [it, fresh] = item_of_group.try_emplace(group_ids[i], static_cast<int64_t>(items.size()));
      if (fresh) {
        items.emplace_back();
        if (options.shared_prefix != nullptr) {
          if (options.shared_prefix[i] < 0) {
            throw PackError("sequence " + std::to_string(i) + ": negative shared prefix length");
          }
          items.back().cost = options.shared_prefix[i];
        }
      }
      Item& item = items[static_cast<size_t>(it->second)];
      item.length += lengths[i];
      item.cost += lengths[i];
      item.seqs.push_back(i);
    } else {
      items.push_back(Item{lengths[i], lengths[i], {i}});
    }
  }
  for (const Item& item : items) {
    if (item.length > std::numeric_limits<int32_t>::max()) {
      throw PackError("sequence " + std::to_string(item.seqs[0]) + ": too long for int32 cu_seqlens");
    }
    if (item.cost > budget && options.oversize == Oversize::kError) {
      if (options.keep_groups) {
        throw PackError("group " + std::to_string(group_ids[item.seqs[0]]) + " (sequences starting at " +
                        std::to_string(item.seqs[0]) + "): " + std::to_string(item.cost) +
                        " tokens exceed token_budget " + std::to_string(budget) +
                        "; raise the budget, pass keep_groups=False, or oversize='own_batch'");
      }
      throw PackError("sequence " + std::to_string(item.seqs[0]) + ": " + std::to_string(item.length) +
                      " tokens exceed token_budget " + std::to_string(budget) +
                      "; raise the budget or pass oversize='own_batch'");
    }
  }

  // First-fit decreasing; stable so equal lengths keep input order (deterministic packing).
  std::vector<int64_t> by_length(items.size());
  std::iota(by_length.begin(), by_length.end(), 0);
  std::stable_sort(by_length.begin(), by_length.end(),
                   [&](int64_t a, int64_t b) { return items[a].cost > items[b].cost; });
  FirstFitTree tree(static_cast<int64_t>(items.size()), budget);
  std::vector<std::vector<int64_t>> bins;
  for (int64_t idx : by_length) {
    const int64_t len = items[idx].cost;
    int64_t bin;
    if (len > budget) {  // own batch: the leftmost untouched bin, closed at once
      bin = tree.leftmost_at_least(budget);
      tree.set(bin, 0);
    } else {
      bin = tree.leftmost_at_least(len);
      tree.set(bin, tree.free(bin) - len);
    }
    if (bin >= static_cast<int64_t>(bins.size())) bins.resize(static_cast<size_t>(bin + 1));
    bins[static_cast<size_t>(bin)].push_back(idx);
  }

  PackResult r;
  int64_t total_tokens = 0, total_seqs = 0;
  for (const Item& item : items) {
    total_tokens += item.length;
    total_seqs += static_cast<int64_t>(item.seqs.size());
  }
  r.order.reserve(static_cast<size_t>(total_seqs));
  r.cu_seqlens.reserve(static_cast<size_t>(total_seqs + bins.size()));
  r.position_ids.resize(static_cast<size_t>(total_tokens));
  r.token_index.resize(static_cast<size_t>(total_tokens));
  r.inverse.assign(static_cast<size_t>(n), -1);
  r.batch_seq_offsets.push_back(0);
  r.batch_token_offsets.push_back(0);
  // Flat offsets default to the exclusive prefix sum of all lengths (included or not).
  std::vector<int64_t> flat;
  if (offsets == nullptr) {
    flat.resize(static_cast<size_t>(n));
    int64_t acc = 0;
    for (int64_t i = 0; i < n; ++i) {
      flat[i] = acc;
      acc += std::max<int64_t>(lengths[i], 0);
    }
    offsets = flat.data();
  }
  int64_t t = 0;
  for (const auto& bin : bins) {
    int32_t cu = 0, longest = 0;
    r.cu_seqlens.push_back(0);
    for (int64_t idx : bin) {
      for (int64_t s : items[idx].seqs) {
        r.inverse[s] = static_cast<int64_t>(r.order.size());
        r.order.push_back(s);
        const int64_t len = lengths[s];
        for (int64_t k = 0; k < len; ++k, ++t) {
          r.position_ids[t] = k;
          r.token_index[t] = offsets[s] + k;
        }
        cu += static_cast<int32_t>(len);
        longest = std::max(longest, static_cast<int32_t>(len));
        r.cu_seqlens.push_back(cu);
      }
    }
    r.max_seqlen.push_back(longest);
    r.batch_seq_offsets.push_back(static_cast<int64_t>(r.order.size()));
    r.batch_token_offsets.push_back(t);
  }
  return r;
}

}  // namespace uae
