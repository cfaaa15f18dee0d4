// CUDA kernels of m2pt::cross_modal_linear: forward, dgrad and wgrad of
//     y = x · (W + λ·W')ᵀ + b
// (the math and every gradient are written once, in the docstring of
// m2pt_kernels/ops/cross_modal_linear.py; the kernels cite it, they don't re-derive it).
//
// Kernels
//   gemm_kernel<T, MATH, EPI>   64x64x32 tiles, 128 threads (4 warps of 32x32), double buffering
//                               (the next tile's global loads are in flight while the current tile
//                               is multiplied from shared memory; one barrier per step): weights
//                               staged in registers (16-byte loads when aligned), activations by
//                               cp.async when 16-byte aligned along k (forward, dgrad), else staged.
//                               The merge W + λW' happens in fp32 while the weight tile is loaded
//                               and is rounded once to the input dtype in shared memory: the merged
//                               weight is never written to global memory.
//                               MATH: WMMA bf16/fp16 -> fp32 (sm_80+), WMMA tf32 -> fp32, or FFMA.
//                               EPI:  forward (+bias), plain store (dgrad), wgrad (dW, dW' = λ·G,
//                               per-block fp32 partials of dλ, db fused as row sums of dyᵀ).
//   gemv_forward_kernel<T, VEC> forward for M <= 64 tokens (memory-bound): one warp per output
//                               channel, 16-byte loads of W and W' (uint4) when aligned, else scalar.
//   gemv_dgrad_kernel<T, VEC>   dgrad for M <= 64 tokens (memory-bound): one block per 16 bytes of
//                               K columns, N split over its threads, fixed-order in-block reduction.
//                               Both GEMVs round the fp32 merge to T like the tiled kernel, and are
//                               FFMA for fp32 whatever the tf32 flag.
//   dlam_reduce_*               deterministic second pass over the dλ partials.
//   colsum_kernel               db alone (when no weight-sized gradient is needed).
//
// Every tile edge is bounds-checked (M = 1, K and N not multiples of the tile); all offsets are
// 64-bit; inputs x / dy may have arbitrary strides (the loader reads along the contiguous dim).
#include "cross_modal_linear.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <type_traits>

#include <c10/cuda/CUDAException.h>

namespace m2pt_cuda {
namespace {

using namespace nvcuda;

constexpr int BM = kTileM;
constexpr int BN = kTileN;
constexpr int BK = kTileK;
constexpr int kThreads = 128;
constexpr int kPerThread = BM * BK / kThreads;  // elements of the A tile (and of the B tile) per thread
static_assert(BK * BN / kThreads == kPerThread, "A and B tiles must have the same size");
static_assert(BM == 64 && BN == 64 && kThreads == 128, "the warp layout below assumes 2x2 warps of 32x32");

enum Math : int { kMath16 = 0, kMathTF32 = 1, kMathFFMA = 2 };
enum Epi : int { kEpiForward = 0, kEpiPlain = 1, kEpiWgrad = 2 };

// ---- conversions -----------------------------------------------------------------------------
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// ---- warp-level matrix multiply of one 64x64x32 shared-memory stage ---------------------------
// Warp w owns rows [32*(w/2), +32) and columns [32*(w%2), +32) of the block tile.
template <typename ST, int MATH> struct TileMma;

// WMMA on tensor cores, fp32 accumulators: fragments of 16x16xKF with elements of type FT
// (bf16 / fp16 with KF = 16; wmma::precision::tf32 with KF = 8, the fp32 tile rounded to tf32 after
// each fragment load).
template <typename ST, typename FT, int KF> struct WmmaTile {
  static constexpr bool kTf32 = std::is_same<FT, wmma::precision::tf32>::value;
  wmma::fragment<wmma::accumulator, 16, 16, KF, float> acc[2][2];
  __device__ __forceinline__ void init() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  }
  template <typename Frag> __device__ __forceinline__ static void to_tf32(Frag& f) {
    if constexpr (kTf32) {
#pragma unroll
      for (int t = 0; t < f.num_elements; ++t) f.x[t] = wmma::__float_to_tf32(f.x[t]);
    }
  }
  __device__ __forceinline__ void step(const ST* As, int lda, const ST* Bs, int ldb) {
    const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
#pragma unroll
    for (int kk = 0; kk < BK; kk += KF) {
      wmma::fragment<wmma::matrix_a, 16, 16, KF, FT, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, KF, FT, wmma::row_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        wmma::load_matrix_sync(a[i], As + (wm * 32 + i * 16) * lda + kk, lda);
        to_tf32(a[i]);
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::load_matrix_sync(b[j], Bs + kk * ldb + wn * 32 + j * 16, ldb);
        to_tf32(b[j]);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
  }
  __device__ __forceinline__ void store(float* Cs, int ldc) {
    const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(Cs + (wm * 32 + i * 16) * ldc + wn * 32 + j * 16, acc[i][j], ldc,
                                wmma::mem_row_major);
  }
};

template <typename ST> struct TileMma<ST, kMath16> : WmmaTile<ST, ST, 16> {};  // bf16 / fp16
template <> struct TileMma<float, kMathTF32> : WmmaTile<float, wmma::precision::tf32, 8> {};  // fp32 as tf32

template <> struct TileMma<float, kMathFFMA> {  // fp32 "highest": plain FFMA, 8x4 outputs per thread
  float acc[8][4];
  __device__ __forceinline__ void init() {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
  }
  // thread t: rows 8*(t/16) + i, columns (t%16) + 16*j
  __device__ __forceinline__ void step(const float* As, int lda, const float* Bs, int ldb) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll 4
    for (int kk = 0; kk < BK; ++kk) {
      float av[8], bv[4];
#pragma unroll
      for (int i = 0; i < 8; ++i) av[i] = As[(ty * 8 + i) * lda + kk];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = Bs[kk * ldb + tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
  }
  __device__ __forceinline__ void store(float* Cs, int ldc) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) Cs[(ty * 8 + i) * ldc + tx + 16 * j] = acc[i][j];
  }
};

// ---- 16-byte tile loads ----------------------------------------------------------------------------
template <typename T, int V>
__device__ __forceinline__ void load_vec(const T* ptr, float (&out)[V]) {
  if constexpr (V == 1) {
    out[0] = to_f(*ptr);
  } else {
    static_assert(V * sizeof(T) == 16, "vector loads are 16 bytes");
    const uint4 raw = *reinterpret_cast<const uint4*>(ptr);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int v = 0; v < V; ++v) out[v] = to_f(e[v]);
  }
}

