// relabel.label_pooling: the CUDA backend. The batch is validated and packed on the host, uploaded
// in one copy and pooled by one kernel launch on the workspace stream: one block per (sample, output
// bin) scatters the weighted top-k logits into the sample's class vector and softmaxes it in place.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>

#include "dali/core/cuda_error.h"
#include "label_pooling.h"

namespace dali_relabel {

using ::dali::CPUBackend;
using ::dali::GPUBackend;

namespace {

constexpr int kBlock = 256;

__device__ float BlockReduce(float value, bool is_max, float *scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other = __shfl_down_sync(0xffffffffu, value, offset);
    value = is_max ? fmaxf(value, other) : value + other;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = scratch[0];
    for (int w = 1; w < (blockDim.x + 31) / 32; w++)
      total = is_max ? fmaxf(total, scratch[w]) : total + scratch[w];
    scratch[32] = total;
  }
  __syncthreads();
  const float result = scratch[32];
  __syncthreads();
  return result;
}

__global__ void LabelPoolingKernel(const PoolingSample *samples, const float *logits,
                                   const int32_t *class_ids, int map_h, int map_w, int64_t entries,
                                   int num_classes, int out_h, int out_w, bool transposed,
                                   float inv_temperature, bool apply_softmax) {
  extern __shared__ float shared[];  // weights: 2 * (map_h + map_w), then 33 reduction slots
  float *wa = shared, *wb = shared + map_h, *ra = shared + map_h + map_w;
  float *rb = ra + map_h, *scratch = shared + 2 * (map_h + map_w);
  const PoolingSample s = samples[blockIdx.x];
  const int p = blockIdx.y / out_w, q = blockIdx.y % out_w;
  const int bin_a = transposed ? q : p, bins_a = transposed ? out_w : out_h;
  const int bin_b = transposed ? p : q, bins_b = transposed ? out_h : out_w;
  for (int t = threadIdx.x; t < map_h + map_w; t += blockDim.x) {
    if (t < map_h) {
      wa[t] = AxisWeight(s.box.a_start, s.box.a_end, map_h, bins_a, bin_a, t);
      ra[t] = s.outside ? AxisWeight(s.region.a_start, s.region.a_end, map_h, 1, 0, t) : 0.f;
    } else {
      const int b = t - map_h;
      wb[b] = AxisWeight(s.box.b_start, s.box.b_end, map_w, bins_b, bin_b, b);
      rb[b] = s.outside ? AxisWeight(s.region.b_start, s.region.b_end, map_w, 1, 0, b) : 0.f;
    }
  }
  const float keep = s.outside ? 1.f / (1.f - s.region_fraction) : 1.f;
  const float drop = s.outside ? s.region_fraction * keep : 0.f;
  const int64_t stride = static_cast<int64_t>(out_h) * out_w;
  float *out = s.out + p * out_w + (s.flip ? out_w - 1 - q : q);
  for (int c = threadIdx.x; c < num_classes; c += blockDim.x) out[c * stride] = 0.f;
  __syncthreads();
  const float *lg = logits + s.in_offset;
  const int32_t *ids = class_ids + s.in_offset;
  const int cells = map_h * map_w;
  for (int64_t e = threadIdx.x; e < entries; e += blockDim.x) {
    const int cell = static_cast<int>(e % cells);
    const int a = cell / map_w, b = cell % map_w;
    const float w = wa[a] * wb[b] * keep - ra[a] * rb[b] * drop;
    if (w != 0.f) atomicAdd(out + static_cast<int64_t>(ids[e]) * stride, w * lg[e]);
  }
  __syncthreads();
  if (!apply_softmax) {
    for (int c = threadIdx.x; c < num_classes; c += blockDim.x) out[c * stride] *= inv_temperature;
    return;
  }
  float top = -INFINITY;
  for (int c = threadIdx.x; c < num_classes; c += blockDim.x) top = fmaxf(top, out[c * stride]);
  top = BlockReduce(top, true, scratch);
  float sum = 0.f;
  for (int c = threadIdx.x; c < num_classes; c += blockDim.x) {
    const float x = expf((out[c * stride] - top) * inv_temperature);
    out[c * stride] = x;
    sum += x;
  }
  sum = BlockReduce(sum, false, scratch);
  const float inv_sum = 1.f / sum;
  for (int c = threadIdx.x; c < num_classes; c += blockDim.x) out[c * stride] *= inv_sum;
}

size_t AlignUp(size_t n) { return (n + 255) & ~size_t(255); }

}  // namespace

