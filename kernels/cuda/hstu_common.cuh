// Device helpers shared by the HSTU attention kernels (hstu_fwd.cu, hstu_bwd_dq.cu,
// hstu_bwd_dkdv.cu): tile loads with cp.async into swizzled shared memory, ldmatrix
// fragments, mma.sync m16n8k16 (bf16 / fp16 in, fp32 accumulate), the mask and the
// position-bias index. See hstu_api.h for the semantics.
//
// Every kernel has the same shape: a CTA of NW warps owns BM = 16 * NW "rows" (queries in
// the forward and dQ kernels, keys in dK/dV), each warp 16 of them, and loops over tiles
// of BN "columns" (keys, or queries for dK/dV) streamed through a two-stage cp.async
// pipeline. S = A B^T takes A (16 x D per warp) and B (BN x D) from shared memory; the
// product P B (P the warp's 16 x BN scores in registers) takes B transposed by ldmatrix.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "hstu_api.h"

namespace gauss_hstu {

constexpr int kWarpSize = 32;

template <typename T>
struct TypeTraits;
template <>
struct TypeTraits<__nv_bfloat16> {
  __device__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};
template <>
struct TypeTraits<__half> {
  __device__ static uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

// d += a * b for one m16n8k16 tile (fp32 accumulators)
template <typename T>
__device__ __forceinline__ void mma16816(float* d, const uint32_t* a, uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* smem) {
  uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const void* smem) {
  uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// 16 bytes global -> shared; src_bytes = 0 writes zeros (rows past the sequence), so a
// masked element multiplies finite values
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// One special-function instruction; its ~2^-11 relative error is below bf16/fp16 rounding
// of the scores it feeds (the Triton backend uses the same instruction).
__device__ __forceinline__ float tanh_approx(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Shared-memory tile of ROWS x D elements, row-major, 16-byte chunks XOR-swizzled by the
// row (chunk c of row r lives at chunk c ^ (r & 7)): ldmatrix reads 8 consecutive rows of
// one chunk, which then fall in 8 different bank groups instead of one.
template <int D>
__device__ __forceinline__ int swizzle(int row, int col) {
  return row * D + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7);
}

// Rows [row0, row0 + ROWS) of one head of a [T, H, D] tensor (rows >= n read as zeros)
template <typename T, int ROWS, int D, int THREADS>
__device__ __forceinline__ void load_tile(T* smem, const T* base, int64_t seq_start, int row0, int n, int stride_t) {
  constexpr int kChunks = D / 8;
#pragma unroll
  for (int idx = threadIdx.x; idx < ROWS * kChunks; idx += THREADS) {
    const int r = idx / kChunks;
    const int c = idx % kChunks;
    const int row = row0 + r;
    const bool inside = row < n;
    const T* src = base + (seq_start + (inside ? row : 0)) * static_cast<int64_t>(stride_t) + c * 8;
    cp_async_16(smem + swizzle<D>(r, c * 8), src, inside ? 16 : 0);
  }
}

// acc[BN / 8][4] += A[warp rows, :D] * B[:BN, :D]^T, A and B swizzled tiles in shared memory
template <typename T, int D, int BN>
__device__ __forceinline__ void mma_abt(float (*acc)[4], const T* a_tile, int a_row0, const T* b_tile) {
  const int lane = threadIdx.x % kWarpSize;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4];
    ldmatrix_x4(a, a_tile + swizzle<D>(a_row0 + (lane & 15), kk * 16 + (lane >> 4) * 8));
#pragma unroll
    for (int np = 0; np < BN / 16; ++np) {
      uint32_t b[4];
      ldmatrix_x4(b, b_tile + swizzle<D>(np * 16 + (lane & 7) + (lane >> 4) * 8, kk * 16 + ((lane >> 3) & 1) * 8));
      mma16816<T>(acc[2 * np], a, b[0], b[1]);
      mma16816<T>(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// Same with the A fragments already in registers (a[D / 16][4])
template <typename T, int D, int BN>
__device__ __forceinline__ void mma_abt_regs(float (*acc)[4], const uint32_t (*a)[4], const T* b_tile) {
  const int lane = threadIdx.x % kWarpSize;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
    for (int np = 0; np < BN / 16; ++np) {
      uint32_t b[4];
      ldmatrix_x4(b, b_tile + swizzle<D>(np * 16 + (lane & 7) + (lane >> 4) * 8, kk * 16 + ((lane >> 3) & 1) * 8));
      mma16816<T>(acc[2 * np], a[kk], b[0], b[1]);
      mma16816<T>(acc[2 * np + 1], a[kk], b[2], b[3]);
    }
  }
}

// A fragments of the warp's 16 rows of a swizzled tile (a[D / 16][4])
template <int D>
__device__ __forceinline__ void load_a_frags(uint32_t (*a)[4], const void* tile_v, int a_row0) {
  const auto* tile = static_cast<const uint16_t*>(tile_v);
  const int lane = threadIdx.x % kWarpSize;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    ldmatrix_x4(a[kk], tile + swizzle<D>(a_row0 + (lane & 15), kk * 16 + (lane >> 4) * 8));
  }
}

// acc[D / 8][4] += P[16, BN] * B[BN, D]: P packed as A fragments p[BN / 16][4], B a swizzled
// tile read transposed
template <typename T, int D, int BN>
__device__ __forceinline__ void mma_pb(float (*acc)[4], const uint32_t (*p)[4], const T* b_tile) {
  const int lane = threadIdx.x % kWarpSize;
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) {
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, b_tile + swizzle<D>(kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, dp * 16 + (lane >> 4) * 8));
      mma16816<T>(acc[2 * dp], p[kk], b[0], b[1]);
      mma16816<T>(acc[2 * dp + 1], p[kk], b[2], b[3]);
    }
  }
}

