// relabel.label_pooling: the schema and the host-side preparation both backends use (arguments,
// input checks, crop boxes on the grid, values converted and checked).
#include "label_pooling.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "dali/core/float16.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace dali_relabel {

using ::dali::CPUBackend;

using ::dali::TensorList;

namespace {

// Reads element `idx` of sample `sample` as a double, whatever the numeric input type.
double ReadNumber(const TensorList<CPUBackend> &input, int sample, int64_t idx, const char *name) {
  const void *p = input.raw_tensor(sample);
  switch (input.type()) {
    case DALI_UINT8: return static_cast<const uint8_t *>(p)[idx];
    case DALI_UINT16: return static_cast<const uint16_t *>(p)[idx];
    case DALI_UINT32: return static_cast<const uint32_t *>(p)[idx];
    case DALI_UINT64: return static_cast<double>(static_cast<const uint64_t *>(p)[idx]);
    case DALI_INT8: return static_cast<const int8_t *>(p)[idx];
    case DALI_INT16: return static_cast<const int16_t *>(p)[idx];
    case DALI_INT32: return static_cast<const int32_t *>(p)[idx];
    case DALI_INT64: return static_cast<double>(static_cast<const int64_t *>(p)[idx]);
    case DALI_BOOL: return static_cast<const bool *>(p)[idx] ? 1.0 : 0.0;
    case DALI_FLOAT16: return static_cast<float>(static_cast<const ::dali::float16 *>(p)[idx]);
    case DALI_FLOAT: return static_cast<const float *>(p)[idx];
    case DALI_FLOAT64: return static_cast<const double *>(p)[idx];
    default:
      DALI_FAIL("relabel.label_pooling: input '", name, "' has unsupported type ", input.type());
  }
}

#if defined(__x86_64__)
// The F16C instruction converts 8 halves at once; chosen at run time, so the library still runs on
// CPUs without it.
__attribute__((target("avx,f16c"))) void HalfToFloatF16C(const uint16_t *src, int64_t n, float *dst) {
  int64_t e = 0;
  for (; e + 8 <= n; e += 8)
    _mm256_storeu_ps(dst + e, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(src + e))));
  for (; e < n; e++) dst[e] = _cvtsh_ss(src[e]);
}
#endif

void HalfToFloat(const ::dali::float16 *src, int64_t n, float *dst) {
#if defined(__x86_64__)
  static const bool has_f16c = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
  if (has_f16c) return HalfToFloatF16C(reinterpret_cast<const uint16_t *>(src), n, dst);
#endif
  for (int64_t e = 0; e < n; e++) dst[e] = static_cast<float>(src[e]);
}

bool IsIntegerType(::dali::DALIDataType t) {
  switch (t) {
    case DALI_UINT8: case DALI_UINT16: case DALI_UINT32:
    case DALI_UINT64: case DALI_INT8: case DALI_INT16:
    case DALI_INT32: case DALI_INT64:
      return true;
    default:
      return false;
  }
}

const float kIdentity[6] = {1, 0, 0, 0, 1, 0};

bool IsIdentity(const float *m) { return std::equal(m, m + 6, kIdentity); }

const char *kInputNames[] = {"logits", "class_ids", "crop_anchor", "crop_shape", "image_shape",
                             "mirror", "region"};

}  // namespace

