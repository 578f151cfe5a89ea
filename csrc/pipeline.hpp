// The fused Qwen2-VL image pipeline: resize + rescale/normalize + temporal repeat + patchify.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

namespace visurf {

// One input image: interleaved 8-bit RGB, rows contiguous, height x width x 3.
struct RgbImage {
    const uint8_t* data;
    int height, width;
};

// The vision encoder's patch geometry and the processor's pixel budget.
struct Geometry {
    int patch;     // p: spatial patch size (14)
    int merge;     // m: spatial merge size (2); sizes are multiples of p * m
    int temporal;  // T: temporal patch size (2); a still image is repeated T times
    long long min_pixels, max_pixels;
    int pillow_major;  // the installed Pillow's major version, whose pass order is reproduced
};

// Output (height, width) of every image (smart_resize); throws std::invalid_argument.
std::vector<std::pair<int, int>> output_sizes(const std::vector<RgbImage>& images, const Geometry& g);

// Writes pixel_values[sum_i (h_i / p) * (w_i / p), 3 * T * p * p] (float32, row-major) for
// images resized to `sizes` with Pillow's bicubic filter (resample.hpp):
//   value(c, y, x) = lut[c * 256 + resized[y, x, c]]
//   pixel_values[n_i + ((by * (gw / m) + bx) * m + my) * m + mx, ((c * T + t) * p + py) * p + px]
//     = value(c, (by * m + my) * p + py, (bx * m + mx) * p + px)   for every t < T,
// with gw = w_i / p and n_i the patches of the images before i: the layout of transformers'
// patchify. One task per block of m * p output rows takes its input rows through both passes,
// the lookup and the scatter into patches; the tasks run in parallel over `threads`.
void encode(const std::vector<RgbImage>& images, const std::vector<std::pair<int, int>>& sizes, const float* lut,
            const Geometry& g, float* pixel_values, int threads);

}  // namespace visurf
