// HSTU attention in CUDA C++ for Hopper (sm_90): the host interface of the kernels.
//
// Plain C++ with the CUDA runtime only (no torch headers), so that CI compiles every .cu
// of this folder with nvcc alone; hstu_binding.cpp adapts torch tensors to these calls.
//
// Semantics are those of gauss_kernels.hstu.triton_kernels (and of the reference,
// gauss_plugins.hstu.attention.hstu_attention_reference) for the modes these kernels take:
// causal masking, optional per-sequence num_targets, an optional relative position-bias
// table, and the max_seq_len or seq_len normaliser. Per sequence b and head h:
//
//   s   = alpha * q k^T + position_bias[id(j) - id(i) + pos_center]
//   p   = silu(s) * valid(i, j) * scale            (scale = 1 / max_seq_len or 1 / n_b)
//   out = p v
//
// with id(x) = min(x, last), last = n_b - num_targets[b], and valid(i, j) =
// i < n_b && j < n_b && (i == j || id(i) > id(j)).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace gauss_hstu {

enum class DType : int { kBFloat16 = 0, kFloat16 = 1 };

struct Params {
  // [T, H, D] contiguous, in `dtype`
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* grad_out = nullptr;  // backward only
  void* out = nullptr;             // forward: out; backward: unused
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  const int64_t* offsets = nullptr;      // [B + 1]
  const int64_t* num_targets = nullptr;  // [B] or null
  const float* position_bias = nullptr;  // [pos_table_size] fp32 or null
  float* dposition_rows = nullptr;       // [B * H, pos_table_size] fp32, zeroed; null: no table gradient
  int B = 0;
  int H = 0;
  int D = 0;  // 64 or 128 (d_qk == d_v)
  int max_seq_len = 0;
  int pos_center = 0;      // (pos_table_size - 1) / 2: the entry of id(j) == id(i)
  int pos_table_size = 0;  // position_bias entries (>= 2 * max_seq_len - 1)
  float alpha = 1.f;
  bool scale_by_seq_len = false;  // normaliser "seq_len" (else "max_seq_len")
  DType dtype = DType::kBFloat16;
  cudaStream_t stream = nullptr;
};

// Each returns cudaSuccess, or the launch error (cudaErrorInvalidValue for a head dim or
// dtype the kernels were not built for).
cudaError_t hstu_forward(const Params& p);
cudaError_t hstu_backward_dq(const Params& p);
cudaError_t hstu_backward_dkdv(const Params& p);

}  // namespace gauss_hstu
