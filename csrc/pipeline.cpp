#include "pipeline.hpp"

#include <algorithm>
#include <cstddef>
#include <cstring>

#include "resample.hpp"
#include "smart_resize.hpp"

namespace visurf {

namespace {

constexpr int kRowsPerTask = 16;  // first-pass rows per scheduled task

// Per-thread scratch: the vertical pass's sums, the horizontal pass's interleaved rows, one
// block of output rows and pointers to the block's rows.
struct Scratch {
    std::vector<int32_t> acc, interleaved;
    std::vector<uint8_t> rows;
    std::vector<const uint8_t*> lines;
};

// One image's resize, in Pillow's order. The first pass (horizontal: only the input rows the
// vertical pass reads; vertical: every output row) writes `mid`; the second pass runs per
// block of output rows, fused with the scatter into patches. Without a first pass, `mid` is
// the input.
struct Plan {
    Rows input;
    int out_h, out_w;
    long long patch0;  // index of the image's first patch in pixel_values
    bool horizontal, vertical, horizontal_first;
    Taps h, v;
    Rows mid;
    int first_begin = 0, first_end = 0;  // rows of `mid` the first pass computes
    std::vector<uint8_t> mid_data;

    uint8_t* mid_row(int y) { return mid_data.data() + static_cast<size_t>(y - mid.row0) * mid.width * 3; }

    // First-pass rows [y0, y1) of `mid`.
    void first_pass(int y0, int y1, Scratch& s) {
        if (!horizontal_first) {
            for (int y = y0; y < y1; ++y) resample_vertical(input, y, v, s.acc.data(), mid_row(y));
            return;
        }
        for (int y = y0; y < y1; y += kRowsAtOnce) {
            const int n = std::min(kRowsAtOnce, y1 - y);
            const uint8_t* src[kRowsAtOnce];
            uint8_t* dst[kRowsAtOnce];
            for (int r = 0; r < n; ++r) src[r] = input.row(y + r), dst[r] = mid_row(y + r);
            resample_horizontal(src, dst, n, input.width, h, s.interleaved);
        }
    }

    // Output rows [y0, y0 + n): s.lines[r] is row y0 + r, in s.rows or in `mid`.
    void second_pass(int y0, int n, Scratch& s) const {
        const size_t stride = static_cast<size_t>(out_w) * 3;
        s.rows.resize(n * stride);
        s.lines.resize(n);
        for (int r = 0; r < n; ++r) s.lines[r] = mid.row(y0 + r);
        if (horizontal_first && vertical) {
            for (int r = 0; r < n; ++r) {
                resample_vertical(mid, y0 + r, v, s.acc.data(), s.rows.data() + r * stride);
                s.lines[r] = s.rows.data() + r * stride;
            }
        } else if (!horizontal_first && horizontal) {
            for (int r0 = 0; r0 < n; r0 += kRowsAtOnce) {
                const int k = std::min(kRowsAtOnce, n - r0);
                uint8_t* dst[kRowsAtOnce];
                for (int r = 0; r < k; ++r) dst[r] = s.rows.data() + (r0 + r) * stride;
                resample_horizontal(s.lines.data() + r0, dst, k, mid.width, h, s.interleaved);
                for (int r = 0; r < k; ++r) s.lines[r0 + r] = dst[r];
            }
        }
    }
};

Plan make_plan(const RgbImage& in, std::pair<int, int> size, long long patch0, int pillow_major) {
    const int oh = size.first, ow = size.second;
    Plan p{{in.data, in.width, 0}, oh, ow, patch0, ow != in.width, oh != in.height,
           horizontal_first(in.width, in.height, ow, oh, pillow_major), {}, {}, {in.data, in.width, 0}};
    if (p.horizontal) p.h = bicubic_taps(in.width, ow);
    if (p.vertical) p.v = bicubic_taps(in.height, oh);
    if (p.horizontal_first && p.horizontal) {
        p.first_begin = p.vertical ? p.v.first.front() : 0;
        p.first_end = p.vertical ? p.v.first.back() + p.v.count.back() : in.height;
        p.mid = {nullptr, ow, p.first_begin};
    } else if (!p.horizontal_first) {  // then the height shrinks: vertical pass first
        p.first_end = oh;
        p.mid = {nullptr, in.width, 0};
    }
    if (p.first_end > p.first_begin) {
        p.mid_data.resize(static_cast<size_t>(p.first_end - p.first_begin) * p.mid.width * 3);
        p.mid.data = p.mid_data.data();
    }
    return p;
}

// The patches of one block of m * p output rows (lines[r]: interleaved RGB row r of the
// block), written in output order: rescale/normalize through `lut`, repeat T times.
void scatter_block(const uint8_t* const* lines, int by, const Plan& plan, const float* lut, const Geometry& g, float* out) {
    const int p = g.patch, m = g.merge, T = g.temporal, pp = p * p;
    const int blocks_w = plan.out_w / (p * m);
    float* dst = out + (plan.patch0 + static_cast<long long>(by) * blocks_w * m * m) * 3 * T * pp;
    for (int bx = 0; bx < blocks_w; ++bx)
        for (int my = 0; my < m; ++my)
            for (int mx = 0; mx < m; ++mx) {
                const int x0 = (bx * m + mx) * p * 3;
                for (int c = 0; c < 3; ++c, dst += T * pp) {
                    const float* l = lut + c * 256;
                    for (int py = 0; py < p; ++py) {
                        const uint8_t* src = lines[my * p + py] + x0 + c;
                        for (int px = 0; px < p; ++px) dst[py * p + px] = l[src[px * 3]];
                    }
                    for (int t = 1; t < T; ++t) std::memcpy(dst + t * pp, dst, sizeof(float) * pp);
                }
            }
}

// Output rows [y0, y0 + m * p): the second pass, then scatter_block.
void encode_block(const Plan& plan, int y0, const float* lut, const Geometry& g, float* out, Scratch& s) {
    const int block = g.patch * g.merge;
    plan.second_pass(y0, block, s);
    scatter_block(s.lines.data(), y0 / block, plan, lut, g, out);
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
    std::vector<std::pair<int, int>> row_tasks, block_tasks;  // (image, first row)
    long long patch0 = 0;
    size_t widest = 0;
    for (size_t i = 0; i < images.size(); ++i) {
        plans.push_back(make_plan(images[i], sizes[i], patch0, g.pillow_major));
        const Plan& p = plans.back();
        patch0 += static_cast<long long>(p.out_h / g.patch) * (p.out_w / g.patch);
        widest = std::max(widest, static_cast<size_t>(std::max(p.input.width, p.out_w)) * 3);
        for (int r = p.first_begin; r < p.first_end; r += kRowsPerTask) row_tasks.emplace_back(static_cast<int>(i), r);
        for (int y = 0; y < p.out_h; y += g.patch * g.merge) block_tasks.emplace_back(static_cast<int>(i), y);
    }
    const int n_rows = static_cast<int>(row_tasks.size()), n_blocks = static_cast<int>(block_tasks.size());
#pragma omp parallel num_threads(threads)
    {
        Scratch s;
        s.acc.resize(widest);
#pragma omp for schedule(dynamic)
        for (int t = 0; t < n_rows; ++t) {
            Plan& p = plans[row_tasks[t].first];
            p.first_pass(row_tasks[t].second, std::min(row_tasks[t].second + kRowsPerTask, p.first_end), s);
        }
#pragma omp for schedule(dynamic)
        for (int t = 0; t < n_blocks; ++t) encode_block(plans[block_tasks[t].first], block_tasks[t].second, lut, g, pixel_values, s);
    }
}

}  // namespace visurf
