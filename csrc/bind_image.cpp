// Python bindings of the image path: resize and Qwen2-VL preprocessing. Every array is checked here (dtype, rank,
// channel count, layout) so the core can trust its pointers; long loops run with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/qwen_preproc.h"
#include "core/resize.h"

namespace py = pybind11;

namespace uae_bind {

namespace {

uae::ResizeCompat parse_compat(const std::string& compat) {
  if (compat == "torchvision") return uae::ResizeCompat::kTorchvision;
  if (compat == "pil") return uae::ResizeCompat::kPil;
  if (compat == "pil_legacy") return uae::ResizeCompat::kPilLegacy;
  throw std::invalid_argument("compat must be 'torchvision', 'pil' or 'pil_legacy', got '" + compat + "'");
}

// A uint8 HWC RGB image whose pixels and channels are packed (rows may be padded). Arrays with other layouts are
// copied once; other dtypes or shapes are refused with the image index.
py::array checked_image(const py::handle& obj, int64_t index) {
  const std::string who = "image " + std::to_string(index) + ": ";
  if (!py::isinstance<py::array>(obj)) throw uae::ImageError(index, who + "expected a numpy array (H, W, 3) uint8");
  py::array arr = py::reinterpret_borrow<py::array>(obj);
  if (!arr.dtype().is(py::dtype::of<uint8_t>())) {
    throw uae::ImageError(index, who + "dtype must be uint8, got " + std::string(py::str(arr.dtype())));
  }
  if (arr.ndim() != 3 || arr.shape(2) != 3) {
    std::string shape = "(";
    for (py::ssize_t d = 0; d < arr.ndim(); ++d) shape += (d ? ", " : "") + std::to_string(arr.shape(d));
    throw uae::ImageError(index, who + "expected shape (H, W, 3), got " + shape + ")");
  }
  if (arr.shape(0) <= 0 || arr.shape(1) <= 0) throw uae::ImageError(index, who + "empty image");
  if (arr.strides(2) != 1 || arr.strides(1) != 3 || arr.strides(0) < 3 * arr.shape(1)) {
    arr = py::array::ensure(arr, py::array::c_style);
  }
  return arr;
}

std::vector<std::pair<int64_t, int64_t>> sizes_from(const py::object& source_sizes, const std::vector<py::array>& imgs) {
  std::vector<std::pair<int64_t, int64_t>> sizes;
  if (source_sizes.is_none()) {
    for (const auto& a : imgs) sizes.emplace_back(a.shape(0), a.shape(1));
    return sizes;
  }
  auto s = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(source_sizes);
  if (!s || s.ndim() != 2 || s.shape(1) != 2 || s.shape(0) != static_cast<py::ssize_t>(imgs.size())) {
    throw std::invalid_argument("source_sizes must be an integer array of shape (num_images, 2) = (height, width)");
  }
  for (py::ssize_t i = 0; i < s.shape(0); ++i) sizes.emplace_back(s.at(i, 0), s.at(i, 1));
  return sizes;
}

uae::QwenConfig make_config(int64_t min_pixels, int64_t max_pixels, int64_t patch_size, int64_t merge_size,
                            int64_t temporal_patch_size, const std::vector<float>& mean, const std::vector<float>& std,
                            const std::string& compat, bool simd) {
  if (mean.size() != 3 || std.size() != 3) throw std::invalid_argument("image_mean and image_std need 3 values");
  uae::QwenConfig cfg;
  cfg.min_pixels = min_pixels;
  cfg.max_pixels = max_pixels;
  cfg.patch_size = patch_size;
  cfg.merge_size = merge_size;
  cfg.temporal_patch_size = temporal_patch_size;
  for (int c = 0; c < 3; ++c) {
    cfg.mean[c] = mean[c];
    cfg.std[c] = std[c];
  }
  cfg.compat = parse_compat(compat);
  cfg.simd = simd ? uae::SimdMode::kAuto : uae::SimdMode::kScalar;
  return cfg;
}

py::array_t<int64_t> grid_array(const uae::QwenPlan& plan) {
  const auto n = static_cast<py::ssize_t>(plan.grid_h.size());
  py::array_t<int64_t> grid({n, py::ssize_t{3}});
  auto g = grid.mutable_unchecked<2>();
  for (py::ssize_t i = 0; i < n; ++i) {
    g(i, 0) = 1;  // one temporal group: the image is duplicated temporal_patch_size times inside each patch
    g(i, 1) = plan.grid_h[i];
    g(i, 2) = plan.grid_w[i];
  }
  return grid;
}

// One batch filled an image at a time (decode -> put -> decode -> ...), so each image is resized while its decoded
// pixels are still in cache and one decode buffer can be reused: measured here, keeping every decoded image of a
// batch alive costs ~1.4 ms per 1.3 MP image in page faults alone. put() may run on several threads at once
// (different images write disjoint rows of pixel_values).
class QwenBatch {
 public:
  QwenBatch(const py::object& sizes, const uae::QwenConfig& cfg) : cfg_(cfg) {
    auto s = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(sizes);
    if (!s || s.ndim() != 2 || s.shape(1) != 2) throw std::invalid_argument("sizes must have shape (n, 2)");
    std::vector<std::pair<int64_t, int64_t>> v;
    for (py::ssize_t i = 0; i < s.shape(0); ++i) v.emplace_back(s.at(i, 0), s.at(i, 1));
    plan_ = uae::plan_qwen(v, cfg_);
    uae::make_normalise_lut(cfg_, lut_);
    pixel_values_ = py::array_t<float>(
        {static_cast<py::ssize_t>(plan_.total_patches()), static_cast<py::ssize_t>(cfg_.patch_dim())});
    out_ = pixel_values_.mutable_data();
    done_.assign(v.size(), 0);
  }

