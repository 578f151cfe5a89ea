// Pillow's bicubic resampler (libImaging/Resample.c, 8 bits per channel), reproduced exactly.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

// The integer kernels get an AVX2 clone too on x86-64 Linux, chosen at load time (ifunc);
// integer sums do not depend on the instruction set, so the results are the same.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define VISURF_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VISURF_SIMD_CLONES
#endif

namespace visurf {

// Fixed-point precision of the 8-bit filter: 32 - 8 bits of result - 2 bits of overshoot.
constexpr int kPrecisionBits = 22;

// The taps of a 1-D resize in_size -> out_size, as Pillow computes them.
// scale = in_size / out_size, filterscale = max(scale, 1), support = 2 * filterscale; output
// sample i is centred at (i + 0.5) * scale and reads the `count[i]` input samples from
// `first[i]` (clamped to the image) with weights  cubic((j - centre + 0.5) / filterscale)
// (a = -0.5), divided by their sum, then rounded away from zero to multiples of 2^-22:
// weight[i * ksize + j], zero past count[i].
struct Taps {
    int ksize = 0;
    std::vector<int> first, count;
    std::vector<int32_t> weight;
};

Taps bicubic_taps(int in_size, int out_size);

// Rows [row0, ...) of an interleaved RGB image `width` pixels wide, held contiguously.
struct Rows {
    const uint8_t* data;
    int width, row0;
    const uint8_t* row(int y) const { return data + static_cast<size_t>(y - row0) * width * 3; }
};

// The pass order of the installed Pillow: since Pillow 13 the vertical pass runs first when the
// height shrinks by more than twice as many pixels as the width; before, horizontal always first.
// (Each pass rounds to 8 bits, so the order changes the result.)
inline bool horizontal_first(int in_w, int in_h, int out_w, int out_h, int pillow_major) {
    const int dh = in_h - out_h, dw = in_w - out_w;
    return pillow_major < 13 || !(dh > 0 && dh > 2 * dw);
}

// The 8-bit result of one filter sum: (2^21 + sum of pixel * weight) >> 22, clamped to [0, 255].
inline uint8_t clip8(int32_t acc) {
    const int32_t v = acc >> kPrecisionBits;
    return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

// Rows the horizontal pass filters at once: each tap is then one multiply-add over 3 * 8 lanes.
constexpr int kRowsAtOnce = 8;

// Horizontal pass of `rows` <= kRowsAtOnce rows:
//   dst[r][x, c] = clip8(2^21 + sum_j src[r][first[x] + j, c] * w[x, j]),  x < taps.first.size();
// scratch: the rows interleaved pixel by pixel.
void resample_horizontal(const uint8_t* const* src, uint8_t* const* dst, int rows, int in_width, const Taps& taps,
                         std::vector<int32_t>& scratch);

// Vertical pass for output row y: dst[i] = clip8(2^21 + sum_j src.row(first[y] + j)[i] * w[y, j]),
// i < 3 * src.width; acc: scratch of 3 * src.width.
void resample_vertical(const Rows& src, int y, const Taps& taps, int32_t* acc, uint8_t* dst);

}  // namespace visurf
