// relabel.select_regions: which of a region store's R stored crops each sample uses in an epoch,
// keyed by (seed, epoch, row), with their whole-pixel windows, flips and top-k labels (CPU).
//
// The twin of dali_relabel/store/region_targets.py: stored crop j of a sample gets the float64
// uniform SampleUniform(key, REGION_STREAM = 96, j); the `count` crops with the smallest uniforms are
// taken, in increasing order of their uniforms (ties by crop index: a stable sort), as
// select_regions does; each box (x0, y0, w, h) becomes the window pixel_windows gives it: corners
// rounded half to even, clipped to the image, at least one pixel.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "crop_window.h"
#include "dali/pipeline/operator/checkpointing/stateless_operator.h"

namespace dali_relabel {

using ::dali::CPUBackend;

// Defined in crop_window.cc: the keys of every sample from its (row, epoch) inputs.
void SampleKeys(const ::dali::Workspace &ws, int row_input, int64_t seed, const char *op,
                std::vector<uint64_t> &keys);

namespace {

constexpr const char *kOp = "relabel.select_regions";
constexpr uint64_t kRegionStream = 96;  // REGION_STREAM of dali_relabel/store/region_targets.py

int64_t ShapeValue(const ::dali::TensorList<CPUBackend> &shapes, int sample, int idx) {
  const void *p = shapes.raw_tensor(sample);
  switch (shapes.type()) {
    case DALI_INT32: return static_cast<const int32_t *>(p)[idx];
    case DALI_INT64: return static_cast<const int64_t *>(p)[idx];
    case DALI_UINT32: return static_cast<const uint32_t *>(p)[idx];
    case DALI_UINT64: return static_cast<int64_t>(static_cast<const uint64_t *>(p)[idx]);
    default: DALI_FAIL(kOp, ": image_shape must hold integers, got type ", shapes.type());
  }
}

// The sample's row, for messages (SampleKeys has checked it is an integer scalar).
int64_t RowOf(const ::dali::TensorList<CPUBackend> &rows, int sample) {
  switch (rows.type()) {
    case DALI_INT32: return *rows.tensor<int32_t>(sample);
    case DALI_INT64: return *rows.tensor<int64_t>(sample);
    default: return -1;
  }
}

int64_t Clip(double value, int64_t lo, int64_t hi) {
  // np.clip(value, lo, hi): min(max(value, lo), hi); value is already a whole number
  const double clipped = std::min(std::max(value, static_cast<double>(lo)), static_cast<double>(hi));
  return static_cast<int64_t>(clipped);
}

}  // namespace

// The `count` stored crops of `regions` for `key`, in the order select_regions gives them.
void SelectRegions(uint64_t key, int64_t regions, int64_t count, std::vector<double> &uniforms,
                   std::vector<int64_t> &order) {
  uniforms.resize(regions);
  order.resize(regions);
  for (int64_t j = 0; j < regions; j++) uniforms[j] = SampleUniform(key, kRegionStream, j);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&uniforms](int64_t a, int64_t b) { return uniforms[a] < uniforms[b]; });
  order.resize(count);
}

class SelectRegionsOp : public ::dali::StatelessOperator<CPUBackend> {
 public:
  explicit SelectRegionsOp(const ::dali::OpSpec &spec) : ::dali::StatelessOperator<CPUBackend>(spec) {
    seed_ = spec.GetArgument<int64_t>("seed");
    count_ = spec.GetArgument<int>("count");
    DALI_ENFORCE(count_ >= 1, "relabel.select_regions: count must be at least 1");
  }