LabelPoolingParams::LabelPoolingParams(const ::dali::OpSpec &spec) {
  num_classes_ = spec.GetArgument<int>("num_classes");
  DALI_ENFORCE(num_classes_ > 0, ::dali::make_string(
      "relabel.label_pooling: num_classes must be positive, got ", num_classes_));
  auto size = spec.GetRepeatedArgument<int>("output_size");
  DALI_ENFORCE(size.size() == 2 && size[0] > 0 && size[1] > 0,
               "relabel.label_pooling: output_size must be two positive integers (oh, ow)");
  out_h_ = size[0];
  out_w_ = size[1];
  temperature_ = spec.GetArgument<float>("temperature");
  DALI_ENFORCE(temperature_ > 0, "relabel.label_pooling: temperature must be positive");
  apply_softmax_ = spec.GetArgument<bool>("apply_softmax");
  auto layout = spec.GetArgument<std::string>("layout");
  DALI_ENFORCE(layout == "HW" || layout == "WH", ::dali::make_string(
      "relabel.label_pooling: layout must be \"HW\" or \"WH\", got \"", layout, "\""));
  transposed_ = layout == "WH";
  auto mode = spec.GetArgument<std::string>("region_mode");
  DALI_ENFORCE(mode == "inside" || mode == "outside", ::dali::make_string(
      "relabel.label_pooling: region_mode must be \"inside\" or \"outside\", got \"", mode, "\""));
  outside_ = mode == "outside";
  if (spec.HasTensorArgument("affine")) {
    affine_ = AffineSource::kPerSample;
  } else if (spec.HasArgument("affine")) {
    auto m = spec.GetRepeatedArgument<float>("affine");
    DALI_ENFORCE(m.size() == 6, ::dali::make_string(
        "relabel.label_pooling: affine must be a [2, 3] matrix (6 values, row-major), got ", m.size(),
        " values"));
    for (int e = 0; e < 6; e++) {
      DALI_ENFORCE(std::isfinite(m[e]), ::dali::make_string(
          "relabel.label_pooling: affine[", e / 3, "][", e % 3, "] is not finite (", m[e], ")"));
      constant_affine_[e] = m[e];
    }
    affine_ = AffineSource::kConstant;
  }
  if (spec.HasTensorArgument("canvas_checks")) {
    checks_ = AffineSource::kPerSample;
  } else if (spec.HasArgument("canvas_checks")) {
    auto c = spec.GetRepeatedArgument<float>("canvas_checks");
    DALI_ENFORCE(c.size() % 6 == 0, ::dali::make_string(
        "relabel.label_pooling: canvas_checks must be [m, 2, 3] matrices (6 values each, row-major), got ",
        c.size(), " values"));
    for (size_t e = 0; e < c.size(); e++) {
      DALI_ENFORCE(std::isfinite(c[e]), ::dali::make_string(
          "relabel.label_pooling: canvas_checks[", e / 6, "][", e % 6 / 3, "][", e % 3, "] is not finite (",
          c[e], ")"));
    }
    for (size_t e = 0; e < c.size(); e += 6) {
      if (!IsIdentity(c.data() + e))
        constant_checks_.insert(constant_checks_.end(), c.begin() + e, c.begin() + e + 6);
    }
    checks_ = AffineSource::kConstant;
  }
  auto image_size = spec.GetRepeatedArgument<int>("output_image_size");
  DALI_ENFORCE(image_size.size() == 2 && image_size[0] >= 0 && image_size[1] >= 0,
               "relabel.label_pooling: output_image_size must be two integers (h, w)");
  image_h_ = image_size[0];
  image_w_ = image_size[1];
  DALI_ENFORCE(!has_affine() || (image_h_ > 0 && image_w_ > 0),
               "relabel.label_pooling: affine needs output_image_size (h, w): the output image's size "
               "in pixels, the space the affine works in");
  DALI_ENFORCE(!has_checks() || (image_h_ > 0 && image_w_ > 0),
               "relabel.label_pooling: canvas_checks need output_image_size (h, w): the output image's "
               "size in pixels, the space the checks work in");
}