template <>
LabelPooling<GPUBackend>::~LabelPooling() {
  if (staging_ready_) {
    cudaEventSynchronize(static_cast<cudaEvent_t>(staging_ready_));
    cudaEventDestroy(static_cast<cudaEvent_t>(staging_ready_));
  }
  if (host_staging_) cudaFreeHost(host_staging_);
  if (device_staging_) cudaFree(device_staging_);
}

template <>
void LabelPooling<GPUBackend>::RunImpl(::dali::Workspace &ws) {
  auto &output = ws.Output<GPUBackend>(0);
  const int n = static_cast<int>(batch_.samples.size());
  if (n == 0) return;
  const int64_t entries = batch_.entries_per_sample;
  const size_t samples_bytes = AlignUp(n * sizeof(PoolingSample));
  const size_t logits_bytes = AlignUp(n * entries * sizeof(float));
  const size_t bytes = samples_bytes + logits_bytes + n * entries * sizeof(int32_t);
  if (!staging_ready_) {
    cudaEvent_t event;
    CUDA_CALL(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
    staging_ready_ = event;
  }
  // The previous upload must have left the pinned buffer before it is refilled.
  CUDA_CALL(cudaEventSynchronize(static_cast<cudaEvent_t>(staging_ready_)));
  if (bytes > staging_bytes_) {
    if (host_staging_) CUDA_CALL(cudaFreeHost(host_staging_));
    if (device_staging_) CUDA_CALL(cudaFree(device_staging_));
    host_staging_ = device_staging_ = nullptr;
    staging_bytes_ = bytes + bytes / 2;
    CUDA_CALL(cudaMallocHost(&host_staging_, staging_bytes_));
    CUDA_CALL(cudaMalloc(&device_staging_, staging_bytes_));
  }
  char *host = static_cast<char *>(host_staging_);
  char *device = static_cast<char *>(device_staging_);
  auto *samples = reinterpret_cast<PoolingSample *>(host);
  auto *logits = reinterpret_cast<float *>(host + samples_bytes);
  auto *ids = reinterpret_cast<int32_t *>(host + samples_bytes + logits_bytes);
  for (int i = 0; i < n; i++) {
    samples[i] = batch_.samples[i];
    samples[i].out = output.mutable_tensor<float>(i);
    params_.ReadValues(ws, i, entries, logits + i * entries, ids + i * entries);
  }
  cudaStream_t stream = ws.stream();
  CUDA_CALL(cudaMemcpyAsync(device, host, bytes, cudaMemcpyHostToDevice, stream));
  CUDA_CALL(cudaEventRecord(static_cast<cudaEvent_t>(staging_ready_), stream));
  const dim3 grid(n, params_.out_h() * params_.out_w());
  const size_t shared_bytes = (2 * (batch_.map_h + batch_.map_w) + 33) * sizeof(float);
  LabelPoolingKernel<<<grid, kBlock, shared_bytes, stream>>>(
      reinterpret_cast<const PoolingSample *>(device),
      reinterpret_cast<const float *>(device + samples_bytes),
      reinterpret_cast<const int32_t *>(device + samples_bytes + logits_bytes), batch_.map_h,
      batch_.map_w, entries, params_.num_classes(), params_.out_h(), params_.out_w(),
      params_.transposed(), 1.f / params_.temperature(), params_.apply_softmax());
  CUDA_CALL(cudaGetLastError());
}

}  // namespace dali_relabel

DALI_REGISTER_OPERATOR(relabel__LabelPooling, ::dali_relabel::LabelPooling<::dali::GPUBackend>,
                       ::dali::GPU);