// C fragments of a 16 x BN fp32 tile -> A fragments (input dtype) for the next product
template <typename T, int BN>
__device__ __forceinline__ void pack_a(uint32_t (*p)[4], const float (*s)[4]) {
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) {
    p[kk][0] = TypeTraits<T>::pack(s[2 * kk][0], s[2 * kk][1]);
    p[kk][1] = TypeTraits<T>::pack(s[2 * kk][2], s[2 * kk][3]);
    p[kk][2] = TypeTraits<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    p[kk][3] = TypeTraits<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
  }
}

// The sequence a CTA works on
struct Sequence {
  int64_t start;
  int n;     // length
  int last;  // id of the first target (n when there are none)
  float scale;
};

__device__ __forceinline__ Sequence sequence(const Params& p, int b) {
  Sequence s;
  s.start = p.offsets[b];
  s.n = static_cast<int>(p.offsets[b + 1] - s.start);
  s.last = s.n - (p.num_targets != nullptr ? static_cast<int>(p.num_targets[b]) : 0);
  s.scale = p.scale_by_seq_len ? 1.f / static_cast<float>(s.n) : 1.f / static_cast<float>(p.max_seq_len);
  return s;
}

// Query i attends to key j (both positions in one sequence): the causal mask of
// gauss_plugins.hstu.attention.attention_mask with targets (ids clamp at `last`)
__device__ __forceinline__ bool valid(int i, int j, const Sequence& s) {
  const int ri = min(i, s.last);
  const int cj = min(j, s.last);
  return i < s.n && j < s.n && (i == j || ri > cj);
}

// Index of (query i, key j) in the position table; clamped for pairs past the sequence
// (masked, but their load must stay inside the table)
__device__ __forceinline__ int position_index(int i, int j, const Sequence& s, int pos_center) {
  const int index = min(j, s.last) - min(i, s.last) + pos_center;
  return min(max(index, 0), 2 * pos_center);
}

// Is every pair of (queries [q0, q0 + QN), keys [k0, k0 + KN)) valid by causality alone
// (no masking needed)? Keys all strictly before the queries, everything inside the
// sequence, and no key at or past `last` (two targets never see each other).
__device__ __forceinline__ bool tile_unmasked(int q0, int qn, int k0, int kn, const Sequence& s) {
  return k0 + kn <= q0 && q0 + qn <= s.n && k0 + kn <= s.last;
}

}  // namespace gauss_hstu
