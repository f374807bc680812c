// Python bindings of the RL data structures: the rollout buffer (zero-copy numpy views) and sequence packing.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/packing.h"
#include "core/rollout_buffer.h"

namespace py = pybind11;

namespace uae_bind {

namespace {

using Buffer = uae::RolloutBuffer;
using I64 = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using F32 = py::array_t<float, py::array::c_style | py::array::forcecast>;
using U8 = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>;

// A numpy array over the buffer's storage. Its base object owns a reference to the buffer and an export count,
// so the buffer outlives the view and refuses to reallocate while the view exists.
template <typename T>
py::array view(const std::shared_ptr<Buffer>& buf, std::vector<T>& storage, int64_t length, const py::dtype& dtype) {
  auto* owner = new std::shared_ptr<Buffer>(buf);
  buf->retain_export();
  py::capsule base(owner, [](void* p) {
    auto* sp = static_cast<std::shared_ptr<Buffer>*>(p);
    (*sp)->release_export();
    delete sp;
  });
  return py::array(dtype, {static_cast<py::ssize_t>(length)}, {static_cast<py::ssize_t>(sizeof(T))},
                   storage.data(), base);
}

template <typename A>
const typename A::value_type* optional_data(const py::object& obj, int64_t expected, const char* name,
                                            std::vector<A>& keep) {
  if (obj.is_none()) return nullptr;
  A arr = A::ensure(obj);
  if (!arr || arr.ndim() != 1 || arr.shape(0) != expected) {
    throw uae::RolloutError(std::string(name) + " must be a 1-D array of length " + std::to_string(expected));
  }
  keep.push_back(arr);
  return arr.data();
}

// Moves a result vector into a numpy array that owns it (no copy of the token-sized arrays).
template <typename T>
py::array_t<T> to_numpy(std::vector<T>&& v) {
  auto* heap = new std::vector<T>(std::move(v));
  py::capsule owner(heap, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>({static_cast<py::ssize_t>(heap->size())}, {static_cast<py::ssize_t>(sizeof(T))},
                        heap->data(), owner);
}

py::dict pack_to_dict(uae::PackResult&& r) {
  py::dict d;
  d["order"] = to_numpy(std::move(r.order));
  d["batch_seq_offsets"] = to_numpy(std::move(r.batch_seq_offsets));
  d["batch_token_offsets"] = to_numpy(std::move(r.batch_token_offsets));
  d["cu_seqlens"] = to_numpy(std::move(r.cu_seqlens));
  d["max_seqlen"] = to_numpy(std::move(r.max_seqlen));
  d["position_ids"] = to_numpy(std::move(r.position_ids));
  d["token_index"] = to_numpy(std::move(r.token_index));
  d["inverse"] = to_numpy(std::move(r.inverse));
  return d;
}

}  // namespace

void bind_rl(py::module_& m) {
  py::register_exception<uae::RolloutError>(m, "RolloutError", PyExc_ValueError);
  py::register_exception<uae::PackError>(m, "PackError", PyExc_ValueError);

  py::class_<Buffer, std::shared_ptr<Buffer>>(m, "RolloutBuffer")
      .def(py::init<int64_t, int64_t>(), py::arg("sample_capacity") = 0, py::arg("token_capacity") = 0)
      .def("__len__", &Buffer::size)
      .def_property_readonly("num_tokens", &Buffer::num_tokens)
      .def_property_readonly("exports", &Buffer::exports)
      .def(
          "add_batch",
          [](Buffer& b, const py::object& prompt_ids, const py::object& group_ids, const py::object& lengths,
             const py::object& tokens, const py::object& prompt_lens, const py::object& old_logprob,
             const py::object& ref_logprob, const py::object& rewards, const py::object& truncated) {
            I64 len = I64::ensure(lengths);
            I64 tok = I64::ensure(tokens);
            if (!len || len.ndim() != 1 || !tok || tok.ndim() != 1) {
              throw uae::RolloutError("lengths and tokens must be 1-D integer arrays");
            }
            const int64_t n = len.shape(0);
            int64_t total = 0;
            for (int64_t i = 0; i < n; ++i) total += len.at(i);
            if (total != tok.shape(0)) {
              throw uae::RolloutError("tokens has " + std::to_string(tok.shape(0)) + " entries but lengths sum to " +
                                      std::to_string(total));
            }
            std::vector<I64> ki;
            std::vector<F32> kf;
            std::vector<U8> ku;
            const int64_t* pid = optional_data(prompt_ids, n, "prompt_ids", ki);
            const int64_t* gid = optional_data(group_ids, n, "group_ids", ki);
            if (pid == nullptr || gid == nullptr) throw uae::RolloutError("prompt_ids and group_ids are required");
            const int64_t* pl = optional_data(prompt_lens, n, "prompt_lens", ki);
            const float* olp = optional_data(old_logprob, total, "old_logprob", kf);
            const float* rlp = optional_data(ref_logprob, total, "ref_logprob", kf);
            const float* rw = optional_data(rewards, n, "rewards", kf);
            const uint8_t* tr = optional_data(truncated, n, "truncated", ku);
            b.add_batch(n, pid, gid, len.data(), tok.data(), pl, olp, rlp, rw, tr);
          },
          py::arg("prompt_ids"), py::arg("group_ids"), py::arg("lengths"), py::arg("tokens"),
          py::arg("prompt_lens") = py::none(), py::arg("old_logprob") = py::none(),
          py::arg("ref_logprob") = py::none(), py::arg("rewards") = py::none(), py::arg("truncated") = py::none())
      .def("clear", &Buffer::clear)
      .def("view", [](const std::shared_ptr<Buffer>& b, const std::string& name) -> py::array {
        const int64_t n = b->size(), t = b->num_tokens();
        if (name == "prompt_id") return view(b, b->prompt_id_, n, py::dtype::of<int64_t>());
        if (name == "group_id") return view(b, b->group_id_, n, py::dtype::of<int64_t>());
        if (name == "prompt_len") return view(b, b->prompt_len_, n, py::dtype::of<int64_t>());
        if (name == "offsets") return view(b, b->offsets_, n + 1, py::dtype::of<int64_t>());
        if (name == "tokens") return view(b, b->tokens_, t, py::dtype::of<int64_t>());
        if (name == "old_logprob") return view(b, b->old_logprob_, t, py::dtype::of<float>());
        if (name == "ref_logprob") return view(b, b->ref_logprob_, t, py::dtype::of<float>());
        if (name == "reward") return view(b, b->reward_, n, py::dtype::of<float>());
        if (name == "advantage") return view(b, b->advantage_, n, py::dtype::of<float>());
        if (name == "truncated") return view(b, b->truncated_, n, py::dtype("bool"));
        if (name == "skipped") return view(b, b->skipped_, n, py::dtype("bool"));
        throw std::invalid_argument("no field named '" + name + "'");
      });

  m.def(
      "pack_sequences",
      [](const py::object& lengths, int64_t token_budget, const py::object& offsets, const py::object& group_ids,
         const py::object& include, bool keep_groups, const std::string& oversize, const py::object& shared_prefix) {
        I64 len = I64::ensure(lengths);
        if (!len || len.ndim() != 1) throw uae::PackError("lengths must be a 1-D integer array");
        const int64_t n = len.shape(0);
        std::vector<I64> ki;
        std::vector<U8> ku;
        auto check = [n](const char* name, py::ssize_t got) {
          if (got != n) throw uae::PackError(std::string(name) + " must have one entry per sequence");
        };
        const int64_t* off = nullptr;
        const int64_t* gid = nullptr;
        const uint8_t* inc = nullptr;
        if (!offsets.is_none()) {
          ki.push_back(I64::ensure(offsets));
          check("offsets", ki.back().size());
          off = ki.back().data();
        }
        if (!group_ids.is_none()) {
          ki.push_back(I64::ensure(group_ids));
          check("group_ids", ki.back().size());
          gid = ki.back().data();
        }
        if (!include.is_none()) {
          ku.push_back(U8::ensure(include));
          check("include", ku.back().size());
          inc = ku.back().data();
        }
        uae::PackOptions opt;
        opt.token_budget = token_budget;
        opt.keep_groups = keep_groups;
        if (!shared_prefix.is_none()) {
          ki.push_back(I64::ensure(shared_prefix));
          check("shared_prefix", ki.back().size());
          opt.shared_prefix = ki.back().data();
        }
        if (oversize == "error") {
          opt.oversize = uae::Oversize::kError;
        } else if (oversize == "own_batch") {
          opt.oversize = uae::Oversize::kOwnBatch;
        } else {
          throw uae::PackError("oversize must be 'error' or 'own_batch', got '" + oversize + "'");
        }
        uae::PackResult r;
        {
          py::gil_scoped_release release;
          r = uae::pack_sequences(n, len.data(), off, gid, inc, opt);
        }
        return pack_to_dict(std::move(r));
      },
      py::arg("lengths"), py::arg("token_budget"), py::arg("offsets") = py::none(), py::arg("group_ids") = py::none(),
      py::arg("include") = py::none(), py::arg("keep_groups") = false, py::arg("oversize") = "error",
      py::arg("shared_prefix") = py::none(),
      "First-fit-decreasing packing into micro-batches of at most token_budget tokens (varlen layout).");
}

}  // namespace uae_bind