void LabelPoolingParams::ReadAffine(const ::dali::Workspace &ws, int i, float m[6]) const {
  if (affine_ == AffineSource::kConstant) {
    std::copy(constant_affine_, constant_affine_ + 6, m);
    return;
  }
  const auto &affine = ws.ArgumentInput("affine");
  DALI_ENFORCE(affine.type() == DALI_FLOAT, ::dali::make_string(
      "relabel.label_pooling: affine must be float32, got ", affine.type()));
  const auto shape = affine.tensor_shape(i);
  DALI_ENFORCE((shape == ::dali::TensorShape<>{2, 3}), ::dali::make_string(
      "relabel.label_pooling: sample ", i, ": affine must be a [2, 3] matrix, got shape ", shape));
  const float *values = affine.tensor<float>(i);
  for (int e = 0; e < 6; e++) {
    DALI_ENFORCE(std::isfinite(values[e]), ::dali::make_string(
        "relabel.label_pooling: sample ", i, ": affine[", e / 3, "][", e % 3, "] is not finite (",
        values[e], ")"));
    m[e] = values[e];
  }
}

int LabelPoolingParams::ReadChecks(const ::dali::Workspace &ws, int i, std::vector<float> &checks) const {
  if (checks_ == AffineSource::kConstant) {
    checks.insert(checks.end(), constant_checks_.begin(), constant_checks_.end());
    return static_cast<int>(constant_checks_.size() / 6);
  }
  const auto &input = ws.ArgumentInput("canvas_checks");
  DALI_ENFORCE(input.type() == DALI_FLOAT, ::dali::make_string(
      "relabel.label_pooling: canvas_checks must be float32, got ", input.type()));
  const auto shape = input.tensor_shape(i);
  DALI_ENFORCE(shape.sample_dim() == 3 && shape[1] == 2 && shape[2] == 3, ::dali::make_string(
      "relabel.label_pooling: sample ", i, ": canvas_checks must be [m, 2, 3] matrices, got shape ", shape));
  const float *values = input.tensor<float>(i);
  const int64_t m = shape[0];
  for (int64_t e = 0; e < 6 * m; e++) {
    DALI_ENFORCE(std::isfinite(values[e]), ::dali::make_string(
        "relabel.label_pooling: sample ", i, ": canvas_checks[", e / 6, "][", e % 6 / 3, "][", e % 3,
        "] is not finite (", values[e], ")"));
  }
  int count = 0;
  for (int64_t c = 0; c < m; c++) {
    if (IsIdentity(values + 6 * c)) continue;  // holds for every output point
    checks.insert(checks.end(), values + 6 * c, values + 6 * c + 6);
    count++;
  }
  return count;
}

void LabelPoolingParams::SetupWarp(PoolingSample &s, const float m[6], double cy, double cx, double ch,
                                   double cw, double image_h, double image_w, const double *region,
                                   int map_h, int map_w) const {
  WarpSampling &w = s.sampling;
  std::copy(m, m + 6, w.affine);
  const double width = image_w_, height = image_h_;
  w.width = static_cast<float>(width);
  w.height = static_cast<float>(height);
  // Map cells across the source image's width and height (the authors' layout transposes the map).
  const double cells_x = transposed_ ? map_h : map_w, cells_y = transposed_ ? map_w : map_h;
  w.kx = cw * cells_x / (width * image_w);
  w.bx = cx * cells_x / image_w - 0.5;
  w.ky = ch * cells_y / (height * image_h);
  w.by = cy * cells_y / image_h - 0.5;
  // The sampled rectangle: the whole output image, or an "inside" region of it.
  double x0 = 0, y0 = 0, span_x = width, span_y = height;
  w.exclude = 0;
  w.ex0 = w.ey0 = w.ex1 = w.ey1 = 0.f;
  if (region) {
    const double area = (region[2] - region[0]) * (region[3] - region[1]);
    if (area > 0 && !outside_) {
      x0 = region[1] * width;
      y0 = region[0] * height;
      span_x = (region[3] - region[1]) * width;
      span_y = (region[2] - region[0]) * height;
    } else if (area > 0 && area < 1) {
      w.exclude = 1;
      w.ex0 = static_cast<float>(region[1] * width);
      w.ex1 = static_cast<float>(region[3] * width);
      w.ey0 = static_cast<float>(region[0] * height);
      w.ey1 = static_cast<float>(region[2] * height);
    }
  }
  // As RoIAlign's ceil(roi / bins): enough points per cell that neighbours are at most one map cell
  // apart along each lattice axis (the length of an output step on the map grid is the norm of the
  // Jacobian's column). The 1e-6 keeps an exact integer from rounding up.
  auto points = [](double length, int bins) {
    const double n = std::ceil(length / bins - 1e-6);
    return static_cast<int>(std::min<double>(std::max<double>(n, 1.0), kMaxLattice));
  };
  w.nx = points(span_x * std::sqrt(w.kx * m[0] * (w.kx * m[0]) + w.ky * m[3] * (w.ky * m[3])), out_w_);
  w.ny = points(span_y * std::sqrt(w.kx * m[1] * (w.kx * m[1]) + w.ky * m[4] * (w.ky * m[4])), out_h_);
  w.origin_x = static_cast<float>(x0);
  w.origin_y = static_cast<float>(y0);
  w.step_x = static_cast<float>(span_x / (static_cast<double>(out_w_) * w.nx));
  w.step_y = static_cast<float>(span_y / (static_cast<double>(out_h_) * w.ny));
  s.warp = 1;
}

