// Random-resized-crop windows and flips drawn from a per-sample key (no DALI dependency).
//
// Every random choice of a sample comes from its 64-bit key, derived from (seed, epoch, row) alone
// (SampleKey). So a sample's crop, flip and colour jitter depend on nothing else: not on its position
// in a batch, the thread that draws it, the number of ranks, the data path (tree or tar shards), or
// whether the run was resumed. `dali_relabel/crops.py` is the Python twin of this file; the tests
// require both to give identical windows and draws.
//
// The window follows torchvision's RandomResizedCrop.get_params: up to `attempts` draws of an area
// fraction (uniform in [area_lo, area_hi]) and an aspect ratio w/h (log-uniform in
// [ratio_lo, ratio_hi]), rounded half to even, accepted when it fits the image, placed uniformly;
// otherwise the largest centred window whose aspect ratio lies in the range.
#ifndef DALI_RELABEL_CROP_WINDOW_H_
#define DALI_RELABEL_CROP_WINDOW_H_

#include <cmath>
#include <cstdint>

namespace dali_relabel {

// SplitMix64's finaliser of x + gamma: a bijection of 64-bit integers.
inline uint64_t Mix(uint64_t x) {
  uint64_t z = x + 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The key of `row` in `epoch`: each step is a bijection, so rows of one (seed, epoch) never share it.
inline uint64_t SampleKey(uint64_t seed, uint64_t epoch, uint64_t row) {
  return Mix(row + Mix(Mix(seed) + epoch));
}

// Uniform in [0, 1) number `index` of stream `stream` of a key (streams other than the crop's).
// The stream is mixed before the index is added: `(C ^ stream) + index` alone let neighbouring
// streams share draws (stream 17's index 1 was stream 16's index 0).
inline double SampleUniform(uint64_t key, uint64_t stream, uint64_t index) {
  const uint64_t salt = Mix(Mix(0xA0761D6478BD642Full ^ stream) + index);
  return static_cast<double>(Mix(key ^ salt) >> 11) * 0x1.0p-53;
}

// SplitMix64 (Steele, Lea & Flood 2014): a 64-bit counter through a bijective mixer.
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t key) : state_(key) {}

  uint64_t Next() {
    state_ += 0x9E3779B97F4A7C15ull;
    uint64_t z = state_;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }

  // Uniform in [0, 1), 53 random bits.
  double Uniform() { return static_cast<double>(Next() >> 11) * 0x1.0p-53; }

  // Uniform integer in [0, n), n > 0.
  int64_t Below(int64_t n) {
    const int64_t value = static_cast<int64_t>(Uniform() * static_cast<double>(n));
    return value < n ? value : n - 1;
  }

 private:
  uint64_t state_;
};

struct CropParams {
  double area_lo = 0.08, area_hi = 1.0;    // fraction of the image area
  double ratio_lo = 0.75, ratio_hi = 4.0 / 3.0;  // w / h
  int attempts = 10;
  double flip_probability = 0.5;
};

struct CropWindow {
  int64_t y, x, h, w;
  int mirror;
};

// The window and flip of an H x W image for `key`. The flip is the stream's first draw, so it does
// not depend on how many attempts the window took.
inline CropWindow DrawCropWindow(int64_t height, int64_t width, uint64_t key, const CropParams &p) {
  SplitMix64 rng(key);
  CropWindow out{};
  out.mirror = rng.Uniform() < p.flip_probability ? 1 : 0;
  const double area = static_cast<double>(height) * static_cast<double>(width);
  const double log_lo = std::log(p.ratio_lo), log_hi = std::log(p.ratio_hi);
  for (int attempt = 0; attempt < p.attempts; attempt++) {
    const double target = area * (p.area_lo + (p.area_hi - p.area_lo) * rng.Uniform());
    const double ratio = std::exp(log_lo + (log_hi - log_lo) * rng.Uniform());
    // nearbyint rounds half to even (the default rounding mode), as Python's round() does.
    const int64_t w = static_cast<int64_t>(std::nearbyint(std::sqrt(target * ratio)));
    const int64_t h = static_cast<int64_t>(std::nearbyint(std::sqrt(target / ratio)));
    if (w > 0 && w <= width && h > 0 && h <= height) {
      out.y = rng.Below(height - h + 1);
      out.x = rng.Below(width - w + 1);
      out.h = h;
      out.w = w;
      return out;
    }
  }
  const double in_ratio = static_cast<double>(width) / static_cast<double>(height);
  int64_t w = width, h = height;
  if (in_ratio < p.ratio_lo) {
    h = static_cast<int64_t>(std::nearbyint(static_cast<double>(w) / p.ratio_lo));
  } else if (in_ratio > p.ratio_hi) {
    w = static_cast<int64_t>(std::nearbyint(static_cast<double>(h) * p.ratio_hi));
  }
  h = h < 1 ? 1 : (h > height ? height : h);
  w = w < 1 ? 1 : (w > width ? width : w);
  out.y = (height - h) / 2;
  out.x = (width - w) / 2;
  out.h = h;
  out.w = w;
  return out;
}

// Colour-jitter factors (brightness, contrast, saturation; hue in degrees) for strengths
// (b, c, s, h): factors uniform in [max(0, 1 - x), 1 + x], hue in [-360 h, 360 h]. Stream 1.
inline void DrawJitter(uint64_t key, const float strength[4], float out[4]) {
  for (int i = 0; i < 3; i++) {
    const double low = strength[i] < 1 ? 1.0 - strength[i] : 0.0, high = 1.0 + strength[i];
    out[i] = static_cast<float>(low + (high - low) * SampleUniform(key, 1, i));
  }
  const double hue = strength[3];
  out[3] = static_cast<float>((-hue + 2 * hue * SampleUniform(key, 1, 3)) * 360.0);
}

// 0 (bilinear) or 1 (bicubic), each with probability 1/2. Stream 2.
inline int DrawInterpolation(uint64_t key) { return SampleUniform(key, 2, 0) >= 0.5 ? 1 : 0; }

}  // namespace dali_relabel

#endif  // DALI_RELABEL_CROP_WINDOW_H_
