// LabelPooling math shared by the CPU and CUDA backends (no DALI dependency).
//
// RoIAlign with a 1x1 (or oh x ow) output is linear in the map and separable in its two axes, so the
// weight of map cell (a, b) for output bin (p, q) is wA[a] * wB[b]. Each axis weight reproduces
// torchvision.ops.roi_align(aligned=False, sampling_ratio=-1) exactly: ceil(roi / bins) sample
// points per bin, bilinear interpolation with torchvision's border rules, and the average over all
// sample points (points outside the map count, with weight 0).
//
// A sample with a geometric transform (a non-identity `affine`) takes the warp path instead: the
// output image is sampled at a lattice of points (WarpSampling), each inverse-mapped into the label
// map and read with the same bilinear rule; points showing fill (outside the crop window) are left
// out of the average. With several geometric ops, content an earlier op moved off the canvas shows
// fill although the composed affine maps it inside: the optional canvas checks (the partial
// compositions, output pixel -> each intermediate canvas) leave out every point that any of them
// maps off the canvas.
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

// Sample points per output cell and axis on the warp path, at most.
constexpr int kMaxLattice = 64;

// How a sample with a geometric transform is sampled (the warp path). The output image (w x h
// pixels, pixel i covering [i, i + 1)) is divided into the output grid's cells; each cell is
// sampled at an nx x ny lattice of points at the centres of an nx x ny subdivision of the cell (as
// RoIAlign places its sample points in a bin). A point (x, y) maps to (qx, qy) = affine . (x, y, 1)
// in the resized, flipped crop (also w x h); it shows fill unless 0 <= qx <= w and 0 <= qy <= h
// and every canvas check maps it into [0, w] x [0, h] as well. Shown points are unflipped
// (qx -> w - qx), scaled into the crop window and onto the map grid.
struct WarpSampling {
  float affine[6];           // row-major [2, 3]: output pixel -> resized flipped crop pixel
  float width, height;       // the output image (= the resized crop) in pixels
  float origin_x, origin_y;  // corner of the sampled rectangle (the image, or a region) in pixels
  float step_x, step_y;      // lattice spacing in output pixels
  int nx, ny;                // points per output cell along x and y
  int exclude;               // leave out points inside [ex0, ex1] x [ey0, ey1] (region "outside")
  float ex0, ey0, ex1, ey1;
  // Resized-crop pixel to map grid coordinate: along the image's x, gx = qx' * kx + bx (qx' the
  // unflipped qx); along its y, gy = qy * ky + by. Grid coordinates are shifted by -0.5, as `box`.
  double kx, bx, ky, by;
  // Canvas checks: `num_checks` row-major [2, 3] maps from an output point to a point of an
  // intermediate canvas (also w x h); a point any of them maps outside [0, w] x [0, h] shows fill.
  // `checks` is a host or device address (num_checks * 6 floats), `check_offset` where they start in
  // the batch's packed checks (PoolingBatch::checks). Identity checks are never stored.
  int num_checks;
  int64_t check_offset;
  const float *checks;
};

// One sample's pooling problem, after validation; pointers are host or device addresses.
struct PoolingSample {
  GridBox box;       // the pooled box (the crop, or the region inside it)
  GridBox region;    // with `outside`: the region left out of the crop
  float region_fraction;  // with `outside`: the region's share of the crop's area, in [0, 1)
  int outside;       // pool over `box` minus `region`: (P(box) - f * P(region)) / (1 - f)
  int flip;          // mirror the output grid left-right (box path); unflip the crop (warp path)
  int warp;          // 1: pool through `sampling` (a geometric transform ran), 0: RoIAlign over `box`
  WarpSampling sampling;  // with `warp`
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
  RELABEL_HD bool Point(int bin, int s, int size, int *low, int *high, float *l) const;
};

// torchvision's bilinear rule along one axis of `size` cells at grid coordinate `y`: false more than
// one cell outside the map, else the two cells and the weight `l` of `high` (clamped at the borders).
// (float on the RoIAlign path, as torchvision; double on the warp path.)
template <typename T>
RELABEL_HD inline bool BilinearAxis(T y, int size, int *low, int *high, T *l) {
  if (y < T(-1) || y > static_cast<T>(size)) return false;
  if (y <= T(0)) y = T(0);
  *low = static_cast<int>(y);
  if (*low >= size - 1) {
    *high = *low = size - 1;
    y = static_cast<T>(*low);
  } else {
    *high = *low + 1;
  }
  *l = y - *low;
  return true;
}