GridBox LabelPoolingParams::ToGrid(double y0d, double x0d, double y1d, double x1d, int map_h,
                                   int map_w) const {
  // Same float steps as the reference: fractions in double, rounded to float, then to the grid.
  const float y0 = static_cast<float>(y0d), x0 = static_cast<float>(x0d);
  const float y1 = static_cast<float>(y1d), x1 = static_cast<float>(x1d);
  const float rows = static_cast<float>(map_h), cols = static_cast<float>(map_w);
  if (!transposed_) return {y0 * rows - 0.5f, y1 * rows - 0.5f, x0 * cols - 0.5f, x1 * cols - 0.5f};
  // the authors' convention: map rows follow the image's x, columns its y
  return {x0 * rows - 0.5f, x1 * rows - 0.5f, y0 * cols - 0.5f, y1 * cols - 0.5f};
}

::dali::TensorListShape<> LabelPoolingParams::OutputShape(int num_samples) const {
  if (out_h_ == 1 && out_w_ == 1)
    return ::dali::uniform_list_shape(num_samples, ::dali::TensorShape<>{num_classes_});
  return ::dali::uniform_list_shape(num_samples,
                                    ::dali::TensorShape<>{num_classes_, out_h_, out_w_});
}

void LabelPoolingParams::Prepare(const ::dali::Workspace &ws, PoolingBatch &batch) const {
  const auto &logits = ws.Input<CPUBackend>(kLogits);
  const auto &ids = ws.Input<CPUBackend>(kClassIds);
  const int n = logits.num_samples();
  DALI_ENFORCE(logits.type() == DALI_FLOAT || logits.type() == DALI_FLOAT16,
               ::dali::make_string("relabel.label_pooling: logits must be float16 or float32, got ",
                                   logits.type()));
  DALI_ENFORCE(IsIntegerType(ids.type()) || ids.type() == DALI_FLOAT ||
               ids.type() == DALI_FLOAT16,
               ::dali::make_string("relabel.label_pooling: class_ids must be integers, got ",
                                   ids.type()));
  const bool has_mirror = ws.NumInput() > kMirror;
  const bool has_region = ws.NumInput() > kRegion;
  DALI_ENFORCE(!has_region || (out_h_ == 1 && out_w_ == 1),
               "relabel.label_pooling: a region needs output_size (1, 1)");
  for (int input = kClassIds; input < ws.NumInput(); input++) {
    DALI_ENFORCE(ws.Input<CPUBackend>(input).num_samples() == n, ::dali::make_string(
        "relabel.label_pooling: input '", kInputNames[input], "' has ",
        ws.Input<CPUBackend>(input).num_samples(), " samples, logits have ", n));
  }
  if (affine_ == AffineSource::kPerSample) {
    DALI_ENFORCE(ws.ArgumentInput("affine").num_samples() == n, ::dali::make_string(
        "relabel.label_pooling: argument 'affine' has ", ws.ArgumentInput("affine").num_samples(),
        " samples, logits have ", n));
  }
  if (checks_ == AffineSource::kPerSample) {
    DALI_ENFORCE(ws.ArgumentInput("canvas_checks").num_samples() == n, ::dali::make_string(
        "relabel.label_pooling: argument 'canvas_checks' has ", ws.ArgumentInput("canvas_checks").num_samples(),
        " samples, logits have ", n));
  }
  batch.samples.resize(n);
  batch.any_warp = false;
  batch.checks.clear();
  for (int i = 0; i < n; i++) {
    auto shape = logits.tensor_shape(i);
    DALI_ENFORCE(shape.sample_dim() == 3, ::dali::make_string(
        "relabel.label_pooling: sample ", i, ": logits must be [k, H, W], got shape ", shape));
    DALI_ENFORCE(ids.tensor_shape(i) == shape, ::dali::make_string(
        "relabel.label_pooling: sample ", i, ": class_ids shape ", ids.tensor_shape(i),
        " differs from logits shape ", shape));
    DALI_ENFORCE(shape[0] > 0 && shape[1] > 0 && shape[2] > 0, ::dali::make_string(
        "relabel.label_pooling: sample ", i, ": empty label map of shape ", shape));
    if (i == 0) {
      batch.k = shape[0];
      batch.map_h = shape[1];
      batch.map_w = shape[2];
      batch.entries_per_sample = shape[0] * shape[1] * shape[2];
    } else {
      DALI_ENFORCE(shape[0] == batch.k && shape[1] == batch.map_h && shape[2] == batch.map_w,
                   ::dali::make_string("relabel.label_pooling: sample ", i, ": map shape ", shape,
                                       " differs from sample 0's [", batch.k, ", ", batch.map_h,
                                       ", ", batch.map_w, "]"));
    }
    double box[2][2];  // [start|size][y|x]
    for (int input = kCropAnchor; input <= kCropShape; input++) {
      const auto &t = ws.Input<CPUBackend>(input);
      DALI_ENFORCE(::dali::volume(t.tensor_shape(i)) == 2, ::dali::make_string(
          "relabel.label_pooling: sample ", i, ": ", kInputNames[input],
          " must hold 2 values (y, x), got shape ", t.tensor_shape(i)));
      for (int d = 0; d < 2; d++) box[input - kCropAnchor][d] = ReadNumber(t, i, d, kInputNames[input]);
    }
    const auto &image_shape = ws.Input<CPUBackend>(kImageShape);
    DALI_ENFORCE(::dali::volume(image_shape.tensor_shape(i)) >= 2, ::dali::make_string(
        "relabel.label_pooling: sample ", i, ": image_shape must hold (H, W[, C]), got shape ",
        image_shape.tensor_shape(i)));
    const double image_h = ReadNumber(image_shape, i, 0, "image_shape");
    const double image_w = ReadNumber(image_shape, i, 1, "image_shape");
    DALI_ENFORCE(image_h > 0 && image_w > 0 && box[1][0] > 0 && box[1][1] > 0, ::dali::make_string(
        "relabel.label_pooling: sample ", i, ": image shape (", image_h, ", ", image_w,
        ") and crop shape (", box[1][0], ", ", box[1][1], ") must be positive"));
    PoolingSample &s = batch.samples[i];
    s.flip = 0;
    if (has_mirror) {
      const auto &mirror = ws.Input<CPUBackend>(kMirror);
      DALI_ENFORCE(::dali::volume(mirror.tensor_shape(i)) == 1, ::dali::make_string(
          "relabel.label_pooling: sample ", i, ": mirror must be a scalar, got shape ",
          mirror.tensor_shape(i)));
      s.flip = ReadNumber(mirror, i, 0, "mirror") != 0;
    }
    const double cy = box[0][0], cx = box[0][1], ch = box[1][0], cw = box[1][1];
    s.box = ToGrid(cy / image_h, cx / image_w, (cy + ch) / image_h, (cx + cw) / image_w,
                   batch.map_h, batch.map_w);
    s.outside = 0;
    s.region_fraction = 0.f;
    s.region = s.box;
    s.warp = 0;
    s.sampling = WarpSampling{};
    double r[4];
    if (has_region) {
      const auto &region = ws.Input<CPUBackend>(kRegion);
      DALI_ENFORCE(::dali::volume(region.tensor_shape(i)) == 4, ::dali::make_string(
          "relabel.label_pooling: sample ", i, ": region must hold (y0, x0, y1, x1), got shape ",
          region.tensor_shape(i)));
      for (int d = 0; d < 4; d++) r[d] = ReadNumber(region, i, d, "region");
      DALI_ENFORCE(0 <= r[0] && r[0] <= r[2] && r[2] <= 1 && 0 <= r[1] && r[1] <= r[3] && r[3] <= 1,
                   ::dali::make_string("relabel.label_pooling: sample ", i, ": region (", r[0], ", ",
                                       r[1], ", ", r[2], ", ", r[3],
                                       ") must satisfy 0 <= y0 <= y1 <= 1 and 0 <= x0 <= x1 <= 1"));
      // The region is given in the output image, which is the crop, mirrored where flipped.
      const double rx0 = s.flip ? 1 - r[3] : r[1], rx1 = s.flip ? 1 - r[1] : r[3];
      const double area = (r[2] - r[0]) * (r[3] - r[1]);
      if (area > 0) {
        GridBox region_box = ToGrid((cy + r[0] * ch) / image_h, (cx + rx0 * cw) / image_w,
                                    (cy + r[2] * ch) / image_h, (cx + rx1 * cw) / image_w,
                                    batch.map_h, batch.map_w);
        if (!outside_) {
          s.box = region_box;
        } else if (area < 1) {
          s.outside = 1;
          s.region = region_box;
          s.region_fraction = static_cast<float>(area);
        }
      }
    }
    float m[6] = {1, 0, 0, 0, 1, 0};
    if (has_affine()) ReadAffine(ws, i, m);
    const int64_t check_offset = static_cast<int64_t>(batch.checks.size());
    const int num_checks = has_checks() ? ReadChecks(ws, i, batch.checks) : 0;
    if (!IsIdentity(m) || num_checks > 0) {
      SetupWarp(s, m, cy, cx, ch, cw, image_h, image_w, has_region ? r : nullptr, batch.map_h,
                batch.map_w);
      s.sampling.num_checks = num_checks;
      s.sampling.check_offset = check_offset;
      batch.any_warp = true;
    }
    s.out = nullptr;
    s.in_offset = static_cast<int64_t>(i) * batch.entries_per_sample;
  }
  // Host addresses once every check is in (the GPU backend points them at its upload instead).
  for (PoolingSample &s : batch.samples)
    s.sampling.checks = s.sampling.num_checks > 0 ? batch.checks.data() + s.sampling.check_offset : nullptr;
}

