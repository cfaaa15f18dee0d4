// Launchers of the CUDA kernels of m2pt::cross_modal_linear (math: the op's docstring in
// m2pt_kernels/ops/cross_modal_linear.py). Host code in cross_modal_linear_api.cpp checks every
// argument before calling these; the launchers only pick a kernel and launch it on `stream`.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace m2pt_cuda {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// How fp32 inputs are multiplied: tensor-core tf32 (torch.get_float32_matmul_precision() != "highest")
// or plain fp32 FFMA. Ignored for bf16 / fp16 (always tensor cores, fp32 accumulation).
enum class Fp32Math : int { kFFMA = 0, kTF32 = 1 };

// C[Mg, Ng] = A[Mg, Kg] · B[Kg, Ng] with generic strides (elements), all indices 64-bit.
//   A(i, k) = a[i * sa_i + k * sa_k]
//   B(k, j) = b[k * sb_k + j * sb_j] (+ lam[k * lam_k + j * lam_j] * b2[same offset] when b2 != nullptr)
// b2 != nullptr is the fused merge W + λ·W' formed while loading the tile (never written to memory).
// lam: fp32; lam_k / lam_j are 0 or 1 (λ of shape [1] has both 0).
struct GemmArgs {
  int64_t Mg = 0, Ng = 0, Kg = 0;
  const void* a = nullptr;
  int64_t sa_i = 0, sa_k = 0;
  const void* b = nullptr;
  const void* b2 = nullptr;
  int64_t sb_k = 0, sb_j = 0;
  const float* lam = nullptr;
  int64_t lam_k = 0, lam_j = 0;
  // Epilogue. c: [Mg, Ng] with row stride ldc (contiguous rows). Which fields are used depends on
  // the launcher (forward: c, bias; dgrad: c; wgrad: see launch_wgrad).
  void* c = nullptr;
  int64_t ldc = 0;
  const void* bias = nullptr;   // forward: [Ng]
  void* c2 = nullptr;           // wgrad: dW' = λ[i]·G (optional)
  const void* aux = nullptr;    // wgrad: W' [Mg, Ng] contiguous, for the dλ partials
  float* dlam_partial = nullptr;// wgrad: [ceil(Ng/BN), Mg] fp32 per-block partials of Σ_k G⊙W'
  int64_t lam_i = 0;            // wgrad: λ index stride over rows (0 or 1) for dW'
  void* rowsum = nullptr;       // wgrad: db[i] = Σ_k A(i, k) (A = dyᵀ), fused, optional
  // Set by the launcher: the operand is loaded with 16-byte vectors along its contiguous dim
  // (a: columns = k when a_fast_col, else rows = i; b: columns = j when b_fast_col, else rows = k).
  bool a_vec = false, a_fast_col = true;
  bool b_vec = false, b_fast_col = true;
};

// Tile of the tensor-core / FFMA GEMM kernel (rows, cols, reduction step); used by the host to size
// the dλ partial buffer.
constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kTileK = 32;
// Token count up to which the forward and the dgrad use the memory-bound GEMV kernels (fp32: FFMA
// whatever Fp32Math says).
constexpr int64_t kGemvMaxM = 64;

// y[M, N] = x · (W + λW')ᵀ + b. x: [M, K] strided (sx_m, sx_k); W, W': [N, K] contiguous; y contiguous.
struct ForwardArgs {
  int64_t M = 0, N = 0, K = 0;
  const void* x = nullptr;
  int64_t sx_m = 0, sx_k = 0;
  const void* w = nullptr;
  const void* w2 = nullptr;
  const float* lam = nullptr;
  bool lam_per_channel = false;
  const void* bias = nullptr;
  void* y = nullptr;
};

void launch_forward(const ForwardArgs& args, DType dtype, Fp32Math math, cudaStream_t stream);

// dx[M, K] = dy · (W + λW'). dy: [M, N] strided; W, W': [N, K] contiguous; dx contiguous.
struct DgradArgs {
  int64_t M = 0, N = 0, K = 0;
  const void* dy = nullptr;
  int64_t sdy_m = 0, sdy_n = 0;
  const void* w = nullptr;
  const void* w2 = nullptr;
  const float* lam = nullptr;
  bool lam_per_channel = false;
  void* dx = nullptr;
};

void launch_dgrad(const DgradArgs& args, DType dtype, Fp32Math math, cudaStream_t stream);

// G = dyᵀ·x [N, K]; dW = G, dW' = λ·G, dλ = Σ_k G⊙W' (per channel, or summed when λ is [1]),
// db = Σ_m dy. Outputs that are nullptr are not computed; when none of dW, dW', dλ is asked for
// the GEMM is skipped entirely.
struct WgradArgs {
  int64_t M = 0, N = 0, K = 0;
  const void* dy = nullptr;
  int64_t sdy_m = 0, sdy_n = 0;
  const void* x = nullptr;
  int64_t sx_m = 0, sx_k = 0;
  const void* w2 = nullptr;  // W' [N, K] contiguous (needed for dλ)
  const float* lam = nullptr;
  bool lam_per_channel = false;
  void* dw = nullptr;          // [N, K] input dtype
  void* dw2 = nullptr;         // [N, K] input dtype
  float* dlam = nullptr;       // [N] or [1] fp32
  float* dlam_partial = nullptr;  // workspace [ceil(K / kTileN), N] fp32 (when dlam != nullptr)
  void* db = nullptr;          // [N] input dtype
};

void launch_wgrad(const WgradArgs& args, DType dtype, Fp32Math math, cudaStream_t stream);

}  // namespace m2pt_cuda
