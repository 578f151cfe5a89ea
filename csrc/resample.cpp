#include "resample.hpp"

#include <cmath>

namespace visurf {

namespace {

// Keys' cubic convolution kernel with a = -0.5, written as Pillow writes it.
double cubic(double x) {
    constexpr double a = -0.5;
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}

}  // namespace

Taps bicubic_taps(int in_size, int out_size) {
    Taps t;
    const double scale = static_cast<double>(in_size) / out_size;
    const double filterscale = scale < 1.0 ? 1.0 : scale;
    const double support = 2.0 * filterscale;
    t.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
    t.first.resize(out_size);
    t.count.resize(out_size);
    t.weight.assign(static_cast<size_t>(out_size) * t.ksize, 0);
    std::vector<double> k(t.ksize);
    for (int xx = 0; xx < out_size; ++xx) {
        const double center = (xx + 0.5) * scale;
        const double ss = 1.0 / filterscale;
        int xmin = static_cast<int>(center - support + 0.5);  // truncation, as Pillow
        if (xmin < 0) xmin = 0;
        int xmax = static_cast<int>(center + support + 0.5);
        if (xmax > in_size) xmax = in_size;
        xmax -= xmin;
        double ww = 0.0;
        for (int x = 0; x < xmax; ++x) {
            k[x] = cubic((x + xmin - center + 0.5) * ss);
            ww += k[x];
        }
        int32_t* w = &t.weight[static_cast<size_t>(xx) * t.ksize];
        for (int x = 0; x < xmax; ++x) {
            const double v = ww != 0.0 ? k[x] / ww : k[x];
            w[x] = static_cast<int32_t>(v < 0 ? -0.5 + v * (1 << kPrecisionBits) : 0.5 + v * (1 << kPrecisionBits));
        }
        t.first[xx] = xmin;
        t.count[xx] = xmax;
    }
    return t;
}

VISURF_SIMD_CLONES void resample_horizontal(const uint8_t* src, uint8_t* dst, const Taps& taps) {
    const int out_width = static_cast<int>(taps.first.size());
    constexpr int32_t half = 1 << (kPrecisionBits - 1);
    for (int xx = 0; xx < out_width; ++xx) {
        const uint8_t* p = src + 3 * taps.first[xx];
        const int32_t* w = &taps.weight[static_cast<size_t>(xx) * taps.ksize];
        int32_t s0 = half, s1 = half, s2 = half;
        for (int j = 0, n = taps.count[xx]; j < n; ++j, p += 3) {
            s0 += p[0] * w[j];
            s1 += p[1] * w[j];
            s2 += p[2] * w[j];
        }
        dst[3 * xx + 0] = clip8(s0);
        dst[3 * xx + 1] = clip8(s1);
        dst[3 * xx + 2] = clip8(s2);
    }
}

VISURF_SIMD_CLONES void resample_vertical(const Rows& src, int y, const Taps& taps, int32_t* acc, uint8_t* dst) {
    const int n = src.width * 3;
    for (int i = 0; i < n; ++i) acc[i] = 1 << (kPrecisionBits - 1);
    const int32_t* w = &taps.weight[static_cast<size_t>(y) * taps.ksize];
    for (int j = 0; j < taps.count[y]; ++j) {
        const uint8_t* s = src.row(taps.first[y] + j);
        const int32_t k = w[j];
        for (int i = 0; i < n; ++i) acc[i] += s[i] * k;
    }
    for (int i = 0; i < n; ++i) dst[i] = clip8(acc[i]);
}

}  // namespace visurf