  void put(int64_t index, const py::handle& image) {
    if (index < 0 || index >= static_cast<int64_t>(done_.size())) {
      throw std::invalid_argument("image index " + std::to_string(index) + " out of range for a batch of " +
                                  std::to_string(done_.size()));
    }
    py::array arr = checked_image(image, index);
    const uae::ImageView view{static_cast<const uint8_t*>(arr.data()), arr.shape(0), arr.shape(1), arr.strides(0)};
    {
      py::gil_scoped_release release;
      try {
        uae::qwen_preprocess_image(view, index, plan_, cfg_, lut_, out_);
      } catch (const uae::ImageError&) {
        throw;
      } catch (const std::exception& e) {
        throw uae::ImageError(index, "image " + std::to_string(index) + ": " + e.what());
      }
    }
    done_[static_cast<size_t>(index)] = 1;
  }

  py::tuple result() const {
    for (size_t i = 0; i < done_.size(); ++i) {
      if (!done_[i]) throw std::invalid_argument("image " + std::to_string(i) + " was never put into the batch");
    }
    return py::make_tuple(pixel_values_, grid_array(plan_));
  }

 private:
  uae::QwenConfig cfg_;
  uae::QwenPlan plan_;
  float lut_[3][256];
  py::array_t<float> pixel_values_;
  float* out_ = nullptr;
  std::vector<char> done_;
};

}  // namespace

void bind_image(py::module_& m) {
  py::register_exception<uae::ImageError>(m, "ImageError", PyExc_ValueError);

  m.def("cpu_has_avx2", &uae::cpu_has_avx2, "Whether the AVX2 resize kernels run on this CPU.");

  m.def(
      "resize_bicubic",
      [](const py::handle& image, int64_t out_height, int64_t out_width, const std::string& compat, bool simd) {
        py::array img = checked_image(image, 0);
        if (out_height <= 0 || out_width <= 0) throw std::invalid_argument("output size must be positive");
        py::array_t<uint8_t> out({static_cast<py::ssize_t>(out_height), static_cast<py::ssize_t>(out_width),
                                  py::ssize_t{3}});
        const auto* src = static_cast<const uint8_t*>(img.data());
        uint8_t* dst = out.mutable_data();
        const int64_t h = img.shape(0), w = img.shape(1), stride = img.strides(0);
        const auto c = parse_compat(compat);
        {
          py::gil_scoped_release release;
          uae::resize_bicubic_rgb(src, h, w, stride, dst, out_height, out_width, c,
                                  simd ? uae::SimdMode::kAuto : uae::SimdMode::kScalar);
        }
        return out;
      },
      py::arg("image"), py::arg("height"), py::arg("width"), py::arg("compat") = "torchvision",
      py::arg("simd") = true,
      "Antialiased bicubic resize of an (H, W, 3) uint8 image, bit-exact with torch ('torchvision'), Pillow >= 13 "
      "('pil') or Pillow < 13 ('pil_legacy').");

  m.def(
      "qwen_grid",
      [](const py::object& sizes, int64_t min_pixels, int64_t max_pixels, int64_t patch_size, int64_t merge_size) {
        auto s = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(sizes);
        if (!s || s.ndim() != 2 || s.shape(1) != 2) throw std::invalid_argument("sizes must have shape (n, 2)");
        std::vector<std::pair<int64_t, int64_t>> v;
        for (py::ssize_t i = 0; i < s.shape(0); ++i) v.emplace_back(s.at(i, 0), s.at(i, 1));
        uae::QwenConfig cfg;
        cfg.min_pixels = min_pixels;
        cfg.max_pixels = max_pixels;
        cfg.patch_size = patch_size;
        cfg.merge_size = merge_size;
        return grid_array(uae::plan_qwen(v, cfg));
      },
      py::arg("sizes"), py::arg("min_pixels"), py::arg("max_pixels"), py::arg("patch_size") = 14,
      py::arg("merge_size") = 2, "image_grid_thw [n, 3] for original sizes (n, 2) = (height, width).");

  m.def(
      "qwen_preprocess",
      [](const py::sequence& images, const py::object& source_sizes, int64_t min_pixels, int64_t max_pixels,
         int64_t patch_size, int64_t merge_size, int64_t temporal_patch_size, const std::vector<float>& mean,
         const std::vector<float>& std, const std::string& compat, bool simd, int threads) {
        const uae::QwenConfig cfg = make_config(min_pixels, max_pixels, patch_size, merge_size, temporal_patch_size,
                                                mean, std, compat, simd);
        std::vector<py::array> arrays;  // keep every buffer alive while the GIL is released
        const auto n = static_cast<int64_t>(py::len(images));
        arrays.reserve(static_cast<size_t>(n));
        for (int64_t i = 0; i < n; ++i) arrays.push_back(checked_image(images[i], i));
        const uae::QwenPlan plan = uae::plan_qwen(sizes_from(source_sizes, arrays), cfg);
        std::vector<uae::ImageView> views;
        for (const auto& a : arrays) {
          views.push_back({static_cast<const uint8_t*>(a.data()), a.shape(0), a.shape(1), a.strides(0)});
        }
        py::array_t<float> pixel_values(
            {static_cast<py::ssize_t>(plan.total_patches()), static_cast<py::ssize_t>(cfg.patch_dim())});
        float* out = pixel_values.mutable_data();
        {
          py::gil_scoped_release release;
          uae::qwen_preprocess(views, plan, cfg, out, threads);
        }
        return py::make_tuple(pixel_values, grid_array(plan));
      },
      py::arg("images"), py::arg("source_sizes"), py::arg("min_pixels"), py::arg("max_pixels"),
      py::arg("patch_size"), py::arg("merge_size"), py::arg("temporal_patch_size"), py::arg("image_mean"),
      py::arg("image_std"), py::arg("compat") = "torchvision", py::arg("simd") = true, py::arg("threads") = 1,
      "(pixel_values float32 [sum patches, 3*T*P*P], image_grid_thw int64 [n, 3]) from (H, W, 3) uint8 images.");

  py::class_<QwenBatch>(m, "QwenBatch",
                        "Qwen2-VL inputs filled one image at a time: QwenBatch(sizes, ...); put(i, image) for every i "
                        "(any thread, GIL released); result() -> (pixel_values, image_grid_thw).")
      .def(py::init([](const py::object& sizes, int64_t min_pixels, int64_t max_pixels, int64_t patch_size,
                       int64_t merge_size, int64_t temporal_patch_size, const std::vector<float>& mean,
                       const std::vector<float>& std, const std::string& compat, bool simd) {
             return std::make_unique<QwenBatch>(sizes, make_config(min_pixels, max_pixels, patch_size, merge_size,
                                                                   temporal_patch_size, mean, std, compat, simd));
           }),
           py::arg("sizes"), py::arg("min_pixels"), py::arg("max_pixels"), py::arg("patch_size"),
           py::arg("merge_size"), py::arg("temporal_patch_size"), py::arg("image_mean"), py::arg("image_std"),
           py::arg("compat") = "torchvision", py::arg("simd") = true)
      .def("put", &QwenBatch::put, py::arg("index"), py::arg("image"),
           "Resizes, normalises and patchifies image `index` (H, W, 3) uint8 into its rows; the image may be "
           "reused as soon as this returns.")
      .def("result", &QwenBatch::result, "(pixel_values, image_grid_thw); every image must have been put.");
}

}  // namespace uae_bind
