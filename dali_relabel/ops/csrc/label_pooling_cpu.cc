// relabel.label_pooling: the CPU backend (one sample per thread-pool task).
#include <algorithm>
#include <cmath>
#include <vector>

#include "label_pooling.h"

namespace dali_relabel {

using ::dali::CPUBackend;

void PoolSampleHost(const LabelPoolingParams &params, const PoolingBatch &batch,
                    const PoolingSample &s, const float *logits, const int32_t *class_ids,
                    float *out, HostScratch &scratch) {
  const int oh = params.out_h(), ow = params.out_w();
  const int bins_a = params.transposed() ? ow : oh;
  const int bins_b = params.transposed() ? oh : ow;
  const int map_h = batch.map_h, map_w = batch.map_w;
  const int64_t num_classes = params.num_classes();
  auto &wa = scratch.wa, &wb = scratch.wb;
  auto &touched_mask = scratch.touched_mask;
  auto &touched = scratch.touched;
  wa.resize(static_cast<size_t>(bins_a) * map_h);
  wb.resize(static_cast<size_t>(bins_b) * map_w);
  for (int bin = 0; bin < bins_a; bin++)
    AxisWeights(s.box.a_start, s.box.a_end, map_h, bins_a, bin, wa.data() + bin * map_h);
  for (int bin = 0; bin < bins_b; bin++)
    AxisWeights(s.box.b_start, s.box.b_end, map_w, bins_b, bin, wb.data() + bin * map_w);
  auto &ra = scratch.ra, &rb = scratch.rb;  // the left-out region (1x1 output only)
  const float keep = s.outside ? 1.f / (1.f - s.region_fraction) : 1.f;
  const float drop = s.outside ? s.region_fraction * keep : 0.f;
  if (s.outside) {
    ra.resize(map_h);
    rb.resize(map_w);
    AxisWeights(s.region.a_start, s.region.a_end, map_h, 1, 0, ra.data());
    AxisWeights(s.region.b_start, s.region.b_end, map_w, 1, 0, rb.data());
  }
  const int64_t stride = static_cast<int64_t>(oh) * ow;
  std::fill(out, out + params.output_volume(), 0.f);
  // Classes outside every cell's top-k keep logit 0; only the touched ones need their own exp().
  // (A separate pass: writes through the uint8 mask would make the compiler reload everything.)
  touched_mask.assign(num_classes, 0);
  touched.resize(batch.entries_per_sample);
  int64_t num_touched = 0;
  {
    uint8_t *__restrict mask = touched_mask.data();
    int32_t *__restrict list = touched.data();
    const int32_t *__restrict src = class_ids;
    for (int64_t e = 0; e < batch.entries_per_sample; e++) {  // branch-free: ids are random
      const int32_t c = src[e];
      list[num_touched] = c;
      num_touched += !mask[c];
      mask[c] = 1;
    }
  }
  touched.resize(num_touched);
  const int cells = map_h * map_w;
  const float *__restrict lg = logits;
  const int32_t *__restrict ids = class_ids;
  float *__restrict dst = out;
  if (stride == 1) {
    auto &cell_weight = scratch.cell_weight;
    cell_weight.resize(cells);
    for (int a = 0; a < map_h; a++)
      for (int b = 0; b < map_w; b++)
        cell_weight[a * map_w + b] = s.outside ? wa[a] * wb[b] * keep - ra[a] * rb[b] * drop
                                               : wa[a] * wb[b];
    const float *__restrict w = cell_weight.data();
    for (int kk = 0; kk < batch.k; kk++, lg += cells, ids += cells)
      for (int cell = 0; cell < cells; cell++) dst[ids[cell]] += w[cell] * lg[cell];
  } else {
    const bool transposed = params.transposed();
    int64_t e = 0;
    for (int kk = 0; kk < batch.k; kk++) {
      for (int a = 0; a < map_h; a++) {
        for (int b = 0; b < map_w; b++, e++) {
          float *bins = dst + static_cast<int64_t>(ids[e]) * stride;
          for (int p = 0; p < oh; p++) {
            for (int q = 0; q < ow; q++) {
              const float w = transposed ? wa[q * map_h + a] * wb[p * map_w + b]
                                         : wa[p * map_h + a] * wb[q * map_w + b];
              bins[p * ow + (s.flip ? ow - 1 - q : q)] += w * lg[e];
            }
          }
        }
      }
    }
  }
  const float inv_t = 1.f / params.temperature();
  const int64_t untouched = num_classes - num_touched;
  const int32_t *__restrict list = touched.data();
  auto &values = scratch.touched_values;
  values.resize(num_touched);
  for (int64_t bin = 0; bin < stride; bin++) {
    float *__restrict v = out + bin;
    if (!params.apply_softmax()) {
      for (int64_t t = 0; t < num_touched; t++) v[list[t] * stride] *= inv_t;
      continue;
    }
    float top = untouched > 0 ? 0.f : -INFINITY;
    for (int64_t t = 0; t < num_touched; t++) top = std::max(top, v[list[t] * stride]);
    const float rest = untouched > 0 ? std::exp(-top * inv_t) : 0.f;  // every untouched class
    double sum = static_cast<double>(rest) * untouched;
    for (int64_t t = 0; t < num_touched; t++) {
      values[t] = std::exp((v[list[t] * stride] - top) * inv_t);
      sum += values[t];
    }
    const float inv_sum = static_cast<float>(1.0 / sum);
    const float rest_prob = rest * inv_sum;
    if (stride == 1) {
      std::fill(v, v + num_classes, rest_prob);
    } else {
      for (int64_t c = 0; c < num_classes; c++) v[c * stride] = rest_prob;
    }
    for (int64_t t = 0; t < num_touched; t++) v[list[t] * stride] = values[t] * inv_sum;
  }
}

template <>
LabelPooling<CPUBackend>::~LabelPooling() = default;

template <>
void LabelPooling<CPUBackend>::CheckLimits() const {}

template <>
void LabelPooling<CPUBackend>::RunImpl(::dali::Workspace &ws) {
  auto &output = ws.Output<CPUBackend>(0);
  auto &pool = ws.GetThreadPool();
  const int64_t entries = batch_.entries_per_sample;
  scratch_.resize(pool.NumThreads() + 1);
  for (int i = 0; i < static_cast<int>(batch_.samples.size()); i++) {
    pool.AddWork([&, i](int thread) {
      HostScratch &scratch = scratch_[thread >= 0 && thread < static_cast<int>(scratch_.size()) - 1
                                      ? thread : scratch_.size() - 1];
      scratch.logits.resize(entries);
      scratch.class_ids.resize(entries);
      params_.ReadValues(ws, i, entries, scratch.logits.data(), scratch.class_ids.data());
      PoolSampleHost(params_, batch_, batch_.samples[i], scratch.logits.data(),
                     scratch.class_ids.data(), output.mutable_tensor<float>(i), scratch);
    }, entries);
  }
  pool.RunAll();
}

}  // namespace dali_relabel

DALI_REGISTER_OPERATOR(relabel__LabelPooling, ::dali_relabel::LabelPooling<::dali::CPUBackend>,
                       ::dali::CPU);
