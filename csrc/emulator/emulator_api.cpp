// C entry points of the emulated kernels for ctypes (tests/test_cross_modal_linear_cuda_emulated.py):
// the launchers of csrc/cross_modal_linear.cu called with host pointers. dtype: 0 fp32, 1 bf16,
// 2 fp16; math: 0 FFMA, 1 tf32 (fp32 only).
#include <cstdint>

#include "cross_modal_linear.h"

using namespace m2pt_cuda;

extern "C" {

void emu_forward(int64_t M, int64_t N, int64_t K, const void* x, int64_t sx_m, int64_t sx_k, const void* w,
                 const void* w2, const float* lam, int per_channel, const void* bias, void* y, int dtype, int math) {
  ForwardArgs a;
  a.M = M; a.N = N; a.K = K; a.x = x; a.sx_m = sx_m; a.sx_k = sx_k; a.w = w; a.w2 = w2; a.lam = lam;
  a.lam_per_channel = per_channel != 0; a.bias = bias; a.y = y;
  launch_forward(a, static_cast<DType>(dtype), static_cast<Fp32Math>(math), nullptr);
}

void emu_dgrad(int64_t M, int64_t N, int64_t K, const void* dy, int64_t sdy_m, int64_t sdy_n, const void* w,
               const void* w2, const float* lam, int per_channel, void* dx, int dtype, int math) {
  DgradArgs a;
  a.M = M; a.N = N; a.K = K; a.dy = dy; a.sdy_m = sdy_m; a.sdy_n = sdy_n; a.w = w; a.w2 = w2; a.lam = lam;
  a.lam_per_channel = per_channel != 0; a.dx = dx;
  launch_dgrad(a, static_cast<DType>(dtype), static_cast<Fp32Math>(math), nullptr);
}

void emu_wgrad(int64_t M, int64_t N, int64_t K, const void* dy, int64_t sdy_m, int64_t sdy_n, const void* x,
               int64_t sx_m, int64_t sx_k, const void* w2, const float* lam, int per_channel, void* dw, void* dw2,
               float* dlam, float* dlam_partial, void* db, int dtype, int math) {
  WgradArgs a;
  a.M = M; a.N = N; a.K = K; a.dy = dy; a.sdy_m = sdy_m; a.sdy_n = sdy_n; a.x = x; a.sx_m = sx_m; a.sx_k = sx_k;
  a.w2 = w2; a.lam = lam; a.lam_per_channel = per_channel != 0; a.dw = dw; a.dw2 = dw2; a.dlam = dlam;
  a.dlam_partial = dlam_partial; a.db = db;
  launch_wgrad(a, static_cast<DType>(dtype), static_cast<Fp32Math>(math), nullptr);
}

}  // extern "C"
