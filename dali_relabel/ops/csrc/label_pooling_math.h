// LabelPooling math shared by the CPU and CUDA backends (no DALI dependency).
//
// RoIAlign with a 1x1 (or oh x ow) output is linear in the map and separable in its two axes, so the
// weight of map cell (a, b) for output bin (p, q) is wA[a] * wB[b]. Each axis weight reproduces
// torchvision.ops.roi_align(aligned=False, sampling_ratio=-1) exactly: ceil(roi / bins) sample
// points per bin, bilinear interpolation with torchvision's border rules, and the average over all
// sample points (points outside the map count, with weight 0).
#ifndef DALI_RELABEL_LABEL_POOLING_MATH_H_
#define DALI_RELABEL_LABEL_POOLING_MATH_H_

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define RELABEL_HD __host__ __device__
#else
#define RELABEL_HD
#endif

namespace dali_relabel {

// A box along map axis A (rows of the stored map) and axis B (columns), in grid units, already
// scaled and shifted by -0.5 as the reference does.
struct GridBox {
  float a_start, a_end, b_start, b_end;
};

// One sample's pooling problem, after validation; pointers are host or device addresses.
struct PoolingSample {
  GridBox box;       // the pooled box (the crop, or the region inside it)
  GridBox region;    // with `outside`: the region left out of the crop
  float region_fraction;  // with `outside`: the region's share of the crop's area, in [0, 1)
  int outside;       // pool over `box` minus `region`: (P(box) - f * P(region)) / (1 - f)
  int flip;          // mirror the output grid left-right
  float *out;        // this sample's output (device address), GPU backend only
  int64_t in_offset;   // where this sample's k*H*W entries start (elements), GPU backend only
};

// RoIAlign's sampling along one axis: `grid` points per output bin, each interpolated between two
// cells. Every function below walks the points through this one definition, so the CPU and CUDA
// backends compute identical weights.
struct AxisSampling {
  float start, bin_size;
  int grid, samples;

  RELABEL_HD AxisSampling(float start_, float end, int bins) : start(start_) {
    float roi = end - start;
    if (roi < 1.f) roi = 1.f;
    bin_size = roi / static_cast<float>(bins);
    grid = static_cast<int>(ceilf(roi / static_cast<float>(bins)));
    samples = grid > 0 ? grid : 1;
  }

  // Sample point `s` of output bin `bin` over `size` cells: false if it lies outside the map (it
  // still counts in the average, with weight 0), else the two cells and the weight `l` of `high`.
  RELABEL_HD bool Point(int bin, int s, int size, int *low, int *high, float *l) const {
    float y = start + bin * bin_size + static_cast<float>(s + .5f) * bin_size / static_cast<float>(grid);
    if (y < -1.f || y > static_cast<float>(size)) return false;
    if (y <= 0.f) y = 0.f;
    *low = static_cast<int>(y);
    if (*low >= size - 1) {
      *high = *low = size - 1;
      y = static_cast<float>(*low);
    } else {
      *high = *low + 1;
    }
    *l = y - *low;
    return true;
  }
};

// The weight of map cell `cell` (of `size` along this axis) in output bin `bin` of `bins`, for a box
// [start, end) in grid coordinates. Matches torchvision's roi_align bilinear_interpolate.
RELABEL_HD inline float AxisWeight(float start, float end, int size, int bins, int bin, int cell) {
  const AxisSampling sampling(start, end, bins);
  float total = 0.f;
  int low, high;
  float l;
  for (int s = 0; s < sampling.grid; s++) {
    if (!sampling.Point(bin, s, size, &low, &high, &l)) continue;
    if (low == cell) total += 1.f - l;
    if (high == cell) total += l;
  }
  return total / static_cast<float>(sampling.samples);
}

// All `size` cell weights of one output bin at once (host side), equal to AxisWeight for every cell;
// O(samples) instead of O(cells * samples).
inline void AxisWeights(float start, float end, int size, int bins, int bin, float *weights) {
  const AxisSampling sampling(start, end, bins);
  for (int cell = 0; cell < size; cell++) weights[cell] = 0.f;
  int low, high;
  float l;
  for (int s = 0; s < sampling.grid; s++) {
    if (!sampling.Point(bin, s, size, &low, &high, &l)) continue;
    weights[low] += 1.f - l;
    weights[high] += l;
  }
  for (int cell = 0; cell < size; cell++) weights[cell] /= static_cast<float>(sampling.samples);
}

}  // namespace dali_relabel

#endif  // DALI_RELABEL_LABEL_POOLING_MATH_H_
