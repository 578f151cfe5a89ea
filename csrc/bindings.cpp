// Python bindings (pybind11 over numpy buffers): visurf_engine._qwen2vl_image.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "pipeline.hpp"
#include "smart_resize.hpp"

namespace py = pybind11;
using visurf::Geometry;
using visurf::RgbImage;

namespace {

using U8Array = py::array_t<uint8_t, py::array::c_style>;
using F32Array = py::array_t<float, py::array::c_style>;

// images: C-contiguous uint8 [H, W, 3]; lut: float32 [3, 256], value of each 8-bit level per channel.
py::tuple encode(const std::vector<U8Array>& images, const F32Array& lut, int patch_size, int merge_size,
                 int temporal_patch_size, long long min_pixels, long long max_pixels, int pillow_major, int threads) {
    if (patch_size <= 0 || merge_size <= 0 || temporal_patch_size <= 0 || threads <= 0)
        throw std::invalid_argument("patch_size, merge_size, temporal_patch_size and threads must be positive");
    if (lut.ndim() != 2 || lut.shape(0) != 3 || lut.shape(1) != 256) throw std::invalid_argument("lut must be float32 [3, 256]");
    std::vector<RgbImage> ims;
    for (const auto& a : images) {
        if (a.ndim() != 3 || a.shape(2) != 3) throw std::invalid_argument("images must be uint8 [H, W, 3]");
        ims.push_back({a.data(), static_cast<int>(a.shape(0)), static_cast<int>(a.shape(1))});
    }
    const Geometry g{patch_size, merge_size, temporal_patch_size, min_pixels, max_pixels, pillow_major};
    const auto sizes = visurf::output_sizes(ims, g);
    py::array_t<int64_t> grid({static_cast<py::ssize_t>(sizes.size()), py::ssize_t{3}});
    auto gr = grid.mutable_unchecked<2>();
    py::ssize_t patches = 0;
    for (size_t i = 0; i < sizes.size(); ++i) {
        gr(i, 0) = 1;
        gr(i, 1) = sizes[i].first / patch_size;
        gr(i, 2) = sizes[i].second / patch_size;
        patches += gr(i, 1) * gr(i, 2);
    }
    F32Array pixel_values({patches, static_cast<py::ssize_t>(3) * temporal_patch_size * patch_size * patch_size});
    float* out = pixel_values.mutable_data();
    {
        py::gil_scoped_release release;
        visurf::encode(ims, sizes, lut.data(), g, out, threads);
    }
    return py::make_tuple(pixel_values, grid);
}

}  // namespace

PYBIND11_MODULE(_qwen2vl_image, m) {
    m.doc() = "Native Qwen2-VL / Qwen2.5-VL image preprocessing (csrc/): Pillow-exact bicubic resize, "
              "rescale/normalize, temporal repeat and patchify in one pass.";
    m.def("smart_resize", &visurf::smart_resize, py::arg("height"), py::arg("width"), py::arg("factor"),
          py::arg("min_pixels"), py::arg("max_pixels"),
          "(height, width) of the resized image, rounded as transformers' smart_resize.");
    m.def("encode", &encode, py::arg("images"), py::arg("lut"), py::arg("patch_size"), py::arg("merge_size"),
          py::arg("temporal_patch_size"), py::arg("min_pixels"), py::arg("max_pixels"), py::arg("pillow_major"), py::arg("threads"),
          "(pixel_values float32 [patches, 3 * T * p * p], image_grid_thw int64 [images, 3]) of uint8 RGB "
          "[H, W, 3] images; lut[c, v] is the value of 8-bit level v of channel c; the resize matches Pillow "
          "pillow_major's. Releases the GIL.");
#ifdef __clang__
    m.attr("compiler") = "clang " __clang_version__;  // for benchmark records
#else
    m.attr("compiler") = "gcc " __VERSION__;
#endif
#ifdef _OPENMP
    m.attr("openmp") = _OPENMP;  // yyyymm of the OpenMP version; 0: built without, single-threaded
#else
    m.attr("openmp") = 0;
#endif
}