 protected:
  // Inputs: 0 boxes (float32, R x 4), 1 flips (uint8, R), 2 ids (int32, R x k), 3 values (float32,
  // R x k), 4 image_shape, 5 row, 6 epoch. Any shape of the right volume is read flat.
  bool SetupImpl(std::vector<::dali::OutputDesc> &output_desc, const ::dali::Workspace &ws) override {
    SampleKeys(ws, 5, seed_, kOp, keys_);
    const auto &boxes = ws.Input<CPUBackend>(0), &flips = ws.Input<CPUBackend>(1);
    const auto &ids = ws.Input<CPUBackend>(2), &values = ws.Input<CPUBackend>(3);
    const auto &shapes = ws.Input<CPUBackend>(4), &rows = ws.Input<CPUBackend>(5);
    DALI_ENFORCE(boxes.type() == DALI_FLOAT && flips.type() == DALI_UINT8 && ids.type() == DALI_INT32 &&
                 values.type() == DALI_FLOAT, ::dali::make_string(
                     kOp, ": boxes, flips, ids, values must be float32, uint8, int32, float32; got ",
                     boxes.type(), ", ", flips.type(), ", ", ids.type(), ", ", values.type()));
    const int n = static_cast<int>(keys_.size());
    regions_.resize(n);
    topk_ = -1;
    for (int i = 0; i < n; i++) {
      const int64_t r = ::dali::volume(flips.tensor_shape(i));
      const int64_t row = RowOf(rows, i);
      DALI_ENFORCE(::dali::volume(shapes.tensor_shape(i)) >= 2, ::dali::make_string(
          kOp, ": row ", row, ": image_shape must hold (H, W[, C]), got shape ", shapes.tensor_shape(i)));
      DALI_ENFORCE(r >= count_, ::dali::make_string(
          kOp, ": row ", row, " has ", r, " stored crops, fewer than the ", count_, " asked per image"));
      DALI_ENFORCE(::dali::volume(boxes.tensor_shape(i)) == 4 * r, ::dali::make_string(
          kOp, ": row ", row, ": ", ::dali::volume(boxes.tensor_shape(i)), " box values for ", r, " stored crops"));
      const int64_t labels = ::dali::volume(ids.tensor_shape(i));
      DALI_ENFORCE(labels % r == 0 && ::dali::volume(values.tensor_shape(i)) == labels, ::dali::make_string(
          kOp, ": row ", row, ": ", labels, " ids and ", ::dali::volume(values.tensor_shape(i)),
          " values for ", r, " stored crops"));
      DALI_ENFORCE(topk_ < 0 || topk_ == labels / r, ::dali::make_string(
          kOp, ": row ", row, " stores top-", labels / r, " labels, other samples top-", topk_));
      topk_ = labels / r;
      regions_[i] = r;
    }
    const int64_t k = topk_ < 0 ? 0 : topk_;
    output_desc.resize(5);
    output_desc[0] = {::dali::uniform_list_shape(n, ::dali::TensorShape<>{count_, 4}), DALI_INT32};
    output_desc[1] = {::dali::uniform_list_shape(n, ::dali::TensorShape<>{count_}), DALI_INT32};
    output_desc[2] = {::dali::uniform_list_shape(n, ::dali::TensorShape<>{count_, k}), DALI_INT32};
    output_desc[3] = {::dali::uniform_list_shape(n, ::dali::TensorShape<>{count_, k}), DALI_FLOAT};
    output_desc[4] = {::dali::uniform_list_shape(n, ::dali::TensorShape<>{count_}), DALI_INT64};
    return true;
  }

