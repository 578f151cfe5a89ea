#include "pipeline.hpp"

#include <algorithm>
#include <cstddef>
#include <cstring>

#include "resample.hpp"
#include "smart_resize.hpp"

namespace visurf {

namespace {

// Per-thread scratch: two stages of image rows, the vertical pass's sums and the horizontal
// pass's interleaved rows.
struct Scratch {
    std::vector<uint8_t> a, b;
    std::vector<int32_t> acc, interleaved;
};

// Horizontal pass of rows [lo, hi) of `in` into `out`: the same rows at the output width.
Rows horizontal_rows(const Rows& in, int lo, int hi, const Taps& h, std::vector<uint8_t>& out, Scratch& s) {
    const int width = static_cast<int>(h.first.size());
    const size_t stride = static_cast<size_t>(width) * 3;
    out.resize((hi - lo) * stride);
    for (int y = lo; y < hi; y += kRowsAtOnce) {
        const int n = std::min(kRowsAtOnce, hi - y);
        const uint8_t* src[kRowsAtOnce];
        uint8_t* dst[kRowsAtOnce];
        for (int r = 0; r < n; ++r) src[r] = in.row(y + r), dst[r] = out.data() + (y + r - lo) * stride;
        resample_horizontal(src, dst, n, in.width, h, s.interleaved);
    }
    return {out.data(), width, lo};
}

// Vertical pass: output rows [lo, hi) from `in` into `out`.
Rows vertical_rows(const Rows& in, int lo, int hi, const Taps& v, std::vector<uint8_t>& out, Scratch& s) {
    const size_t stride = static_cast<size_t>(in.width) * 3;
    out.resize((hi - lo) * stride);
    s.acc.resize(stride);
    for (int y = lo; y < hi; ++y) resample_vertical(in, y, v, s.acc.data(), out.data() + (y - lo) * stride);
    return {out.data(), in.width, lo};
}

// One image's resize, in the installed Pillow's pass order (resample.hpp).
struct Plan {
    Rows input;
    int out_h, out_w;
    long long patch0;  // index of the image's first patch in pixel_values
    bool horizontal, vertical, horizontal_first;
    Taps h, v;
};

Plan make_plan(const RgbImage& in, std::pair<int, int> size, long long patch0, int pillow_major) {
    const int oh = size.first, ow = size.second;
    Plan p{{in.data, in.width, 0}, oh, ow, patch0, ow != in.width, oh != in.height,
           horizontal_first(in.width, in.height, ow, oh, pillow_major), {}, {}};
    if (p.horizontal) p.h = bicubic_taps(in.width, ow);
    if (p.vertical) p.v = bicubic_taps(in.height, oh);
    return p;
}

// Output rows [y0, y0 + m * p) into their patches, in output order: rescale/normalize through
// `lut`, repeat T times.
void scatter_block(const Rows& rows, int y0, const Plan& plan, const float* lut, const Geometry& g, float* out) {
    const int p = g.patch, m = g.merge, T = g.temporal, pp = p * p;
    const int blocks_w = plan.out_w / (p * m);
    float* dst = out + (plan.patch0 + static_cast<long long>(y0 / (p * m)) * blocks_w * m * m) * 3 * T * pp;
    for (int bx = 0; bx < blocks_w; ++bx)
        for (int my = 0; my < m; ++my)
            for (int mx = 0; mx < m; ++mx) {
                const int x0 = (bx * m + mx) * p * 3;
                for (int c = 0; c < 3; ++c, dst += T * pp) {
                    const float* l = lut + c * 256;
                    for (int py = 0; py < p; ++py) {
                        const uint8_t* src = rows.row(y0 + my * p + py) + x0 + c;
                        for (int px = 0; px < p; ++px) dst[py * p + px] = l[src[px * 3]];
                    }
                    for (int t = 1; t < T; ++t) std::memcpy(dst + t * pp, dst, sizeof(float) * pp);
                }
            }
}

// Output rows [y0, y0 + m * p) of one image, from its input rows to its patches. With the
// horizontal pass first, the task filters the input rows its vertical taps read, a few of
// which the neighbouring blocks filter too; in exchange the rows stay in cache and blocks
// need no ordering.
void encode_block(const Plan& plan, int y0, const float* lut, const Geometry& g, float* out, Scratch& s) {
    const int y1 = y0 + g.patch * g.merge;
    Rows rows = plan.input;
    if (plan.horizontal_first) {
        if (plan.horizontal) {
            const int lo = plan.vertical ? plan.v.first[y0] : y0;
            const int hi = plan.vertical ? plan.v.first[y1 - 1] + plan.v.count[y1 - 1] : y1;
            rows = horizontal_rows(rows, lo, hi, plan.h, s.a, s);
        }
        if (plan.vertical) rows = vertical_rows(rows, y0, y1, plan.v, s.b, s);
    } else {  // the height shrinks: Pillow 13 resizes vertically first
        rows = vertical_rows(rows, y0, y1, plan.v, s.a, s);
        if (plan.horizontal) rows = horizontal_rows(rows, y0, y1, plan.h, s.b, s);
    }
    scatter_block(rows, y0, plan, lut, g, out);
}

}  // namespace

std::vector<std::pair<int, int>> output_sizes(const std::vector<RgbImage>& images, const Geometry& g) {
    std::vector<std::pair<int, int>> sizes;
    sizes.reserve(images.size());
    for (const auto& im : images) sizes.push_back(smart_resize(im.height, im.width, g.patch * g.merge, g.min_pixels, g.max_pixels));
    return sizes;
}

void encode(const std::vector<RgbImage>& images, const std::vector<std::pair<int, int>>& sizes, const float* lut,
            const Geometry& g, float* pixel_values, int threads) {
    std::vector<Plan> plans;
    std::vector<std::pair<int, int>> tasks;  // (image, first output row of the block)
    long long patch0 = 0;
    for (size_t i = 0; i < images.size(); ++i) {
        plans.push_back(make_plan(images[i], sizes[i], patch0, g.pillow_major));
        patch0 += static_cast<long long>(sizes[i].first / g.patch) * (sizes[i].second / g.patch);
        for (int y = 0; y < sizes[i].first; y += g.patch * g.merge) tasks.emplace_back(static_cast<int>(i), y);
    }
    const int n = static_cast<int>(tasks.size());
#pragma omp parallel num_threads(threads)
    {
        Scratch s;
#pragma omp for schedule(dynamic)
        for (int t = 0; t < n; ++t) encode_block(plans[tasks[t].first], tasks[t].second, lut, g, pixel_values, s);
    }
}

}  // namespace visurf