// Thread tid's share of a ROWS x COLS operand tile with 16-byte loads: vector q = tid + u*kThreads
// covers V consecutive elements along the tile's memory-contiguous dim (its columns when fast_col,
// else its rows). The host guarantees (vector_layout): that dim has stride 1 and a global extent
// that is a multiple of V, the other stride is a multiple of V and the pointers are 16-byte aligned,
// so a vector whose first element is in bounds lies wholly in bounds.
template <int ROWS, int COLS, int V>
__device__ __forceinline__ void vec_coords(int u, bool fast_col, int& r, int& c) {
  const int q = threadIdx.x + u * kThreads;
  if (fast_col) {
    r = q / (COLS / V);
    c = (q % (COLS / V)) * V;
  } else {
    c = q / (ROWS / V);
    r = (q % (ROWS / V)) * V;
  }
}

// out[u*V + v] = element v of vector u (merged with λ·base2 when base2 != nullptr), 0 out of bounds.
template <typename T, int ROWS, int COLS>
__device__ __forceinline__ void load_tile_vec(float (&out)[kPerThread], bool fast_col, const T* __restrict__ base,
                                              const T* __restrict__ base2, int64_t slow_stride, int64_t row0,
                                              int64_t col0, int64_t rows, int64_t cols, const float* lam,
                                              int64_t lam_r, int64_t lam_c) {
  constexpr int V = int(16 / sizeof(T));
  static_assert(ROWS * COLS == kPerThread * kThreads && ROWS % V == 0 && COLS % V == 0, "tile shape");
#pragma unroll
  for (int u = 0; u < kPerThread / V; ++u) {
    int r, c;
    vec_coords<ROWS, COLS, V>(u, fast_col, r, c);
    const int64_t gr = row0 + r, gc = col0 + c;
    float w[V];
    if (gr < rows && gc < cols) {
      const int64_t off = fast_col ? gr * slow_stride + gc : gc * slow_stride + gr;
      load_vec<T, V>(base + off, w);
      if (base2 != nullptr) {  // W + λ·W'
        float a[V];
        load_vec<T, V>(base2 + off, a);
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const int64_t lr = gr + (fast_col ? 0 : v), lc = gc + (fast_col ? v : 0);
          w[v] = fmaf(lam[lr * lam_r + lc * lam_c], a[v], w[v]);
        }
      }
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v) w[v] = 0.0f;
    }
#pragma unroll
    for (int v = 0; v < V; ++v) out[u * V + v] = w[v];
  }
}

template <typename ST, int ROWS, int COLS, int LD>
__device__ __forceinline__ void store_tile_vec(const float (&in)[kPerThread], bool fast_col, ST* smem_tile) {
  constexpr int V = int(16 / sizeof(ST));
#pragma unroll
  for (int u = 0; u < kPerThread / V; ++u) {
    int r, c;
    vec_coords<ROWS, COLS, V>(u, fast_col, r, c);
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const int rr = r + (fast_col ? 0 : v), cc = c + (fast_col ? v : 0);
      smem_tile[rr * LD + cc] = from_f<ST>(in[u * V + v]);
    }
  }
}