void LabelPoolingParams::ReadValues(const ::dali::Workspace &ws, int i, int64_t entries,
                                    float *logits_out, int32_t *ids_out) const {
  const auto &logits = ws.Input<CPUBackend>(kLogits);
  const auto &ids = ws.Input<CPUBackend>(kClassIds);
  if (logits.type() == DALI_FLOAT) {
    const float *src = logits.tensor<float>(i);
    std::copy(src, src + entries, logits_out);
  } else {
    HalfToFloat(logits.tensor<::dali::float16>(i), entries, logits_out);
  }
  const auto shape = logits.tensor_shape(i);
  auto where = [&](int64_t e) {
    const int64_t cells = shape[1] * shape[2];
    return ::dali::make_string("[k=", e / cells, ", y=", (e % cells) / shape[2], ", x=", e % shape[2], "]");
  };
  bool finite = true;
  for (int64_t e = 0; e < entries; e++) finite &= std::isfinite(logits_out[e]);
  if (!finite) {
    for (int64_t e = 0; e < entries; e++) {
      if (!std::isfinite(logits_out[e]))
        DALI_FAIL("relabel.label_pooling: sample ", i, ": logit at ", where(e), " is not finite (",
                  logits_out[e], ")");
    }
  }
  int64_t bad = -1;
  auto convert = [&](const auto *src) {
    for (int64_t e = 0; e < entries; e++) {
      const auto id = src[e];
      ids_out[e] = static_cast<int32_t>(id);
      if (!(id >= 0 && id < num_classes_ && static_cast<decltype(id)>(ids_out[e]) == id)) bad = e;
    }
  };
  const void *raw = ids.raw_tensor(i);
  switch (ids.type()) {
    case DALI_UINT8: convert(static_cast<const uint8_t *>(raw)); break;
    case DALI_UINT16: convert(static_cast<const uint16_t *>(raw)); break;
    case DALI_INT16: convert(static_cast<const int16_t *>(raw)); break;
    case DALI_INT32: convert(static_cast<const int32_t *>(raw)); break;
    case DALI_FLOAT: convert(static_cast<const float *>(raw)); break;
    default:  // the rare types go through the generic reader
      for (int64_t e = 0; e < entries; e++) {
        const double id = ReadNumber(ids, i, e, "class_ids");
        ids_out[e] = static_cast<int32_t>(id);
        if (!(id >= 0 && id < num_classes_ && id == std::floor(id))) bad = e;
      }
  }
  if (bad >= 0)
    DALI_FAIL("relabel.label_pooling: sample ", i, ": class id ", ReadNumber(ids, i, bad, "class_ids"),
              " at ", where(bad), " is outside [0, ", num_classes_, ")");
}

}  // namespace dali_relabel