  void RunImpl(::dali::Workspace &ws) override {
    const auto &boxes = ws.Input<CPUBackend>(0), &flips = ws.Input<CPUBackend>(1);
    const auto &ids = ws.Input<CPUBackend>(2), &values = ws.Input<CPUBackend>(3);
    const auto &shapes = ws.Input<CPUBackend>(4);
    auto &windows = ws.Output<CPUBackend>(0), &mirrors = ws.Output<CPUBackend>(1);
    auto &out_ids = ws.Output<CPUBackend>(2), &out_values = ws.Output<CPUBackend>(3);
    auto &indices = ws.Output<CPUBackend>(4);
    const int64_t k = topk_ < 0 ? 0 : topk_;
    for (int i = 0; i < static_cast<int>(keys_.size()); i++) {  // R draws and one sort per sample
      const int64_t height = ShapeValue(shapes, i, 0), width = ShapeValue(shapes, i, 1);
      DALI_ENFORCE(height > 0 && width > 0, ::dali::make_string(
          kOp, ": sample ", i, ": image shape (", height, ", ", width, ") must be positive"));
      SelectRegions(keys_[i], regions_[i], count_, uniforms_, order_);
      const float *box = boxes.tensor<float>(i);
      const uint8_t *flip = flips.tensor<uint8_t>(i);
      const int32_t *id = ids.tensor<int32_t>(i);
      const float *value = values.tensor<float>(i);
      int32_t *window = windows.mutable_tensor<int32_t>(i);
      int32_t *mirror = mirrors.mutable_tensor<int32_t>(i);
      int32_t *id_out = out_ids.mutable_tensor<int32_t>(i);
      float *value_out = out_values.mutable_tensor<float>(i);
      int64_t *index = indices.mutable_tensor<int64_t>(i);
      for (int64_t c = 0; c < count_; c++) {
        const int64_t j = order_[c];
        const double bx = box[4 * j], by = box[4 * j + 1], bw = box[4 * j + 2], bh = box[4 * j + 3];
        // pixel_windows: nearbyint rounds half to even (the default rounding mode), as np.rint
        const int64_t x0 = Clip(std::nearbyint(bx), 0, width - 1), y0 = Clip(std::nearbyint(by), 0, height - 1);
        const int64_t x1 = Clip(std::nearbyint(bx + bw), x0 + 1, width);
        const int64_t y1 = Clip(std::nearbyint(by + bh), y0 + 1, height);
        window[4 * c] = static_cast<int32_t>(y0);
        window[4 * c + 1] = static_cast<int32_t>(x0);
        window[4 * c + 2] = static_cast<int32_t>(y1 - y0);
        window[4 * c + 3] = static_cast<int32_t>(x1 - x0);
        mirror[c] = flip[j];
        std::copy(id + j * k, id + (j + 1) * k, id_out + c * k);
        std::copy(value + j * k, value + (j + 1) * k, value_out + c * k);
        index[c] = j;
      }
    }
  }

 private:
  int64_t seed_;
  int count_;
  int64_t topk_ = -1;
  std::vector<uint64_t> keys_;
  std::vector<int64_t> regions_, order_;
  std::vector<double> uniforms_;
};

}  // namespace dali_relabel

DALI_REGISTER_OPERATOR(relabel__SelectRegions, ::dali_relabel::SelectRegionsOp, ::dali::CPU);

DALI_SCHEMA(relabel__SelectRegions)
    .DocStr(R"(The ``count`` stored crops of a region store's sample (of its R) used in an epoch, keyed
by (seed, epoch, row) exactly as ``dali_relabel.store.select_regions``: stored crop j gets the float64
uniform of stream 96 index j of the sample's key, and the ``count`` with the smallest uniforms are
taken in increasing order (ties by index). Outputs, per chosen crop: ``window`` int32 [count, 4]
(y0, x0, h, w: the box's corners rounded half to even, clipped to the image of ``image_shape``, at
least one pixel, as ``pixel_windows``), ``flip`` int32 [count], ``ids`` int32 [count, k], ``values``
float32 [count, k] (the stored top-k labels of the chosen crops) and ``indices`` int64 [count].)")
    .NumInput(7)
    .NumOutput(5)
    .InputDox(0, "boxes", "TensorList float32 of 4 R values", "Every stored crop's box (x0, y0, w, h) in pixels.")
    .InputDox(1, "flips", "TensorList uint8 of R values", "Every stored crop's flip (0/1).")
    .InputDox(2, "ids", "TensorList int32 of R k values", "Every stored crop's top-k class ids.")
    .InputDox(3, "values", "TensorList float32 of R k values", "Every stored crop's top-k values.")
    .InputDox(4, "image_shape", "TensorList [2] or [3] of integers", "Image shape (H, W[, C]).")
    .InputDox(5, "row", "TensorList of integer scalars", "The sample's row.")
    .InputDox(6, "epoch", "TensorList of integer scalars", "The epoch (or key epoch) the sample is read in.")
    .AddOptionalArg("seed", "Base seed of the keys.", static_cast<int64_t>(0))
    .AddArg("count", "Stored crops chosen per sample.", DALI_INT32);
