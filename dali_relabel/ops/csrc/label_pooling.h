// relabel.label_pooling: the fused ReLabel LabelPooling operator for DALI.
//
// Per sample it takes the top-k label map (logits and class ids, [k, H, W]), the crop window DALI
// used (anchor and shape in HW order, the image shape as given by peek_image_shape) and an optional
// mirror flag, and produces the soft target softmax(RoIAlign(dense map, crop box) / T): [C] for a 1x1
// output grid, [C, oh, ow] otherwise. The dense [C, H, W] map is never built: RoIAlign is linear, so
// the per-cell weights are computed from the box and each of the k*H*W logits is added once into its
// class (classes outside the top-k keep logit 0, as in the reference).
//
// With the per-sample argument `affine` (a [2, 3] map from output image pixels to pixels of the
// resized, flipped crop, i.e. the geometric ops that ran after crop, resize and flip), a sample whose
// affine is not the identity is pooled over what each output pixel shows: the map sampled at the
// inverse-mapped positions of a lattice of output points (label_pooling_math.h, WarpSampling),
// points showing fill left out. An identity affine takes the RoIAlign path above, bit for bit.
// The per-sample argument `canvas_checks` ([m, 2, 3]: output pixel -> each intermediate canvas of a
// chain of geometric ops) makes that exact for several ops: a point any check maps off the canvas
// shows fill too. Identity checks are skipped (they hold for every output point).
//
// All inputs are read on the host (they are small), where they are validated; a bad sample is
// reported as a DALI error naming it. The GPU backend uploads the packed batch once and runs one
// kernel per batch on the workspace stream.
#ifndef DALI_RELABEL_LABEL_POOLING_H_
#define DALI_RELABEL_LABEL_POOLING_H_

#include <string>
#include <vector>

#include "dali/pipeline/operator/checkpointing/stateless_operator.h"
#include "label_pooling_math.h"

namespace dali_relabel {

enum InputIndex { kLogits = 0, kClassIds, kCropAnchor, kCropShape, kImageShape, kMirror, kRegion };

// The host-side view of one validated batch.
struct PoolingBatch {
  std::vector<PoolingSample> samples;
  int k = 0, map_h = 0, map_w = 0;
  int64_t entries_per_sample = 0;  // k * map_h * map_w
  bool any_warp = false;           // some sample takes the warp path
  std::vector<float> checks;       // every sample's non-identity canvas checks, 6 floats each
};

// Arguments and host-side preparation shared by both backends.
class LabelPoolingParams {
 public:
  explicit LabelPoolingParams(const ::dali::OpSpec &spec);

  int num_classes() const { return num_classes_; }
  int out_h() const { return out_h_; }
  int out_w() const { return out_w_; }
  float temperature() const { return temperature_; }
  bool apply_softmax() const { return apply_softmax_; }
  bool transposed() const { return transposed_; }
  bool outside() const { return outside_; }
  bool has_affine() const { return affine_ != AffineSource::kNone; }
  bool has_checks() const { return checks_ != AffineSource::kNone; }
  int64_t output_volume() const { return static_cast<int64_t>(num_classes_) * out_h_ * out_w_; }

  // Checks input shapes and types, reads boxes and flags; fills `batch`. Throws a DALI error naming
  // the sample and the problem.
  void Prepare(const ::dali::Workspace &ws, PoolingBatch &batch) const;

  // The output shape of every sample.
  ::dali::TensorListShape<> OutputShape(int num_samples) const;

  // Converts sample `i`'s logits to float and its class ids to int32, checking every value
  // (class id in range, logit finite). Throws a DALI error naming the sample.
  void ReadValues(const ::dali::Workspace &ws, int i, int64_t entries, float *logits,
                  int32_t *class_ids) const;

 private:
  int num_classes_;
  int out_h_, out_w_;
  float temperature_;
  bool apply_softmax_;
  bool transposed_;
  bool outside_;
  enum class AffineSource { kNone, kConstant, kPerSample } affine_ = AffineSource::kNone;
  float constant_affine_[6] = {1, 0, 0, 0, 1, 0};
  AffineSource checks_ = AffineSource::kNone;  // argument `canvas_checks`
  std::vector<float> constant_checks_;          // a constant's non-identity checks, 6 floats each
  int image_h_ = 0, image_w_ = 0;  // output_image_size: the space `affine` works in

