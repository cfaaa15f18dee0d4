// Host emulation of the CUDA execution model, just enough to run csrc/cross_modal_linear.cu's
// kernels on the CPU for tests (tests/test_cross_modal_linear_cuda_emulated.py): every CUDA thread
// of a block is a std::thread, blocks run one after another (so `static` stands in for __shared__),
// __syncthreads is a block barrier, __shfl_xor_sync exchanges through a per-warp barrier.
// Force-included (g++ -include) before the kernel source, whose launches `k<<<g, b, 0, s>>>(args)`
// are rewritten to `emu_launch(k, g, b, args)` by the test.
#pragma once
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <barrier>
#include <cmath>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#undef __global__
#undef __device__
#undef __forceinline__
#undef __shared__
#undef __restrict__
#undef __launch_bounds__
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __restrict__ __restrict
#define __launch_bounds__(...)

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

struct EmuBlock {
  std::unique_ptr<std::barrier<>> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<float> shfl;
};
inline EmuBlock* emu_block = nullptr;

inline void __syncthreads() { emu_block->block->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  const unsigned t = threadIdx.x;
  auto& bar = *emu_block->warps[t / 32];
  emu_block->shfl[t] = v;
  bar.arrive_and_wait();
  const float r = emu_block->shfl[(t & ~31u) | ((t & 31u) ^ static_cast<unsigned>(lane_mask))];
  bar.arrive_and_wait();
  return r;
}

template <typename... KArgs, typename... Args>
void emu_launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, Args&&... args) {
  gridDim = grid;
  blockDim = block;
  const unsigned n = block.x * block.y * block.z;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        EmuBlock b;
        b.block = std::make_unique<std::barrier<>>(n);
        for (unsigned w = 0; w < (n + 31) / 32; ++w)
          b.warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, n - 32 * w)));
        b.shfl.assign(n, 0.0f);
        emu_block = &b;
        std::vector<std::thread> threads;
        threads.reserve(n);
        for (unsigned t = 0; t < n; ++t)
          threads.emplace_back([&, t, bx, by, bz] {
            threadIdx = make_uint3(t, 0, 0);
            blockIdx = make_uint3(bx, by, bz);
            kernel(args...);
          });
        for (auto& th : threads) th.join();
        emu_block = nullptr;
      }
}
