// Device helpers shared by the HSTU attention kernels (hstu_fwd.cu, hstu_bwd_dq.cu,
// hstu_bwd_dkdv.cu): tile loads with cp.async into swizzled shared memory, ldmatrix
// fragments, mma.sync m16n8k16 (bf16 / fp16 in, fp32 accumulate), the mask and the
// position-bias index. See hstu_api.h for the semantics.
//
// Every kernel has the same shape: a CTA of NW warps owns BM = 16 * MT * NW "rows" (queries
// in the forward and dQ kernels, keys in dK/dV), each warp 16 * MT of them, and loops over tiles
// of BN "columns" (keys, or queries for dK/dV) streamed through a two-stage cp.async
// pipeline. S = A B^T takes A (16 MT x D per warp) and B (BN x D) from shared memory; the
// product P B (P the warp's 16 MT x BN scores in registers) takes B transposed by ldmatrix.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "hstu_api.h"

namespace gauss_hstu {

constexpr int kWarpSize = 32;
// max_seq_len up to which the kernels use 16 rows per warp (more, smaller CTAs)
constexpr int kShortSeqLen = 256;

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

// acc[m][BN / 8][4] += A[rows a_row0 + 16 m .., :D] * B[:BN, :D]^T for the warp's MT row
// tiles of 16; A and B swizzled tiles in shared memory. Each B fragment feeds MT products:
// at MT = 1 every warp re-reads the whole B tile per 16 rows, and shared-memory bandwidth,
// not the tensor cores, bounds the kernel.
template <typename T, int D, int BN, int MT>
__device__ __forceinline__ void mma_abt(float (&acc)[MT][BN / 8][4], const T* a_tile, int a_row0, const T* b_tile) {
  const int lane = threadIdx.x % kWarpSize;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[MT][4];
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      ldmatrix_x4(a[m], a_tile + swizzle<D>(a_row0 + m * 16 + (lane & 15), kk * 16 + (lane >> 4) * 8));
    }
#pragma unroll
    for (int np = 0; np < BN / 16; ++np) {
      uint32_t b[4];
      ldmatrix_x4(b, b_tile + swizzle<D>(np * 16 + (lane & 7) + (lane >> 4) * 8, kk * 16 + ((lane >> 3) & 1) * 8));
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        mma16816<T>(acc[m][2 * np], a[m], b[0], b[1]);
        mma16816<T>(acc[m][2 * np + 1], a[m], b[2], b[3]);
      }
    }
  }
}

// acc[m][D / 8][4] += P_m[16, BN] * B[BN, D]: P packed as A fragments p[m][BN / 16][4], B a
// swizzled tile read transposed
template <typename T, int D, int BN, int MT>
__device__ __forceinline__ void mma_pb(float (&acc)[MT][D / 8][4], const uint32_t (&p)[MT][BN / 16][4],
                                       const T* b_tile) {
  const int lane = threadIdx.x % kWarpSize;
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) {
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, b_tile + swizzle<D>(kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, dp * 16 + (lane >> 4) * 8));
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        mma16816<T>(acc[m][2 * dp], p[m][kk], b[0], b[1]);
        mma16816<T>(acc[m][2 * dp + 1], p[m][kk], b[2], b[3]);
      }
    }
  }
}

// C fragments of MT 16 x BN fp32 tiles -> A fragments (input dtype) for the next product
template <typename T, int BN, int MT>
__device__ __forceinline__ void pack_a(uint32_t (&p)[MT][BN / 16][4], const float (&s)[MT][BN / 8][4]) {
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      p[m][kk][0] = TypeTraits<T>::pack(s[m][2 * kk][0], s[m][2 * kk][1]);
      p[m][kk][1] = TypeTraits<T>::pack(s[m][2 * kk][2], s[m][2 * kk][3]);
      p[m][kk][2] = TypeTraits<T>::pack(s[m][2 * kk + 1][0], s[m][2 * kk + 1][1]);
      p[m][kk][3] = TypeTraits<T>::pack(s[m][2 * kk + 1][2], s[m][2 * kk + 1][3]);
    }
  }
}

template <int MT, int N>
__device__ __forceinline__ void zero(float (&x)[MT][N][4]) {
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int i = 0; i < N; ++i) x[m][i][0] = x[m][i][1] = x[m][i][2] = x[m][i][3] = 0.f;
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

// The position-bias entries one tile can use, staged in shared memory. A (query i, key j)
// pair reads entry id(j) - id(i) + pos_center; for queries [q0, q0 + qn) and keys
// [k0, k0 + kn) those lie in [base, base + qn + kn - 1) (ids are clamped positions), so each
// tile loads qn + kn - 1 entries once instead of gathering one per pair from global memory.
// Entries outside the table (only pairs past the sequence, masked, can reach them) read 0.
struct PositionWindow {
  float* entries;  // shared memory, >= qn + kn floats
  int base;

  __device__ __forceinline__ static int first(int q0, int qn, int k0, const Sequence& s, int pos_center) {
    return min(k0, s.last) - min(q0 + qn - 1, s.last) + pos_center;
  }

  // every thread of the CTA; visible after the next __syncthreads
  template <int THREADS>
  __device__ __forceinline__ void load(const Params& p, int q0, int qn, int k0, int kn, const Sequence& s) {
    base = first(q0, qn, k0, s, p.pos_center);
    for (int e = threadIdx.x; e < qn + kn - 1; e += THREADS) {
      const int index = base + e;
      entries[e] = index >= 0 && index < p.pos_table_size ? __ldg(p.position_bias + index) : 0.f;
    }
  }

  __device__ __forceinline__ int offset(int i, int j, const Sequence& s, int pos_center) const {
    return min(j, s.last) - min(i, s.last) + pos_center - base;
  }
};

// Is every pair of (queries [q0, q0 + QN), keys [k0, k0 + KN)) valid by causality alone
// (no masking needed)? Keys all strictly before the queries, everything inside the
// sequence, and no key at or past `last` (two targets never see each other).
__device__ __forceinline__ bool tile_unmasked(int q0, int qn, int k0, int kn, const Sequence& s) {
  return k0 + kn <= q0 && q0 + qn <= s.n && k0 + kn <= s.last;
}

}  // namespace gauss_hstu