RELABEL_HD inline bool AxisSampling::Point(int bin, int s, int size, int *low, int *high,
                                           float *l) const {
  const float y = start + bin * bin_size + static_cast<float>(s + .5f) * bin_size / static_cast<float>(grid);
  return BilinearAxis(y, size, low, high, l);
}

// True if the [2, 3] map `c` sends the output point (x, y) into [0, width] x [0, height]: the same
// exact-product double arithmetic as WarpPoint's affine (a product of two floats is exact in double,
// so a fused multiply-add rounds the same), hence the same decision on every backend and in the
// reference.
RELABEL_HD inline bool OnCanvas(const float *c, float x, float y, double width, double height) {
  const double px = (static_cast<double>(c[0]) * x + static_cast<double>(c[1]) * y) + static_cast<double>(c[2]);
  const double py = (static_cast<double>(c[3]) * x + static_cast<double>(c[4]) * y) + static_cast<double>(c[5]);
  return px >= 0.0 && px <= width && py >= 0.0 && py <= height;
}

// True if every canvas check of `w` keeps the output point (x, y) on its canvas.
RELABEL_HD inline bool PassesCanvasChecks(const WarpSampling &w, float x, float y) {
  for (int c = 0; c < w.num_checks; c++)
    if (!OnCanvas(w.checks + 6 * c, x, y, w.width, w.height)) return false;
  return true;
}

// Warp path: lattice point (gi, gj) of the sampled rectangle (gi along x over the whole output
// width: cell q holds gi in [q * nx, (q + 1) * nx)). False if it shows fill or lies in the excluded
// region or any canvas check (WarpSampling::checks) maps it off its canvas; else its map grid position
// (a along map rows, b along map columns).
//
// The point and its image under the affine are computed in double from float inputs: the products
// are exact, so the decision "inside the window" is the same on every backend and in the reference
// (dali_relabel.ops.reference.reference_warp_pooling), whatever the compiler fuses.
RELABEL_HD inline bool WarpPoint(const WarpSampling &w, int flip, bool transposed, int gi, int gj,
                                 double *a, double *b) {
  const float x = static_cast<float>(static_cast<double>(w.origin_x) + (gi + 0.5) * static_cast<double>(w.step_x));
  const float y = static_cast<float>(static_cast<double>(w.origin_y) + (gj + 0.5) * static_cast<double>(w.step_y));
  if (w.exclude && x >= w.ex0 && x <= w.ex1 && y >= w.ey0 && y <= w.ey1) return false;
  const double qx = (static_cast<double>(w.affine[0]) * x + static_cast<double>(w.affine[1]) * y) +
                    static_cast<double>(w.affine[2]);
  const double qy = (static_cast<double>(w.affine[3]) * x + static_cast<double>(w.affine[4]) * y) +
                    static_cast<double>(w.affine[5]);
  if (!(qx >= 0.0 && qx <= w.width && qy >= 0.0 && qy <= w.height)) return false;
  if (!PassesCanvasChecks(w, x, y)) return false;
  const double gx = (flip ? w.width - qx : qx) * w.kx + w.bx;
  const double gy = qy * w.ky + w.by;
  *a = transposed ? gx : gy;
  *b = transposed ? gy : gx;
  return true;
}

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

// The four cells (row-major indices into the map) and bilinear weights of grid point (a, b), by
// BilinearAxis along each axis; false if the point is more than one cell outside the map. The
// fractions are taken in double: a float grid coordinate near 15 would be off by up to 5e-7 cells.
RELABEL_HD inline bool BilinearPoint(double a, double b, int map_h, int map_w, int cell[4], float weight[4]) {
  int a0, a1, b0, b1;
  double la_d, lb_d;
  if (!BilinearAxis(a, map_h, &a0, &a1, &la_d) || !BilinearAxis(b, map_w, &b0, &b1, &lb_d)) return false;
  const float la = static_cast<float>(la_d), lb = static_cast<float>(lb_d);
  cell[0] = a0 * map_w + b0;
  cell[1] = a0 * map_w + b1;
  cell[2] = a1 * map_w + b0;
  cell[3] = a1 * map_w + b1;
  weight[0] = (1.f - la) * (1.f - lb);
  weight[1] = (1.f - la) * lb;
  weight[2] = la * (1.f - lb);
  weight[3] = la * lb;
  return true;
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
