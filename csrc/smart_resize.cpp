#include "smart_resize.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace visurf {

namespace {

// Python's repr of a float in [1, 1e16): the fewest decimals (at least one) that read back as v.
std::string py_repr(double v) {
    char buf[64];
    for (int decimals = 1;; ++decimals) {
        std::snprintf(buf, sizeof buf, "%.*f", decimals, v);
        if (decimals == 17 || std::strtod(buf, nullptr) == v) return buf;
    }
}

}  // namespace

std::pair<int, int> smart_resize(int height, int width, int factor, long long min_pixels, long long max_pixels) {
    if (height <= 0 || width <= 0) throw std::invalid_argument("image height and width must be positive");
    const double ratio = static_cast<double>(std::max(height, width)) / std::min(height, width);
    if (ratio > 200) throw std::invalid_argument("absolute aspect ratio must be smaller than 200, got " + py_repr(ratio));
    const double f = factor;
    const double area = static_cast<double>(static_cast<long long>(height) * width);
    // nearbyint rounds half to even in the default rounding mode, like Python's round().
    long long h_bar = static_cast<long long>(std::nearbyint(height / f)) * factor;
    long long w_bar = static_cast<long long>(std::nearbyint(width / f)) * factor;
    if (h_bar * w_bar > max_pixels) {
        const double beta = std::sqrt(area / static_cast<double>(max_pixels));
        h_bar = std::max<long long>(factor, static_cast<long long>(std::floor(height / beta / f)) * factor);
        w_bar = std::max<long long>(factor, static_cast<long long>(std::floor(width / beta / f)) * factor);
    } else if (h_bar * w_bar < min_pixels) {
        const double beta = std::sqrt(static_cast<double>(min_pixels) / area);
        h_bar = static_cast<long long>(std::ceil(height * beta / f)) * factor;
        w_bar = static_cast<long long>(std::ceil(width * beta / f)) * factor;
    }
    return {static_cast<int>(h_bar), static_cast<int>(w_bar)};
}

}  // namespace visurf
