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

VISURF_SIMD_CLONES void resample_horizontal(const uint8_t* const* src, uint8_t* const* dst, int rows, int in_width,
                                            const Taps& taps, std::vector<int32_t>& scratch) {
    constexpr int lanes = 3 * kRowsAtOnce;
    scratch.resize(static_cast<size_t>(in_width) * lanes);
    int32_t* t = scratch.data();  // t[x * lanes + 3 * r + c] = src[r][3 * x + c]; missing rows repeat the last
    const uint8_t* s[kRowsAtOnce];
    for (int r = 0; r < kRowsAtOnce; ++r) s[r] = src[r < rows ? r : rows - 1];
    for (int x = 0; x < 3 * in_width; x += 3, t += lanes)
        for (int r = 0; r < kRowsAtOnce; ++r)
            for (int c = 0; c < 3; ++c) t[3 * r + c] = s[r][x + c];
    t = scratch.data();
    const int out_width = static_cast<int>(taps.first.size());
    for (int xx = 0; xx < out_width; ++xx) {
        const int32_t* p = t + static_cast<size_t>(taps.first[xx]) * lanes;
        const int32_t* w = &taps.weight[static_cast<size_t>(xx) * taps.ksize];
        int32_t acc[lanes];
        for (int i = 0; i < lanes; ++i) acc[i] = 1 << (kPrecisionBits - 1);
        for (int j = 0, n = taps.count[xx]; j < n; ++j, p += lanes)
            for (int i = 0; i < lanes; ++i) acc[i] += p[i] * w[j];
        for (int r = 0; r < rows; ++r)
            for (int c = 0; c < 3; ++c) dst[r][3 * xx + c] = clip8(acc[3 * r + c]);
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
