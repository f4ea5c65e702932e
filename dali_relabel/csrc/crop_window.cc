// relabel.random_crop_window: keyed random-resized-crop windows and flips (CPU).
#include <string>
#include <vector>

#include "crop_window.h"
#include "dali/pipeline/operator/operator.h"

namespace dali_relabel {

using ::dali::CPUBackend;

namespace {

int64_t ReadInteger(const ::dali::TensorList<CPUBackend> &input, int sample, int64_t idx,
                    const char *name) {
  const void *p = input.raw_tensor(sample);
  switch (input.type()) {
    case DALI_UINT8: return static_cast<const uint8_t *>(p)[idx];
    case DALI_UINT16: return static_cast<const uint16_t *>(p)[idx];
    case DALI_UINT32: return static_cast<const uint32_t *>(p)[idx];
    case DALI_UINT64: return static_cast<int64_t>(static_cast<const uint64_t *>(p)[idx]);
    case DALI_INT16: return static_cast<const int16_t *>(p)[idx];
    case DALI_INT32: return static_cast<const int32_t *>(p)[idx];
    case DALI_INT64: return static_cast<const int64_t *>(p)[idx];
    default:
      DALI_FAIL("relabel.random_crop_window: input '", name, "' must hold integers, got type ",
                input.type());
  }
}

}  // namespace

class RandomCropWindowOp : public ::dali::Operator<CPUBackend> {
 public:
  explicit RandomCropWindowOp(const ::dali::OpSpec &spec) : ::dali::Operator<CPUBackend>(spec) {
    auto area = spec.GetRepeatedArgument<float>("random_area");
    auto ratio = spec.GetRepeatedArgument<float>("random_aspect_ratio");
    DALI_ENFORCE(area.size() == 2 && 0 < area[0] && area[0] <= area[1] && area[1] <= 1,
                 "relabel.random_crop_window: random_area must be (lo, hi) with 0 < lo <= hi <= 1");
    DALI_ENFORCE(ratio.size() == 2 && 0 < ratio[0] && ratio[0] <= ratio[1],
                 "relabel.random_crop_window: random_aspect_ratio must be (lo, hi) with 0 < lo <= hi");
    params_.area_lo = area[0];
    params_.area_hi = area[1];
    params_.ratio_lo = ratio[0];
    params_.ratio_hi = ratio[1];
    params_.attempts = spec.GetArgument<int>("num_attempts");
    DALI_ENFORCE(params_.attempts >= 0, "relabel.random_crop_window: num_attempts must be >= 0");
    params_.flip_probability = spec.GetArgument<float>("flip_probability");
    DALI_ENFORCE(0 <= params_.flip_probability && params_.flip_probability <= 1,
                 "relabel.random_crop_window: flip_probability must lie in [0, 1]");
  }

 protected:
  bool SetupImpl(std::vector<::dali::OutputDesc> &output_desc, const ::dali::Workspace &ws) override {
    const auto &shapes = ws.Input<CPUBackend>(0);
    const auto &keys = ws.Input<CPUBackend>(1);
    const int n = shapes.num_samples();
    DALI_ENFORCE(keys.num_samples() == n, ::dali::make_string(
        "relabel.random_crop_window: ", keys.num_samples(), " keys for ", n, " image shapes"));
    DALI_ENFORCE(keys.type() == DALI_INT64 || keys.type() == DALI_UINT64, ::dali::make_string(
        "relabel.random_crop_window: keys must be 64-bit integers, got ", keys.type()));
    for (int i = 0; i < n; i++) {
      DALI_ENFORCE(::dali::volume(shapes.tensor_shape(i)) >= 2, ::dali::make_string(
          "relabel.random_crop_window: sample ", i, ": image_shape must hold (H, W[, C]), got shape ",
          shapes.tensor_shape(i)));
      DALI_ENFORCE(::dali::volume(keys.tensor_shape(i)) == 1, ::dali::make_string(
          "relabel.random_crop_window: sample ", i, ": key must be a scalar, got shape ",
          keys.tensor_shape(i)));
    }
    output_desc.resize(3);
    output_desc[0] = {::dali::uniform_list_shape(n, ::dali::TensorShape<>{2}), DALI_INT32};
    output_desc[1] = {::dali::uniform_list_shape(n, ::dali::TensorShape<>{2}), DALI_INT32};
    output_desc[2] = {::dali::uniform_list_shape(n, ::dali::TensorShape<>{}), DALI_INT32};
    return true;
  }

