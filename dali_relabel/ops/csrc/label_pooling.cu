// relabel.label_pooling: the CUDA backend. The batch is validated and packed on the host, uploaded
// in one copy and pooled by one kernel launch on the workspace stream: one block per (sample, output
// bin) scatters the weighted top-k logits into the sample's class vector and softmaxes it in place.
// A sample on the warp path (a non-identity affine or canvas check) first splats its lattice points
// into a shared [H * W] weight table; the rest of the block is the same.
// Two pinned staging slots are used in turn, so packing a batch overlaps the previous batch's upload
// and kernel.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstring>

#include "dali/core/cuda_error.h"
#include "dali/core/device_guard.h"
#include "label_pooling.h"

namespace dali_relabel {

using ::dali::CPUBackend;
using ::dali::GPUBackend;

namespace {

constexpr int kBlock = 256;
constexpr int kScratchSlots = 33;  // BlockReduce: one per warp (kBlock / 32 <= 32), then the result
// Dynamic shared memory a kernel may use without opting in (cudaFuncAttributeMaxDynamicSharedMemorySize).
constexpr size_t kMaxSharedBytes = 48 * 1024;
constexpr int64_t kMaxBlocks = INT_MAX;  // gridDim.x

// Per block, the weights: the A and B axis weights of the box and of the left-out region, or (a batch
// with warp samples) room for a whole [H * W] table if larger; the reduction slots follow.
size_t WeightFloats(int map_h, int map_w, bool warp) {
  const size_t axes = 2 * (static_cast<size_t>(map_h) + static_cast<size_t>(map_w));
  const size_t table = warp ? static_cast<size_t>(map_h) * static_cast<size_t>(map_w) : 0;
  return std::max(axes, table);
}

size_t SharedBytes(int map_h, int map_w, bool warp) {
  return (WeightFloats(map_h, map_w, warp) + kScratchSlots) * sizeof(float);
}

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
                                   float inv_temperature, bool apply_softmax, int weight_floats) {
  extern __shared__ float shared[];  // weights (weight_floats), then 33 reduction slots
  float *wa = shared, *wb = shared + map_h, *ra = shared + map_h + map_w;
  float *rb = ra + map_h, *scratch = shared + weight_floats;
  float *table = shared;  // warp path: [map_h * map_w], instead of wa, wb, ra, rb
  // A 1-D grid (gridDim.x allows 2^31 - 1 blocks; gridDim.y only 65535): block = sample * bins + bin.
  const unsigned bins = static_cast<unsigned>(out_h) * static_cast<unsigned>(out_w);
  const PoolingSample s = samples[blockIdx.x / bins];
  const int bin = static_cast<int>(blockIdx.x % bins);
  const int p = bin / out_w, q = bin % out_w;
  const int bin_a = transposed ? q : p, bins_a = transposed ? out_w : out_h;
  const int bin_b = transposed ? p : q, bins_b = transposed ? out_h : out_w;
  const int cells = map_h * map_w;
  float inv_count = 0.f;  // warp path: 1 / points not showing fill (0 if none: logits 0, uniform)
  if (s.warp) {
    const WarpSampling &w = s.sampling;
    for (int c = threadIdx.x; c < cells; c += blockDim.x) table[c] = 0.f;
    __syncthreads();
    float count = 0.f;  // exact: at most kMaxLattice^2 points
    for (int t = threadIdx.x; t < w.nx * w.ny; t += blockDim.x) {
      double a, b;
      if (!WarpPoint(w, s.flip, transposed, q * w.nx + t % w.nx, p * w.ny + t / w.nx, &a, &b)) continue;
      count += 1.f;
      int cell[4];
      float weight[4];
      if (!BilinearPoint(a, b, map_h, map_w, cell, weight)) continue;
      for (int c = 0; c < 4; c++) atomicAdd(table + cell[c], weight[c]);
    }
    count = BlockReduce(count, false, scratch);  // synchronises: the table is complete
    inv_count = count > 0.f ? 1.f / count : 0.f;
  }
  for (int t = threadIdx.x; !s.warp && t < map_h + map_w; t += blockDim.x) {
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
  float *out = s.out + p * out_w + (s.flip && !s.warp ? out_w - 1 - q : q);
  for (int c = threadIdx.x; c < num_classes; c += blockDim.x) out[c * stride] = 0.f;
  __syncthreads();
  const float *lg = logits + s.in_offset;
  const int32_t *ids = class_ids + s.in_offset;
  for (int64_t e = threadIdx.x; e < entries; e += blockDim.x) {
    const int cell = static_cast<int>(e % cells);
    const int a = cell / map_w, b = cell % map_w;
    const float w = s.warp ? table[cell] * inv_count : wa[a] * wb[b] * keep - ra[a] * rb[b] * drop;
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

cudaEvent_t AsEvent(void *event) { return static_cast<cudaEvent_t>(event); }

}  // namespace

template <>
void LabelPooling<GPUBackend>::CheckLimits() const {
  const int64_t n = static_cast<int64_t>(batch_.samples.size());
  if (n == 0) return;
  const int64_t bins = static_cast<int64_t>(params_.out_h()) * params_.out_w();
  DALI_ENFORCE(n * bins <= kMaxBlocks, ::dali::make_string(
      "relabel.label_pooling (GPU): batch size ", n, " x output_size (", params_.out_h(), ", ",
      params_.out_w(), ") = ", n * bins, " thread blocks, more than CUDA's limit of ", kMaxBlocks,
      " per launch; use a smaller output_size or batch size"));
  const size_t shared = SharedBytes(batch_.map_h, batch_.map_w, batch_.any_warp);
  const int max_sum = static_cast<int>((kMaxSharedBytes / sizeof(float) - kScratchSlots) / 2);
  const int max_cells = static_cast<int>(kMaxSharedBytes / sizeof(float) - kScratchSlots);
  const int64_t cells = static_cast<int64_t>(batch_.map_h) * batch_.map_w;
  DALI_ENFORCE(!batch_.any_warp || cells <= max_cells, ::dali::make_string(
      "relabel.label_pooling (GPU): with a geometric transform (argument 'affine' or 'canvas_checks'), "
      "the label map (input 'logits', [k, H, W] with H = ", batch_.map_h, ", W = ", batch_.map_w, ") needs ",
      (cells + kScratchSlots) * sizeof(float), " bytes of shared memory per thread block, more than the ", kMaxSharedBytes, "-byte (48 KB) "
      "limit; H * W may be at most ", max_cells, " on the GPU (the CPU backend has no such limit)"));
  DALI_ENFORCE(shared <= kMaxSharedBytes, ::dali::make_string(
      "relabel.label_pooling (GPU): the label map (input 'logits', [k, H, W] with H = ", batch_.map_h,
      ", W = ", batch_.map_w, ") needs ", shared, " bytes of shared memory per thread block, more "
      "than the ", kMaxSharedBytes, "-byte (48 KB) limit; H + W may be at most ", max_sum,
      " on the GPU (the CPU backend has no such limit)"));
}

template <>
LabelPooling<GPUBackend>::~LabelPooling() {
  if (staging_device_ < 0) return;  // never ran: nothing was allocated
  try {
    // The buffers and events belong to the device they were made on, which need not be the
    // current one on the thread that destroys the pipeline.
    ::dali::DeviceGuard guard(staging_device_);
    for (StagingSlot &slot : staging_) {
      // Errors are ignored: a destructor must not throw (the driver may be shutting down at exit).
      if (slot.done) {
        (void)cudaEventSynchronize(AsEvent(slot.done));  // its kernel may still read the slot
        (void)cudaEventDestroy(AsEvent(slot.done));
      }
      if (slot.host) (void)cudaFreeHost(slot.host);
      if (slot.device) (void)cudaFree(slot.device);
      slot = StagingSlot{};
    }
  } catch (...) {
    // DeviceGuard throws if the device cannot be selected any more; nothing left to free then.
  }
  (void)cudaGetLastError();  // leave no error behind for the next CUDA call on this thread
}

template <>
void LabelPooling<GPUBackend>::RunImpl(::dali::Workspace &ws) {
  auto &output = ws.Output<GPUBackend>(0);
  const int n = static_cast<int>(batch_.samples.size());
  if (n == 0) return;
  const int64_t entries = batch_.entries_per_sample;
  const size_t samples_bytes = AlignUp(n * sizeof(PoolingSample));
  const size_t logits_bytes = AlignUp(n * entries * sizeof(float));
  const size_t ids_bytes = AlignUp(n * entries * sizeof(int32_t));
  const size_t bytes = samples_bytes + logits_bytes + ids_bytes + batch_.checks.size() * sizeof(float);
  if (staging_device_ < 0) CUDA_CALL(cudaGetDevice(&staging_device_));
  StagingSlot &slot = staging_[next_slot_];
  if (!slot.done) {
    cudaEvent_t event;
    CUDA_CALL(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
    slot.done = event;
  }
  // Wait only for the kernel that last read this slot (two batches ago); the other slot's upload
  // and kernel (the previous batch) keep running while this batch is packed.
  CUDA_CALL(cudaEventSynchronize(AsEvent(slot.done)));
  if (bytes > slot.bytes) {
    // Free first, then allocate; the slot records a capacity only once both allocations exist, so a
    // failed allocation leaves an empty slot that the next run allocates again.
    void *old_host = slot.host, *old_device = slot.device;
    slot = StagingSlot{nullptr, nullptr, 0, slot.done};
    if (old_host) CUDA_CALL(cudaFreeHost(old_host));
    if (old_device) CUDA_CALL(cudaFree(old_device));
    const size_t capacity = bytes + bytes / 2;
    void *host = nullptr, *device = nullptr;
    CUDA_CALL(cudaMallocHost(&host, capacity));
    const cudaError_t status = cudaMalloc(&device, capacity);
    if (status != cudaSuccess) cudaFreeHost(host);
    CUDA_CALL(status);
    slot.host = host;
    slot.device = device;
    slot.bytes = capacity;
  }
  char *host = static_cast<char *>(slot.host);
  char *device = static_cast<char *>(slot.device);
  auto *samples = reinterpret_cast<PoolingSample *>(host);
  auto *logits = reinterpret_cast<float *>(host + samples_bytes);
  auto *ids = reinterpret_cast<int32_t *>(host + samples_bytes + logits_bytes);
  // The canvas checks follow the class ids; each sample points at its own in the device copy.
  const size_t checks_at = samples_bytes + logits_bytes + ids_bytes;
  if (!batch_.checks.empty())
    std::memcpy(host + checks_at, batch_.checks.data(), batch_.checks.size() * sizeof(float));
  const float *device_checks = reinterpret_cast<const float *>(device + checks_at);
  for (int i = 0; i < n; i++) {
    samples[i] = batch_.samples[i];
    samples[i].out = output.mutable_tensor<float>(i);
    WarpSampling &sampling = samples[i].sampling;
    sampling.checks = sampling.num_checks > 0 ? device_checks + sampling.check_offset : nullptr;
    params_.ReadValues(ws, i, entries, logits + i * entries, ids + i * entries);
  }
  cudaStream_t stream = ws.stream();
  CUDA_CALL(cudaMemcpyAsync(device, host, bytes, cudaMemcpyHostToDevice, stream));
  const unsigned blocks = static_cast<unsigned>(n) * params_.out_h() * params_.out_w();  // CheckLimits
  const size_t weight_floats = WeightFloats(batch_.map_h, batch_.map_w, batch_.any_warp);
  LabelPoolingKernel<<<blocks, kBlock, SharedBytes(batch_.map_h, batch_.map_w, batch_.any_warp), stream>>>(
      reinterpret_cast<const PoolingSample *>(device),
      reinterpret_cast<const float *>(device + samples_bytes),
      reinterpret_cast<const int32_t *>(device + samples_bytes + logits_bytes), batch_.map_h,
      batch_.map_w, entries, params_.num_classes(), params_.out_h(), params_.out_w(),
      params_.transposed(), 1.f / params_.temperature(), params_.apply_softmax(),
      static_cast<int>(weight_floats));
  CUDA_CALL(cudaGetLastError());
  // After the kernel, not the copy: the kernel reads the device half of the slot.
  CUDA_CALL(cudaEventRecord(AsEvent(slot.done), stream));
  next_slot_ ^= 1;
}

}  // namespace dali_relabel

DALI_REGISTER_OPERATOR(relabel__LabelPooling, ::dali_relabel::LabelPooling<::dali::GPUBackend>,
                       ::dali::GPU);