DALI_SCHEMA(relabel__LabelPooling)
    .DocStr(R"(ReLabel LabelPooling: the soft target of a crop from a top-k label map.

Computes ``softmax(RoIAlign(dense_map, crop_box) / temperature)`` without building the dense
``[num_classes, H, W]`` map, where ``dense_map`` holds each cell's top-k ``logits`` at their
``class_ids`` and 0 elsewhere, and RoIAlign follows ``torchvision.ops.roi_align(aligned=False,
sampling_ratio=-1)`` with the box scaled to the grid and shifted by -0.5 (the ReLabel reference).

The crop box is ``crop_anchor / image_shape`` to ``(crop_anchor + crop_shape) / image_shape``, all in
(y, x) order as produced by ``peek_image_shape`` and ``random_crop_generator``. Output: float32
``[num_classes]`` for a 1x1 ``output_size``, else ``[num_classes, oh, ow]`` (mirrored left-right where
``mirror`` is set). With ``affine`` (geometric ops after the crop, resize and flip), each output cell
is pooled over what it shows: the map sampled at the inverse-mapped positions of a lattice of output
points, points that show fill left out (see ``affine``); with ``canvas_checks`` also the points that an
earlier geometric op of a chain pushed off the canvas. Every input is read on the host; the GPU
backend uploads the batch and pools it in one kernel.)")
    .NumInput(5, 7)
    .NumOutput(1)
    .InputDevice(0, 7, ::dali::InputDevice::CPU)
    .InputDox(0, "logits", "TensorList of float16 or float32 [k, H, W]", "Top-k logits per map cell.")
    .InputDox(1, "class_ids", "TensorList of integers [k, H, W]", "Class of each logit, in [0, num_classes).")
    .InputDox(2, "crop_anchor", "TensorList [2]", "Crop start (y, x) in pixels.")
    .InputDox(3, "crop_shape", "TensorList [2]", "Crop size (h, w) in pixels.")
    .InputDox(4, "image_shape", "TensorList [2] or [3]", "Image shape (H, W[, C]) in pixels.")
    .InputDox(5, "mirror", "TensorList of scalars, optional", "Non-zero where the crop is flipped left-right.")
    .InputDox(6, "region", "TensorList [4], optional", R"(A box (y0, x0, y1, x1) in fractions of the
output image (the crop after mirroring). With region_mode="inside" the target is pooled over this
region only (what a CutMix patch carries); with "outside" over the crop minus the region, as
(P(crop) - f P(region)) / (1 - f) before the softmax, f the region's share of the crop. An empty region
changes nothing. Needs output_size (1, 1).)")
    .AddArg("num_classes", "Number of classes C.", DALI_INT32)
    .AddOptionalArg("output_size", "Output grid (oh, ow); (1, 1) gives [C] targets.",
                    std::vector<int>{1, 1})
    .AddOptionalArg("temperature", "Softmax temperature.", 1.0f)
    .AddOptionalArg("apply_softmax", "Return probabilities (true) or pooled logits / temperature.", true)
    .AddOptionalArg("layout", R"(How boxes meet the map: "HW" pools map rows along the image's height
(geometric); "WH" pools the transposed box, as the ReLabel authors' loader does.)", std::string("HW"))
    .AddOptionalArg("region_mode", R"("inside" or "outside": how the optional region input is used.)",
                    std::string("inside"))
    .AddOptionalArg("affine", R"(Per sample, float32 ``[2, 3]``: the geometric ops that ran after the
crop, resize and flip, as the map from an output image pixel position ``(x, y)`` to the position
``affine @ (x, y, 1)`` in the resized, flipped crop (both ``output_image_size``, pixel ``i`` covering
``[i, i + 1)``, so pixel centres at ``i + 0.5``). A sample whose affine is the identity is pooled as
without it (RoIAlign, bit for bit). Any other is pooled over what the output shows: each output cell
(the whole image for a 1x1 ``output_size``) is sampled at an ``nx x ny`` lattice of points (the
centres of an ``nx x ny`` subdivision of the cell, ``n = ceil(length on the map grid / cells)`` per
axis as RoIAlign's sampling ratio, at most 64); each point is mapped by the affine, unflipped, scaled
into the crop window and read from the map with RoIAlign's bilinear rule. Points that land outside
the crop window (fill) are left out of the average; a cell showing only fill gets logits 0, i.e. the
uniform distribution. With a region, "inside" samples the region's rectangle of the output image and
"outside" leaves its points out. A constant (6 values, row-major) applies to every sample. With
several geometric ops the affine is their composition; pass ``canvas_checks`` to leave out the content
an earlier op moved off the canvas.)",
                    std::vector<float>{}, true)
    .AddOptionalArg("canvas_checks", R"(Per sample, float32 ``[m, 2, 3]`` (``m >= 0``): makes the
pooling exact for a chain of geometric ops. With ops ``1..n`` applied in order (op ``i``'s matrix
``A_i`` maps its output pixel to its input pixel; ``affine`` is ``A_1 ... A_n``, possibly after a
whole-canvas flip), an output point ``q`` shows content only if every intermediate point
``A_k ... A_n q`` lies on the canvas ``[0, w] x [0, h]`` (``output_image_size``): content an earlier
op moved off the canvas shows fill after the later ones although ``affine`` maps it inside. Pass
those partial products for ``k = 2..n`` (``affine`` checks ``k = 1``), the identity where op ``k - 1``
moved no pixel (its point is one already checked): a lattice point that any check maps outside the
canvas is left out like fill, decided with the same exact double arithmetic as ``affine``'s, so
identically on every backend. Identity checks are skipped, so a chain with at most one geometric op
pools bit for bit as its affine alone; a sample with a non-identity check takes the warp path even
with an identity ``affine``. A constant (a multiple of 6 values) applies to every sample.)",
                    std::vector<float>{}, true)
    .AddOptionalArg("output_image_size", R"((h, w) of the output image in pixels: the space ``affine``
and ``canvas_checks`` work in. Needed with either.)", std::vector<int>{0, 0});
