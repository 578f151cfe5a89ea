// smart_resize: the Qwen2-VL output size, with transformers' rounding.
#pragma once

#include <utility>

namespace visurf {

// (height, width) rounded to multiples of `factor` (= patch_size * merge_size) with
// min_pixels <= h * w <= max_pixels, keeping the aspect ratio as closely as possible:
//   h, w = round(H / f) * f, round(W / f) * f                      (round half to even, as Python)
//   if h * w > max_pixels: beta = sqrt(H * W / max_pixels); h, w = max(f, floor(H / beta / f) * f), ...
//   if h * w < min_pixels: beta = sqrt(min_pixels / (H * W)); h, w = ceil(H * beta / f) * f, ...
// Throws std::invalid_argument (ValueError in Python) when max(H, W) / min(H, W) > 200, with
// transformers' message.
std::pair<int, int> smart_resize(int height, int width, int factor, long long min_pixels, long long max_pixels);

}  // namespace visurf