// ---- cp.async (sm_80+) for the activation operand ----------------------------------------------------
// On the host side of the build (and in the CPU emulator) these are a plain synchronous copy / no-op.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src) : "memory");
#else
  *reinterpret_cast<uint4*>(smem_dst) = *reinterpret_cast<const uint4*>(gmem_src);
#endif
}

// Waits for all of this thread's cp.async copies; a __syncthreads() must follow before other threads
// read them.
__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// The ROWS x COLS tile at (row0, col0) of a row-major operand (columns contiguous) copied straight
// into shared memory, 16 bytes per cp.async, zeros outside the operand. Same preconditions as
// load_tile_vec with fast_col; each destination is 16-byte aligned (LD * sizeof(T) % 16 == 0).
template <typename T, int ROWS, int COLS, int LD>
__device__ __forceinline__ void async_tile_rows(T* smem_tile, const T* __restrict__ base, int64_t row_stride,
                                                int64_t row0, int64_t col0, int64_t rows, int64_t cols) {
  constexpr int V = int(16 / sizeof(T));
  static_assert((LD * sizeof(T)) % 16 == 0, "cp.async destinations must be 16-byte aligned");
#pragma unroll
  for (int u = 0; u < kPerThread / V; ++u) {
    int r, c;
    vec_coords<ROWS, COLS, V>(u, true, r, c);
    const int64_t gr = row0 + r, gc = col0 + c;
    T* dst = smem_tile + r * LD + c;
    if (gr < rows && gc < cols) {
      cp_async_16(dst, base + gr * row_stride + gc);
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v) dst[v] = from_f<T>(0.0f);
    }
  }
}

