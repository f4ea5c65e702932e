// relabel.random_crop_window, relabel.sample_draws and relabel.keyed_uniforms: every per-sample
// random choice of the training graph, keyed by (seed, epoch, row) (CPU).
#include <string>
#include <vector>

#include "crop_window.h"
#include "dali/pipeline/operator/checkpointing/stateless_operator.h"

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

// Reads (row, epoch) of every sample and checks the inputs; the keys go to `keys`.
void SampleKeys(const ::dali::Workspace &ws, int row_input, int64_t seed, const char *op,
                std::vector<uint64_t> &keys) {
  const auto &rows = ws.Input<CPUBackend>(row_input);
  const auto &epochs = ws.Input<CPUBackend>(row_input + 1);
  const int n = rows.num_samples();
  DALI_ENFORCE(epochs.num_samples() == n, ::dali::make_string(
      op, ": ", epochs.num_samples(), " epochs for ", n, " rows"));
  keys.resize(n);
  for (int i = 0; i < n; i++) {
    DALI_ENFORCE(::dali::volume(rows.tensor_shape(i)) == 1 && ::dali::volume(epochs.tensor_shape(i)) == 1,
                 ::dali::make_string(op, ": sample ", i, ": row and epoch must be scalars, got shapes ",
                                     rows.tensor_shape(i), " and ", epochs.tensor_shape(i)));
    const int64_t row = ReadInteger(rows, i, 0, "row"), epoch = ReadInteger(epochs, i, 0, "epoch");
    DALI_ENFORCE(row >= 0 && epoch >= 0, ::dali::make_string(
        op, ": sample ", i, ": row ", row, " and epoch ", epoch, " must not be negative"));
    keys[i] = SampleKey(static_cast<uint64_t>(seed), static_cast<uint64_t>(epoch), static_cast<uint64_t>(row));
  }
}

class RandomCropWindowOp : public ::dali::StatelessOperator<CPUBackend> {
 public:
  explicit RandomCropWindowOp(const ::dali::OpSpec &spec) : ::dali::StatelessOperator<CPUBackend>(spec) {
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
    seed_ = spec.GetArgument<int64_t>("seed");
  }

 protected:
  bool SetupImpl(std::vector<::dali::OutputDesc> &output_desc, const ::dali::Workspace &ws) override {
    const auto &shapes = ws.Input<CPUBackend>(0);
    const int n = shapes.num_samples();
    SampleKeys(ws, 1, seed_, "relabel.random_crop_window", keys_);
    for (int i = 0; i < n; i++) {
      DALI_ENFORCE(::dali::volume(shapes.tensor_shape(i)) >= 2, ::dali::make_string(
          "relabel.random_crop_window: sample ", i, ": image_shape must hold (H, W[, C]), got shape ",
          shapes.tensor_shape(i)));
    }
    output_desc.resize(3);
    output_desc[0] = {::dali::uniform_list_shape(n, ::dali::TensorShape<>{2}), DALI_INT32};
    output_desc[1] = {::dali::uniform_list_shape(n, ::dali::TensorShape<>{2}), DALI_INT32};
    output_desc[2] = {::dali::uniform_list_shape(n, ::dali::TensorShape<>{}), DALI_INT32};
    return true;
  }