  void RunImpl(::dali::Workspace &ws) override {
    const auto &shapes = ws.Input<CPUBackend>(0);
    const auto &keys = ws.Input<CPUBackend>(1);
    auto &anchors = ws.Output<CPUBackend>(0);
    auto &sizes = ws.Output<CPUBackend>(1);
    auto &mirrors = ws.Output<CPUBackend>(2);
    for (int i = 0; i < shapes.num_samples(); i++) {  // a few arithmetic operations per sample
      const int64_t height = ReadInteger(shapes, i, 0, "image_shape");
      const int64_t width = ReadInteger(shapes, i, 1, "image_shape");
      DALI_ENFORCE(height > 0 && width > 0, ::dali::make_string(
          "relabel.random_crop_window: sample ", i, ": image shape (", height, ", ", width,
          ") must be positive"));
      const auto key = *static_cast<const uint64_t *>(keys.raw_tensor(i));
      const CropWindow window = DrawCropWindow(height, width, key, params_);
      int32_t *anchor = anchors.mutable_tensor<int32_t>(i);
      int32_t *size = sizes.mutable_tensor<int32_t>(i);
      anchor[0] = static_cast<int32_t>(window.y);
      anchor[1] = static_cast<int32_t>(window.x);
      size[0] = static_cast<int32_t>(window.h);
      size[1] = static_cast<int32_t>(window.w);
      *mirrors.mutable_tensor<int32_t>(i) = window.mirror;
    }
  }

 private:
  CropParams params_;
};

}  // namespace dali_relabel

DALI_REGISTER_OPERATOR(relabel__RandomCropWindow, ::dali_relabel::RandomCropWindowOp, ::dali::CPU);

DALI_SCHEMA(relabel__RandomCropWindow)
    .DocStr(R"(Random-resized-crop windows and horizontal flips drawn from a per-sample key.

Follows torchvision's ``RandomResizedCrop.get_params``: up to ``num_attempts`` draws of an area
fraction (uniform in ``random_area``) and an aspect ratio w/h (log-uniform in
``random_aspect_ratio``), accepted when the window fits; otherwise the largest centred window whose
aspect ratio lies in the range. Every draw of a sample comes from a SplitMix64 stream started at its
``key``, so the same key always gives the same window and flip, whatever the batch, thread, rank or
resume point. Outputs: ``anchor`` (y, x) and ``shape`` (h, w) as int32 (the order
``decoders.image_slice(axis_names="HW")`` and ``relabel.label_pooling`` take), and ``mirror`` (int32
0/1).)")
    .NumInput(2)
    .NumOutput(3)
    .InputDox(0, "image_shape", "TensorList [2] or [3] of integers",
              "Image shape (H, W[, C]), e.g. from peek_image_shape.")
    .InputDox(1, "key", "TensorList of int64/uint64 scalars", "The sample's random key.")
    .AddOptionalArg("random_area", "Range of the window's share of the image area.",
                    std::vector<float>{0.08f, 1.0f})
    .AddOptionalArg("random_aspect_ratio", "Range of the window's aspect ratio w/h (log-uniform).",
                    std::vector<float>{3.0f / 4.0f, 4.0f / 3.0f})
    .AddOptionalArg("num_attempts", "Draws before the centred fallback window.", 10)
    .AddOptionalArg("flip_probability", "Probability that mirror is 1.", 0.5f);