// ---- the tiled GEMM with fused merge and epilogues (see GemmArgs) ---------------------------------
template <typename T, int MATH, int EPI>
__global__ void __launch_bounds__(kThreads) gemm_kernel(const GemmArgs p) {
  using ST = T;  // shared-memory operand type: the input dtype (fp32 stays fp32; tf32 rounding in fragments)
  constexpr int PAD = sizeof(ST) == 2 ? 8 : 4;  // keeps WMMA's ldm a multiple of 16 bytes
  constexpr int LDA = BK + PAD;
  constexpr int LDB = BN + PAD;
  constexpr int LDC = BN + 4;
  constexpr int A_ELEMS = BM * LDA;
  constexpr int STAGE = A_ELEMS + BK * LDB;
  constexpr int PIPE_BYTES = 2 * STAGE * int(sizeof(ST));
  constexpr int C_BYTES = BM * LDC * int(sizeof(float));
  constexpr int SMEM_BYTES = PIPE_BYTES > C_BYTES ? PIPE_BYTES : C_BYTES;
  // WMMA pointers must be 32-byte aligned: every fragment offset below is a multiple of 32 bytes.
  static_assert((A_ELEMS * sizeof(ST)) % 32 == 0 && (STAGE * sizeof(ST)) % 32 == 0, "stage alignment");
  static_assert((16 * LDA * sizeof(ST)) % 32 == 0 && (16 * LDB * sizeof(ST)) % 32 == 0, "row alignment");
  static_assert((16 * LDC * sizeof(float)) % 32 == 0, "accumulator alignment");
  __shared__ __align__(128) unsigned char smem[SMEM_BYTES];
  ST* const stage0 = reinterpret_cast<ST*>(smem);
  float* const Cs = reinterpret_cast<float*>(smem);  // reused after the main loop

  const int tid = threadIdx.x;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;
  const T* __restrict__ A = static_cast<const T*>(p.a);
  const T* __restrict__ B = static_cast<const T*>(p.b);
  const T* __restrict__ B2 = static_cast<const T*>(p.b2);
  // Walk each tile along whichever dim is contiguous in memory, so a warp's loads coalesce.
  const bool a_k_fast = p.sa_k == 1 || p.sa_i != 1;
  const bool b_j_fast = p.sb_j == 1 || p.sb_k != 1;

  float ra[kPerThread], rb[kPerThread];

  // forward / dgrad: x or dy rows stream into shared memory by cp.async when they are 16-byte
  // loadable along k; the weight tile always goes through registers (the merge happens there).
  const bool a_async = EPI != kEpiWgrad && p.a_vec && p.a_fast_col;

  auto load_tile = [&](int64_t k0, int buf) {
    if (a_async) {
      async_tile_rows<T, BM, BK, LDA>(stage0 + buf * STAGE, A, p.sa_i, m0, k0, p.Mg, p.Kg);
    } else if (p.a_vec) {
      load_tile_vec<T, BM, BK>(ra, p.a_fast_col, A, nullptr, p.a_fast_col ? p.sa_i : p.sa_k, m0, k0, p.Mg, p.Kg,
                               nullptr, 0, 0);
    } else {
#pragma unroll
    for (int t = 0; t < kPerThread; ++t) {
      const int e = tid + t * kThreads;
      const int r = a_k_fast ? e / BK : e % BM;
      const int c = a_k_fast ? e % BK : e / BM;
      const int64_t gi = m0 + r, gk = k0 + c;
      ra[t] = (gi < p.Mg && gk < p.Kg) ? to_f(A[gi * p.sa_i + gk * p.sa_k]) : 0.0f;
    }
    }
    if (p.b_vec) {
      load_tile_vec<T, BK, BN>(rb, p.b_fast_col, B, B2, p.b_fast_col ? p.sb_k : p.sb_j, k0, n0, p.Kg, p.Ng, p.lam,
                               p.lam_k, p.lam_j);
    } else {
#pragma unroll
    for (int t = 0; t < kPerThread; ++t) {
      const int e = tid + t * kThreads;
      const int kk = b_j_fast ? e / BN : e % BK;
      const int jj = b_j_fast ? e % BN : e / BK;
      const int64_t gk = k0 + kk, gj = n0 + jj;
      float v = 0.0f;
      if (gk < p.Kg && gj < p.Ng) {
        const int64_t off = gk * p.sb_k + gj * p.sb_j;
        v = to_f(B[off]);
        if (B2 != nullptr) v = fmaf(p.lam[gk * p.lam_k + gj * p.lam_j], to_f(B2[off]), v);  // W + λ·W'
      }
      rb[t] = v;
    }
    }
  };
  auto store_tile = [&](int buf) {
    ST* As = stage0 + buf * STAGE;
    ST* Bs = As + A_ELEMS;
    if (a_async) {
      // already on its way to shared memory
    } else if (p.a_vec) {
      store_tile_vec<ST, BM, BK, LDA>(ra, p.a_fast_col, As);
    } else {
#pragma unroll
      for (int t = 0; t < kPerThread; ++t) {  // the scalar load's mapping
        const int e = tid + t * kThreads;
        const int r = a_k_fast ? e / BK : e % BM;
        const int c = a_k_fast ? e % BK : e / BM;
        As[r * LDA + c] = from_f<ST>(ra[t]);
      }
    }
    if (p.b_vec) {
      store_tile_vec<ST, BK, BN, LDB>(rb, p.b_fast_col, Bs);
    } else {
#pragma unroll
      for (int t = 0; t < kPerThread; ++t) {
        const int e = tid + t * kThreads;
        const int kk = b_j_fast ? e / BN : e % BK;
        const int jj = b_j_fast ? e % BN : e / BK;
        Bs[kk * LDB + jj] = from_f<ST>(rb[t]);
      }
    }
  };

  TileMma<ST, MATH> mma;
  mma.init();
  // wgrad: db = Σ_m dy, fused as the row sums of A = dyᵀ, by the blocks of the first column tile.
  const bool do_rowsum = EPI == kEpiWgrad && p.rowsum != nullptr && blockIdx.y == 0 && tid < BM;
  float rowsum = 0.0f;

  const int64_t num_k = (p.Kg + BK - 1) / BK;
  if (num_k > 0) {
    load_tile(0, 0);
    store_tile(0);
  }
  if (a_async) cp_async_wait_all();
  __syncthreads();
  for (int64_t kt = 0; kt < num_k; ++kt) {
    const int cur = static_cast<int>(kt & 1);
    const bool has_next = kt + 1 < num_k;
    if (has_next) load_tile((kt + 1) * BK, cur ^ 1);  // in flight during the math below
    const ST* As = stage0 + cur * STAGE;
    const ST* Bs = As + A_ELEMS;
    mma.step(As, LDA, Bs, LDB);
    if (do_rowsum) {
#pragma unroll 8
      for (int c = 0; c < BK; ++c) rowsum += to_f(As[tid * LDA + c]);
    }
    // The other buffer was last read in step kt-1, which every thread finished before the barrier
    // that ended it, so it can be overwritten now (by the cp.async above and the stores here); the
    // wait + barrier below publish it for step kt+1.
    if (has_next) store_tile(cur ^ 1);
    if (a_async) cp_async_wait_all();
    __syncthreads();
  }

  mma.store(Cs, LDC);  // every read of the stage buffers finished at the last barrier
  __syncthreads();

  if (do_rowsum && m0 + tid < p.Mg) static_cast<T*>(p.rowsum)[m0 + tid] = from_f<T>(rowsum);

  const bool want_dlam = EPI == kEpiWgrad && p.dlam_partial != nullptr;
  for (int e = tid; e < BM * BN; e += kThreads) {
    const int r = e / BN, c = e % BN;
    const int64_t gi = m0 + r, gj = n0 + c;
    const bool in = gi < p.Mg && gj < p.Ng;
    const int64_t off = gi * p.ldc + gj;
    float v = Cs[r * LDC + c];
    if (EPI == kEpiForward) {
      if (in) {
        if (p.bias != nullptr) v += to_f(static_cast<const T*>(p.bias)[gj]);
        static_cast<T*>(p.c)[off] = from_f<T>(v);
      }
    } else if (EPI == kEpiPlain) {
      if (in) static_cast<T*>(p.c)[off] = from_f<T>(v);
    } else {  // wgrad: v = G[gi, gj]
      if (in) {
        if (p.c != nullptr) static_cast<T*>(p.c)[off] = from_f<T>(v);                              // dW
        if (p.c2 != nullptr) static_cast<T*>(p.c2)[off] = from_f<T>(p.lam[gi * p.lam_i] * v);     // dW'
      }
      if (want_dlam) Cs[r * LDC + c] = in ? v * to_f(static_cast<const T*>(p.aux)[off]) : 0.0f;  // G⊙W'
    }
  }
  if (want_dlam) {  // uniform over the block
    __syncthreads();
    if (tid < BM && m0 + tid < p.Mg) {
      float s = 0.0f;  // fixed order: deterministic
      for (int c = 0; c < BN; ++c) s += Cs[tid * LDC + c];
      p.dlam_partial[static_cast<int64_t>(blockIdx.y) * p.Mg + m0 + tid] = s;
    }
  }
}

