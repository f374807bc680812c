// The one Python extension module, uae_fast._C. Argument checks live here, at the boundary, so the torch-free
// core can assume valid inputs and Python callers get ValueError instead of a crash. The image and RL bindings
// live in bind_image.cpp / bind_rl.cpp and are registered from this module's init.
#include <pybind11/pybind11.h>

#include "core/smart_resize.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace uae_bind {
void bind_image(py::module_& m);
void bind_rl(py::module_& m);
}  // namespace uae_bind

namespace {

int openmp_max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "uae_fast native core (torch-free C++)";
  py::register_exception<uae::InvalidImageSize>(m, "InvalidImageSize", PyExc_ValueError);

  m.def(
      "smart_resize",
      [](int64_t height, int64_t width, int64_t factor, int64_t min_pixels, int64_t max_pixels) {
        const uae::ResizeTarget t = uae::smart_resize(height, width, factor, min_pixels, max_pixels);
        return py::make_tuple(t.height, t.width);
      },
      py::arg("height"), py::arg("width"), py::arg("factor") = 28, py::arg("min_pixels") = 56 * 56,
      py::arg("max_pixels") = 14 * 14 * 4 * 1280,
      "Qwen2-VL target (height, width): multiples of `factor`, pixel count within [min_pixels, max_pixels].");

#ifdef _OPENMP
  m.attr("has_openmp") = true;
#else
  m.attr("has_openmp") = false;
#endif
  m.def("openmp_max_threads", &openmp_max_threads, "Threads an OpenMP parallel region would use (1 without OpenMP).");

  uae_bind::bind_image(m);
  uae_bind::bind_rl(m);
}
