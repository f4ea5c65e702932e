// relabel.label_pooling: the CPU backend (one sample per thread-pool task).
#include <algorithm>
#include <cmath>
#include <vector>

#include "label_pooling.h"

namespace dali_relabel {

using ::dali::CPUBackend;

namespace {

// Warp path: the weight of every map cell in every output cell, [cells][bins] (bins = oh * ow, in
// output order: no mirroring, the affine's unflip already accounts for the flip).
//
// WarpPoint's arithmetic, with the per-column and per-row products hoisted out of the inner loop
// (the same double operations in the same order, so the same points show fill as on the GPU); the
// canvas checks, if any, go through WarpPoint's own PassesCanvasChecks.
void WarpWeights(const LabelPoolingParams &params, const PoolingBatch &batch, const PoolingSample &s,
                 HostScratch &scratch) {
  const int oh = params.out_h(), ow = params.out_w(), bins = oh * ow;
  const int map_h = batch.map_h, map_w = batch.map_w;
  const WarpSampling &w = s.sampling;
  auto &table = scratch.warp_weights;
  table.assign(static_cast<size_t>(map_h) * map_w * bins, 0.f);
  // Per lattice column: affine[0] * x, affine[3] * x; per row: affine[1] * y, affine[4] * y (exact).
  auto &terms = scratch.warp_terms;
  auto &excluded = scratch.warp_excluded;
  auto &coords = scratch.warp_coords;  // the lattice's x per column, then y per row (canvas checks)
  const int columns = ow * w.nx, rows = oh * w.ny;
  terms.resize(2 * static_cast<size_t>(columns + rows));
  excluded.resize(columns + rows);
  coords.resize(columns + rows);
  double *col_terms = terms.data(), *row_terms = terms.data() + 2 * columns;
  const float *xs = coords.data(), *ys = coords.data() + columns;
  for (int gi = 0; gi < columns; gi++) {
    const float x = static_cast<float>(static_cast<double>(w.origin_x) + (gi + 0.5) * static_cast<double>(w.step_x));
    col_terms[2 * gi] = static_cast<double>(w.affine[0]) * x;
    col_terms[2 * gi + 1] = static_cast<double>(w.affine[3]) * x;
    excluded[gi] = w.exclude && x >= w.ex0 && x <= w.ex1;
    coords[gi] = x;
  }
  for (int gj = 0; gj < rows; gj++) {
    const float y = static_cast<float>(static_cast<double>(w.origin_y) + (gj + 0.5) * static_cast<double>(w.step_y));
    row_terms[2 * gj] = static_cast<double>(w.affine[1]) * y;
    row_terms[2 * gj + 1] = static_cast<double>(w.affine[4]) * y;
    excluded[columns + gj] = w.exclude && y >= w.ey0 && y <= w.ey1;
    coords[columns + gj] = y;
  }
  const bool checked = w.num_checks > 0;
  const double m2 = w.affine[2], m5 = w.affine[5], width = w.width, height = w.height;
  const bool transposed = params.transposed();
  float *__restrict t = table.data();
  for (int p = 0; p < oh; p++) {
    for (int q = 0; q < ow; q++) {
      const int bin = p * ow + q;
      int count = 0;
      for (int gj = p * w.ny; gj < (p + 1) * w.ny; gj++) {
        const double ry_x = row_terms[2 * gj], ry_y = row_terms[2 * gj + 1];
        const bool row_excluded = excluded[columns + gj];
        for (int gi = q * w.nx; gi < (q + 1) * w.nx; gi++) {
          if (row_excluded && excluded[gi]) continue;
          const double qx = (col_terms[2 * gi] + ry_x) + m2;
          const double qy = (col_terms[2 * gi + 1] + ry_y) + m5;
          if (!(qx >= 0.0 && qx <= width && qy >= 0.0 && qy <= height)) continue;
          if (checked && !PassesCanvasChecks(w, xs[gi], ys[gj])) continue;
          count++;
          const double gx = (s.flip ? width - qx : qx) * w.kx + w.bx;
          const double gy = qy * w.ky + w.by;
          int cell[4];
          float weight[4];
          if (!BilinearPoint(transposed ? gx : gy, transposed ? gy : gx, map_h, map_w, cell, weight)) continue;
          for (int c = 0; c < 4; c++) t[static_cast<int64_t>(cell[c]) * bins + bin] += weight[c];
        }
      }
      // A cell showing only fill keeps weights 0: logits 0, the uniform distribution.
      const float scale = count > 0 ? 1.f / static_cast<float>(count) : 0.f;
      for (int cell = 0; cell < map_h * map_w; cell++) t[static_cast<int64_t>(cell) * bins + bin] *= scale;
    }
  }
}

}  // namespace

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
  if (s.warp) {
    WarpWeights(params, batch, s, scratch);
  } else {
    wa.resize(static_cast<size_t>(bins_a) * map_h);
    wb.resize(static_cast<size_t>(bins_b) * map_w);
    for (int bin = 0; bin < bins_a; bin++)
      AxisWeights(s.box.a_start, s.box.a_end, map_h, bins_a, bin, wa.data() + bin * map_h);
    for (int bin = 0; bin < bins_b; bin++)
      AxisWeights(s.box.b_start, s.box.b_end, map_w, bins_b, bin, wb.data() + bin * map_w);
  }
  auto &ra = scratch.ra, &rb = scratch.rb;  // the left-out region (1x1 output only)
  const float keep = s.outside ? 1.f / (1.f - s.region_fraction) : 1.f;
  const float drop = s.outside ? s.region_fraction * keep : 0.f;
  if (s.outside && !s.warp) {
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
    auto &cell_weight = s.warp ? scratch.warp_weights : scratch.cell_weight;  // [cells][1]
    if (!s.warp) {
      cell_weight.resize(cells);
      for (int a = 0; a < map_h; a++)
        for (int b = 0; b < map_w; b++)
          cell_weight[a * map_w + b] = s.outside ? wa[a] * wb[b] * keep - ra[a] * rb[b] * drop
                                                 : wa[a] * wb[b];
    }
    const float *__restrict w = cell_weight.data();
    for (int kk = 0; kk < batch.k; kk++, lg += cells, ids += cells)
      for (int cell = 0; cell < cells; cell++) dst[ids[cell]] += w[cell] * lg[cell];
  } else if (s.warp) {
    const float *__restrict table = scratch.warp_weights.data();
    for (int64_t e = 0; e < batch.entries_per_sample; e++) {
      const float *__restrict w = table + (e % cells) * stride;
      float *__restrict bins = dst + static_cast<int64_t>(ids[e]) * stride;
      const float value = lg[e];
      for (int64_t bin = 0; bin < stride; bin++) bins[bin] += w[bin] * value;
    }
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