// ---- forward for few tokens: memory-bound GEMV over the merged weight ---------------------------
constexpr int kGemvThreads = 256;
constexpr int kGemvWarps = kGemvThreads / 32;
constexpr int kGemvRows = 8;  // tokens per pass (accumulators per lane)

// W + λ·W' in fp32, rounded once to the input dtype and widened back: the merged weight the
// reference (merged_weight) and the tiled kernel (which rounds it into shared memory) multiply by.
// A no-op rounding for fp32.
template <typename T>
__device__ __forceinline__ float merge_rounded(float w, float lam, float a) {
  return to_f(from_f<T>(fmaf(lam, a, w)));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// VEC: W, W' and x rows are 16-byte aligned, K % V == 0 and x is contiguous along K (host checks).
template <typename T, bool VEC>
__global__ void __launch_bounds__(kGemvThreads) gemv_forward_kernel(const ForwardArgs p) {
  constexpr int V = VEC ? int(16 / sizeof(T)) : 1;
  const int lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kGemvWarps + threadIdx.x / 32;
  if (n >= p.N) return;  // the whole warp leaves together: the shuffles below see 32 lanes
  const T* __restrict__ w = static_cast<const T*>(p.w) + n * p.K;
  const T* __restrict__ w2 = static_cast<const T*>(p.w2) + n * p.K;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const float lam = p.lam[p.lam_per_channel ? n : 0];
  const float b = p.bias != nullptr ? to_f(static_cast<const T*>(p.bias)[n]) : 0.0f;
  T* __restrict__ y = static_cast<T*>(p.y);

  for (int64_t m0 = 0; m0 < p.M; m0 += kGemvRows) {
    float acc[kGemvRows];
#pragma unroll
    for (int i = 0; i < kGemvRows; ++i) acc[i] = 0.0f;
    for (int64_t k = static_cast<int64_t>(lane) * V; k < p.K; k += 32 * V) {
      float wv[V], av[V];
      load_vec<T, V>(w + k, wv);
      load_vec<T, V>(w2 + k, av);
#pragma unroll
      for (int v = 0; v < V; ++v) wv[v] = merge_rounded<T>(wv[v], lam, av[v]);  // W + λ·W' in registers
#pragma unroll
      for (int i = 0; i < kGemvRows; ++i) {
        if (m0 + i < p.M) {
          float xv[V];
          load_vec<T, V>(x + (m0 + i) * p.sx_m + k * p.sx_k, xv);
#pragma unroll
          for (int v = 0; v < V; ++v) acc[i] = fmaf(xv[v], wv[v], acc[i]);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kGemvRows; ++i) {
      const float s = warp_sum(acc[i]);
      if (lane == 0 && m0 + i < p.M) y[(m0 + i) * p.N + n] = from_f<T>(s + b);
    }
  }
}

// ---- dgrad for few tokens: memory-bound GEMV-T over the merged weight ---------------------------
// dx[m, k] = Σ_n dy[m, n] · (W + λ_n·W')[n, k] for M <= kGemvMaxM. Block b owns the C = 16 / sizeof(T)
// columns [b·C, +C) of dx: one 16-byte vector of each W / W' row (contiguous along K). Its 256
// threads form TG token groups x RG = 256 / TG row groups (thread t: token group t % TG, row group
// t / TG): thread (g, r) accumulates dx[g·R + i, the C columns] (i < R = 8: R·C fp32 registers)
// over the rows n = r, r + RG, ... . TG = the smallest power of two with TG·R >= M, so W and W' are
// read once per block whatever M (≤ 64): the TG lanes of a row load the same vectors (one request)
// and each forms the merge itself. The row groups are then summed in a fixed order (warp butterfly,
// then the 8 warps' sums in order from shared memory): deterministic, no atomics.
constexpr int kDgradThreads = 256;
constexpr int kDgradWarps = kDgradThreads / 32;
constexpr int kDgradTokens = 8;  // R: tokens per thread (R·C fp32 accumulators: 64 for bf16/fp16, 32 for fp32)

// VEC: W and W' 16-byte aligned and K % kCols == 0 (host checks), so each row's kCols columns are one
// uint4; otherwise the same columns are read one by one with a bounds check (K not a multiple of C).
// dy: any strides (scalar loads; each block reads all of dy once, an L2-resident M x N <= 64 x N).
template <typename T, bool VEC>
__global__ void __launch_bounds__(kDgradThreads) gemv_dgrad_kernel(const DgradArgs p, int tg_count) {
  constexpr int C = int(16 / sizeof(T));   // columns per block (one 16-byte vector per row)
  constexpr int R = kDgradTokens;
  static_assert(kDgradWarps * 32 == kDgradThreads && 32 % (kGemvMaxM / R) == 0 && kGemvMaxM % R == 0,
                "TG <= kGemvMaxM / R token groups cover the tokens, and TG divides a warp");
  __shared__ float red[kDgradWarps][kGemvMaxM * C];  // per warp: its row groups' sums, [token][column]

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int tg = tid % tg_count;            // token group: tokens [tg·R, +R)
  const int rg = tid / tg_count;            // row group: rows rg, rg + rows_step, ...
  const int64_t rows_step = kDgradThreads / tg_count;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * C;
  const int64_t m0 = static_cast<int64_t>(tg) * R;
  const T* __restrict__ w = static_cast<const T*>(p.w);
  const T* __restrict__ w2 = static_cast<const T*>(p.w2);
  const T* __restrict__ dy = static_cast<const T*>(p.dy);

  float acc[R][C];
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int c = 0; c < C; ++c) acc[i][c] = 0.0f;

  if (m0 < p.M) {  // else this thread's tokens are all past M (it still joins the reductions below)
    for (int64_t n = rg; n < p.N; n += rows_step) {
      const int64_t off = n * p.K + k0;
      float wv[C], av[C];
      if (VEC) {
        load_vec<T, C>(w + off, wv);
        load_vec<T, C>(w2 + off, av);
      } else {
#pragma unroll
        for (int c = 0; c < C; ++c) {
          const bool in = k0 + c < p.K;
          wv[c] = in ? to_f(w[off + c]) : 0.0f;
          av[c] = in ? to_f(w2[off + c]) : 0.0f;
        }
      }
      const float lam = p.lam[p.lam_per_channel ? n : 0];  // λ of the reduction index n
#pragma unroll
      for (int c = 0; c < C; ++c) wv[c] = merge_rounded<T>(wv[c], lam, av[c]);
#pragma unroll
      for (int i = 0; i < R; ++i) {
        if (m0 + i < p.M) {
          const float d = to_f(dy[(m0 + i) * p.sdy_m + n * p.sdy_n]);
#pragma unroll
          for (int c = 0; c < C; ++c) acc[i][c] = fmaf(d, wv[c], acc[i][c]);
        }
      }
    }
  }

  // Sum over the warp's lanes of the same token group (lane % TG equal; TG divides 32), fixed order.
  for (int o = 16; o >= tg_count; o >>= 1) {
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
      for (int c = 0; c < C; ++c) acc[i][c] += __shfl_xor_sync(0xffffffffu, acc[i][c], o);
  }
  if (lane < tg_count) {  // lane == tg: the warp's sums for tokens [tg·R, +R)
#pragma unroll
    for (int i = 0; i < R; ++i)
      if (m0 + i < p.M)
#pragma unroll
        for (int c = 0; c < C; ++c) red[warp][(m0 + i) * C + c] = acc[i][c];
  }
  __syncthreads();
  T* __restrict__ dx = static_cast<T*>(p.dx);
  for (int e = tid; e < p.M * C; e += kDgradThreads) {
    const int64_t m = e / C, k = k0 + e % C;
    float s = 0.0f;
#pragma unroll
    for (int v = 0; v < kDgradWarps; ++v) s += red[v][e];  // warps in order: deterministic
    if (k < p.K) dx[m * p.K + k] = from_f<T>(s);
  }
}

// ---- small reductions ------------------------------------------------------------------------
// dλ[n] = Σ_t partial[t, n] (λ per channel), in a fixed order.
__global__ void dlam_reduce_per_channel_kernel(const float* __restrict__ partial, int64_t tiles, int64_t n_total,
                                               float* __restrict__ out) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= n_total) return;
  float s = 0.0f;
  for (int64_t t = 0; t < tiles; ++t) s += partial[t * n_total + n];
  out[n] = s;
}