  void RunImpl(::dali::Workspace &ws) override {
    const auto &shapes = ws.Input<CPUBackend>(0);
    auto &anchors = ws.Output<CPUBackend>(0);
    auto &sizes = ws.Output<CPUBackend>(1);
    auto &mirrors = ws.Output<CPUBackend>(2);
    for (int i = 0; i < shapes.num_samples(); i++) {  // a few arithmetic operations per sample
      const int64_t height = ReadInteger(shapes, i, 0, "image_shape");
      const int64_t width = ReadInteger(shapes, i, 1, "image_shape");
      DALI_ENFORCE(height > 0 && width > 0, ::dali::make_string(
          "relabel.random_crop_window: sample ", i, ": image shape (", height, ", ", width,
          ") must be positive"));
      const CropWindow window = DrawCropWindow(height, width, keys_[i], params_);
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
  int64_t seed_;
  std::vector<uint64_t> keys_;
};

class SampleDrawsOp : public ::dali::StatelessOperator<CPUBackend> {
 public:
  explicit SampleDrawsOp(const ::dali::OpSpec &spec) : ::dali::StatelessOperator<CPUBackend>(spec) {
    auto jitter = spec.GetRepeatedArgument<float>("color_jitter");
    DALI_ENFORCE(jitter.size() == 4 && jitter[0] >= 0 && jitter[1] >= 0 && jitter[2] >= 0 &&
                 jitter[3] >= 0 && jitter[3] <= 0.5f,
                 "relabel.sample_draws: color_jitter must be 4 non-negative strengths, hue at most 0.5");
    for (int i = 0; i < 4; i++) strength_[i] = jitter[i];
    seed_ = spec.GetArgument<int64_t>("seed");
  }

 protected:
  bool SetupImpl(std::vector<::dali::OutputDesc> &output_desc, const ::dali::Workspace &ws) override {
    SampleKeys(ws, 0, seed_, "relabel.sample_draws", keys_);
    const int n = static_cast<int>(keys_.size());
    output_desc.resize(2);
    output_desc[0] = {::dali::uniform_list_shape(n, ::dali::TensorShape<>{4}), DALI_FLOAT};
    output_desc[1] = {::dali::uniform_list_shape(n, ::dali::TensorShape<>{}), DALI_INT32};
    return true;
  }

  void RunImpl(::dali::Workspace &ws) override {
    auto &jitter = ws.Output<CPUBackend>(0);
    auto &interpolation = ws.Output<CPUBackend>(1);
    for (int i = 0; i < static_cast<int>(keys_.size()); i++) {
      DrawJitter(keys_[i], strength_, jitter.mutable_tensor<float>(i));
      *interpolation.mutable_tensor<int32_t>(i) = DrawInterpolation(keys_[i]);
    }
  }

 private:
  float strength_[4];
  int64_t seed_;
  std::vector<uint64_t> keys_;
};

// `count` uniforms in [0, 1) per sample from stream `stream` of its key: the draws of the
// augmentation policies and random erasing, so they too follow from (seed, epoch, row) alone.
class KeyedUniformsOp : public ::dali::StatelessOperator<CPUBackend> {
 public:
  explicit KeyedUniformsOp(const ::dali::OpSpec &spec) : ::dali::StatelessOperator<CPUBackend>(spec) {
    seed_ = spec.GetArgument<int64_t>("seed");
    stream_ = spec.GetArgument<int64_t>("stream");
    count_ = spec.GetArgument<int>("count");
    DALI_ENFORCE(count_ >= 1, "relabel.keyed_uniforms: count must be at least 1");
    DALI_ENFORCE(stream_ >= 3, "relabel.keyed_uniforms: streams 0-2 belong to the crop, the colour jitter "
                 "and the interpolation; use stream 3 or more");
  }

 protected:
  bool SetupImpl(std::vector<::dali::OutputDesc> &output_desc, const ::dali::Workspace &ws) override {
    SampleKeys(ws, 0, seed_, "relabel.keyed_uniforms", keys_);
    output_desc.resize(1);
    output_desc[0] = {::dali::uniform_list_shape(static_cast<int>(keys_.size()), ::dali::TensorShape<>{count_}),
                      DALI_FLOAT};
    return true;
  }

  void RunImpl(::dali::Workspace &ws) override {
    auto &out = ws.Output<CPUBackend>(0);
    for (int i = 0; i < static_cast<int>(keys_.size()); i++) {
      float *u = out.mutable_tensor<float>(i);
      for (int j = 0; j < count_; j++) {
        // float32 rounding could reach 1.0; keep the interval half-open.
        const float value = static_cast<float>(SampleUniform(keys_[i], static_cast<uint64_t>(stream_), j));
        u[j] = value < 1.0f ? value : 0x1.fffffep-1f;
      }
    }
  }

 private:
  int64_t seed_, stream_;
  int count_;
  std::vector<uint64_t> keys_;
};

}  // namespace dali_relabel

DALI_REGISTER_OPERATOR(relabel__RandomCropWindow, ::dali_relabel::RandomCropWindowOp, ::dali::CPU);

DALI_SCHEMA(relabel__RandomCropWindow)
    .DocStr(R"(Random-resized-crop windows and horizontal flips keyed by (seed, epoch, row).

Follows torchvision's ``RandomResizedCrop.get_params``: up to ``num_attempts`` draws of an area
fraction (uniform in ``random_area``) and an aspect ratio w/h (log-uniform in
``random_aspect_ratio``), accepted when the window fits; otherwise the largest centred window whose
aspect ratio lies in the range. Every draw of a sample comes from a SplitMix64 stream started at its
key, derived from ``seed``, its ``epoch`` and its ``row`` alone, so the same row in the same epoch
always gets the same window and flip, whatever the batch, thread, rank, data path or resume point.
Outputs: ``anchor`` (y, x) and ``shape`` (h, w) as int32 (the order
``decoders.image_slice(axis_names="HW")`` and ``relabel.label_pooling`` take), and ``mirror`` (int32
0/1).)")
    .NumInput(3)
    .NumOutput(3)
    .InputDox(0, "image_shape", "TensorList [2] or [3] of integers",
              "Image shape (H, W[, C]), e.g. from peek_image_shape.")
    .InputDox(1, "row", "TensorList of integer scalars", "The sample's row (its index in the data set).")
    .InputDox(2, "epoch", "TensorList of integer scalars", "The epoch the sample is read in.")
    .AddOptionalArg("seed", "Base seed of the keys.", static_cast<int64_t>(0))
    .AddOptionalArg("random_area", "Range of the window's share of the image area.",
                    std::vector<float>{0.08f, 1.0f})
    .AddOptionalArg("random_aspect_ratio", "Range of the window's aspect ratio w/h (log-uniform).",
                    std::vector<float>{3.0f / 4.0f, 4.0f / 3.0f})
    .AddOptionalArg("num_attempts", "Draws before the centred fallback window.", 10)
    .AddOptionalArg("flip_probability", "Probability that mirror is 1.", 0.5f);

DALI_REGISTER_OPERATOR(relabel__SampleDraws, ::dali_relabel::SampleDrawsOp, ::dali::CPU);

DALI_SCHEMA(relabel__SampleDraws)
    .DocStr(R"(Colour-jitter factors and a random interpolation, keyed by (seed, epoch, row) like
``relabel.random_crop_window`` (other streams of the same key). Outputs: ``jitter`` float32 [4]:
brightness, contrast and saturation factors uniform in [max(0, 1 - s), 1 + s] and a hue shift in
degrees uniform in [-360 h, 360 h] for ``color_jitter`` = (b, c, s, h); ``interpolation`` int32: 0
(bilinear) or 1 (bicubic), equally likely.)")
    .NumInput(2)
    .NumOutput(2)
    .InputDox(0, "row", "TensorList of integer scalars", "The sample's row.")
    .InputDox(1, "epoch", "TensorList of integer scalars", "The epoch the sample is read in.")
    .AddOptionalArg("seed", "Base seed of the keys.", static_cast<int64_t>(0))
    .AddOptionalArg("color_jitter", "Strengths (brightness, contrast, saturation, hue).",
                    std::vector<float>{0.f, 0.f, 0.f, 0.f});

DALI_REGISTER_OPERATOR(relabel__KeyedUniforms, ::dali_relabel::KeyedUniformsOp, ::dali::CPU);

DALI_SCHEMA(relabel__KeyedUniforms)
    .DocStr(R"(``count`` uniforms in [0, 1) per sample (float32 ``[count]``), keyed by (seed, epoch,
row) like ``relabel.random_crop_window``, from stream ``stream`` of the key (3 or more; 0-2 are the
crop's, the colour jitter's and the interpolation's). The augmentation policies and random erasing
draw from them, so a sample's augmentation depends on nothing but its key.)")
    .NumInput(2)
    .NumOutput(1)
    .InputDox(0, "row", "TensorList of integer scalars", "The sample's row.")
    .InputDox(1, "epoch", "TensorList of integer scalars", "The epoch (or draw key) the sample is read in.")
    .AddOptionalArg("seed", "Base seed of the keys.", static_cast<int64_t>(0))
    .AddArg("stream", "The key's stream (3 or more).", DALI_INT64)
    .AddArg("count", "Uniforms per sample.", DALI_INT32);