  // Sample `i`'s affine, checked (shape, type, finite values).
  void ReadAffine(const ::dali::Workspace &ws, int i, float m[6]) const;

  // Appends sample `i`'s non-identity canvas checks to `checks` (6 floats each), checked (shape,
  // type, finite values); returns how many.
  int ReadChecks(const ::dali::Workspace &ws, int i, std::vector<float> &checks) const;

  // Sets up the warp path of sample `s` for the affine `m` and the crop window (cy, cx, ch, cw) of
  // an image_h x image_w source; `region` (y0, x0, y1, x1) or nullptr.
  void SetupWarp(PoolingSample &s, const float m[6], double cy, double cx, double ch, double cw,
                 double image_h, double image_w, const double *region, int map_h, int map_w) const;

  // The grid box of the image-fraction box (y0, x0) - (y1, x1) for this map layout.
  GridBox ToGrid(double y0, double x0, double y1, double x1, int map_h, int map_w) const;
};

// Reusable buffers of one CPU worker thread.
struct HostScratch {
  std::vector<float> logits, wa, wb, ra, rb, cell_weight, touched_values;
  std::vector<float> warp_weights;  // warp path: [cells][bins]
  std::vector<double> warp_terms;   // warp path: the affine's products per lattice column and row
  std::vector<uint8_t> warp_excluded;  // warp path: lattice columns and rows inside the region
  std::vector<float> warp_coords;      // warp path: the lattice's x per column and y per row
  std::vector<int32_t> class_ids, touched;
  std::vector<uint8_t> touched_mask;
};

// Pools one sample on the host: `out` holds num_classes * oh * ow floats.
void PoolSampleHost(const LabelPoolingParams &params, const PoolingBatch &batch,
                    const PoolingSample &sample, const float *logits, const int32_t *class_ids,
                    float *out, HostScratch &scratch);

template <typename Backend>
class LabelPooling : public ::dali::StatelessOperator<Backend> {  // checkpoints carry nothing of it
 public:
  explicit LabelPooling(const ::dali::OpSpec &spec)
      : ::dali::StatelessOperator<Backend>(spec), params_(spec) {}
  ~LabelPooling() override;

  LabelPooling(const LabelPooling &) = delete;
  LabelPooling &operator=(const LabelPooling &) = delete;

 protected:
  bool SetupImpl(std::vector<::dali::OutputDesc> &output_desc, const ::dali::Workspace &ws) override {
    params_.Prepare(ws, batch_);
    CheckLimits();
    output_desc.resize(1);
    output_desc[0].shape = params_.OutputShape(static_cast<int>(batch_.samples.size()));
    output_desc[0].type = DALI_FLOAT;
    return true;
  }

  void RunImpl(::dali::Workspace &ws) override;

  // Fails with a DALI error, before anything runs, where the batch exceeds a backend limit (the
  // GPU backend's launch geometry and shared memory); nothing to check on the CPU.
  void CheckLimits() const;

  LabelPoolingParams params_;
  PoolingBatch batch_;
  std::vector<HostScratch> scratch_;  // one per CPU worker thread

  // GPU backend only: two staging slots used in turn, so packing batch i on the host overlaps the
  // upload and kernel of batch i-1; a slot is refilled once the kernel that last read it finished.
  struct StagingSlot {
    void *host = nullptr;    // pinned
    void *device = nullptr;
    size_t bytes = 0;        // capacity of both buffers; 0 until both allocations succeeded
    void *done = nullptr;    // cudaEvent_t recorded after the kernel that read this slot
  };
  StagingSlot staging_[2];
  int next_slot_ = 0;
  int staging_device_ = -1;  // the CUDA device the slots live on (set with the first event)
};

}  // namespace dali_relabel

#endif  // DALI_RELABEL_LABEL_POOLING_H_