constexpr int kReduceThreads = 256;

// dλ[0] = Σ_t Σ_n partial[t, n] (one λ), one block, fixed-order tree: deterministic.
__global__ void __launch_bounds__(kReduceThreads)
dlam_reduce_scalar_kernel(const float* __restrict__ partial, int64_t count, float* __restrict__ out) {
  __shared__ float red[kReduceThreads];
  float s = 0.0f;
  for (int64_t i = threadIdx.x; i < count; i += kReduceThreads) s += partial[i];
  red[threadIdx.x] = s;
  __syncthreads();
  for (int w = kReduceThreads / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) red[threadIdx.x] += red[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = red[0];
}

// db[n] = Σ_m dy[m, n] when no weight-sized gradient is computed (else it is fused in the GEMM).
template <typename T>
__global__ void colsum_kernel(const T* __restrict__ dy, int64_t M, int64_t N, int64_t s_m, int64_t s_n,
                              T* __restrict__ db) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= N) return;
  float s = 0.0f;
  for (int64_t m = 0; m < M; ++m) s += to_f(dy[m * s_m + n * s_n]);
  db[n] = from_f<T>(s);
}

// ---- launch helpers ----------------------------------------------------------------------------
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned16(const void* ptr) { return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Can a [rows, cols] operand with strides (s_row, s_col) be loaded with V-element (16-byte) vectors
// along its contiguous dim? (see load_tile_vec) Sets fast_col to that dim.
bool vector_layout(const void* ptr, const void* ptr2, int64_t s_row, int64_t s_col, int64_t rows, int64_t cols,
                   int64_t V, bool& fast_col) {
  if (!aligned16(ptr) || !aligned16(ptr2)) return false;
  if (s_col == 1 && cols % V == 0 && s_row % V == 0) {
    fast_col = true;
    return true;
  }
  if (s_row == 1 && rows % V == 0 && s_col % V == 0) {
    fast_col = false;
    return true;
  }
  return false;
}

template <typename T, int MATH, int EPI>
void launch_gemm_t(GemmArgs g, cudaStream_t stream) {
  constexpr int64_t V = 16 / sizeof(T);
  g.a_vec = vector_layout(g.a, nullptr, g.sa_i, g.sa_k, g.Mg, g.Kg, V, g.a_fast_col);
  g.b_vec = vector_layout(g.b, g.b2, g.sb_k, g.sb_j, g.Kg, g.Ng, V, g.b_fast_col);
  const dim3 grid(static_cast<unsigned>(ceil_div(g.Mg, BM)), static_cast<unsigned>(ceil_div(g.Ng, BN)));
  gemm_kernel<T, MATH, EPI><<<grid, kThreads, 0, stream>>>(g);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int EPI>
void launch_gemm(const GemmArgs& g, DType dtype, Fp32Math math, cudaStream_t stream) {
  switch (dtype) {
    case DType::kBFloat16: launch_gemm_t<__nv_bfloat16, kMath16, EPI>(g, stream); break;
    case DType::kFloat16: launch_gemm_t<__half, kMath16, EPI>(g, stream); break;
    case DType::kFloat32:
      if (math == Fp32Math::kTF32) launch_gemm_t<float, kMathTF32, EPI>(g, stream);
      else launch_gemm_t<float, kMathFFMA, EPI>(g, stream);
      break;
  }
}

template <typename T>
void launch_gemv_t(const ForwardArgs& a, cudaStream_t stream) {
  constexpr int V = int(16 / sizeof(T));
  const bool vec = a.K % V == 0 && aligned16(a.w) && aligned16(a.w2) && aligned16(a.x) && a.sx_k == 1 &&
                   a.sx_m % V == 0;
  const dim3 grid(static_cast<unsigned>(ceil_div(a.N, kGemvWarps)));
  if (vec) gemv_forward_kernel<T, true><<<grid, kGemvThreads, 0, stream>>>(a);
  else gemv_forward_kernel<T, false><<<grid, kGemvThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_gemv_dgrad_t(const DgradArgs& a, cudaStream_t stream) {
  constexpr int C = int(16 / sizeof(T));
  constexpr int R = kDgradTokens;
  int tg = 1;  // token groups: the smallest power of two covering M (divides 32 and 256)
  while (tg * R < a.M) tg *= 2;
  const bool vec = a.K % C == 0 && aligned16(a.w) && aligned16(a.w2);
  const dim3 grid(static_cast<unsigned>(ceil_div(a.K, C)));
  if (vec) gemv_dgrad_kernel<T, true><<<grid, kDgradThreads, 0, stream>>>(a, tg);
  else gemv_dgrad_kernel<T, false><<<grid, kDgradThreads, 0, stream>>>(a, tg);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_forward(const ForwardArgs& a, DType dtype, Fp32Math math, cudaStream_t stream) {
  if (a.M <= kGemvMaxM) {
    switch (dtype) {
      case DType::kBFloat16: launch_gemv_t<__nv_bfloat16>(a, stream); break;
      case DType::kFloat16: launch_gemv_t<__half>(a, stream); break;
      case DType::kFloat32: launch_gemv_t<float>(a, stream); break;
    }
    return;
  }
  GemmArgs g;  // C = y [M, N], A = x [M, K], B(k, n) = W[n, k] + λ[n]·W'[n, k]
  g.Mg = a.M; g.Ng = a.N; g.Kg = a.K;
  g.a = a.x; g.sa_i = a.sx_m; g.sa_k = a.sx_k;
  g.b = a.w; g.b2 = a.w2; g.sb_k = 1; g.sb_j = a.K;
  g.lam = a.lam; g.lam_k = 0; g.lam_j = a.lam_per_channel ? 1 : 0;
  g.c = a.y; g.ldc = a.N; g.bias = a.bias;
  launch_gemm<kEpiForward>(g, dtype, math, stream);
}

void launch_dgrad(const DgradArgs& a, DType dtype, Fp32Math math, cudaStream_t stream) {
  if (a.M <= kGemvMaxM) {  // FFMA in fp32 whatever `math` says (memory-bound: tf32 would gain nothing)
    switch (dtype) {
      case DType::kBFloat16: launch_gemv_dgrad_t<__nv_bfloat16>(a, stream); break;
      case DType::kFloat16: launch_gemv_dgrad_t<__half>(a, stream); break;
      case DType::kFloat32: launch_gemv_dgrad_t<float>(a, stream); break;
    }
    return;
  }
  GemmArgs g;  // C = dx [M, K], A = dy [M, N], B(n, k) = W[n, k] + λ[n]·W'[n, k]
  g.Mg = a.M; g.Ng = a.K; g.Kg = a.N;
  g.a = a.dy; g.sa_i = a.sdy_m; g.sa_k = a.sdy_n;
  g.b = a.w; g.b2 = a.w2; g.sb_k = a.K; g.sb_j = 1;
  g.lam = a.lam; g.lam_k = a.lam_per_channel ? 1 : 0; g.lam_j = 0;
  g.c = a.dx; g.ldc = a.K;
  launch_gemm<kEpiPlain>(g, dtype, math, stream);
}

void launch_wgrad(const WgradArgs& a, DType dtype, Fp32Math math, cudaStream_t stream) {
  const bool gemm = a.dw != nullptr || a.dw2 != nullptr || a.dlam != nullptr;
  if (gemm) {
    GemmArgs g;  // C = G [N, K], A(n, m) = dy[m, n], B(m, k) = x[m, k]
    g.Mg = a.N; g.Ng = a.K; g.Kg = a.M;
    g.a = a.dy; g.sa_i = a.sdy_n; g.sa_k = a.sdy_m;
    g.b = a.x; g.b2 = nullptr; g.sb_k = a.sx_m; g.sb_j = a.sx_k;
    g.c = a.dw; g.c2 = a.dw2; g.ldc = a.K;
    g.lam = a.lam; g.lam_i = a.lam_per_channel ? 1 : 0;
    g.aux = a.w2;
    g.dlam_partial = a.dlam != nullptr ? a.dlam_partial : nullptr;
    g.rowsum = a.db;
    launch_gemm<kEpiWgrad>(g, dtype, math, stream);
    if (a.dlam != nullptr) {
      const int64_t tiles = ceil_div(a.K, BN);
      if (a.lam_per_channel) {
        dlam_reduce_per_channel_kernel<<<static_cast<unsigned>(ceil_div(a.N, 256)), 256, 0, stream>>>(
            a.dlam_partial, tiles, a.N, a.dlam);
      } else {
        dlam_reduce_scalar_kernel<<<1, kReduceThreads, 0, stream>>>(a.dlam_partial, tiles * a.N, a.dlam);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  } else if (a.db != nullptr) {
    const unsigned blocks = static_cast<unsigned>(ceil_div(a.N, 256));
    switch (dtype) {
      case DType::kBFloat16:
        colsum_kernel<__nv_bfloat16><<<blocks, 256, 0, stream>>>(static_cast<const __nv_bfloat16*>(a.dy), a.M,
            a.N, a.sdy_m, a.sdy_n, static_cast<__nv_bfloat16*>(a.db));
        break;
      case DType::kFloat16:
        colsum_kernel<__half><<<blocks, 256, 0, stream>>>(static_cast<const __half*>(a.dy), a.M, a.N, a.sdy_m,
            a.sdy_n, static_cast<__half*>(a.db));
        break;
      case DType::kFloat32:
        colsum_kernel<float><<<blocks, 256, 0, stream>>>(static_cast<const float*>(a.dy), a.M, a.N, a.sdy_m,
            a.sdy_n, static_cast<float*>(a.db));
        break;
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace m2pt_cuda
