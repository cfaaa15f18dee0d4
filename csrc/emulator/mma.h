// Emulator stand-in for <mma.h>: nvcuda::wmma on the host. Every lane holds the whole tile (the
// lanes of a warp compute the same values), which is enough to check the kernels' indexing: which
// shared-memory element lands in which row/column of a product. Products are computed in fp32 from
// the fragment's element type, like the tensor cores do.
#pragma once
#include <cstdint>
#include <cstring>

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}

template <typename Use, int M, int N, int K> struct shape;
template <int M, int N, int K> struct shape<matrix_a, M, N, K> { static constexpr int R = M, C = K; };
template <int M, int N, int K> struct shape<matrix_b, M, N, K> { static constexpr int R = K, C = N; };
template <int M, int N, int K> struct shape<accumulator, M, N, K> { static constexpr int R = M, C = N; };

template <typename T> struct storage { using type = T; };
template <> struct storage<precision::tf32> { using type = float; };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int R = shape<Use, M, N, K>::R;
  static constexpr int C = shape<Use, M, N, K>::C;
  static constexpr int num_elements = R * C;
  typename storage<T>::type x[R * C];
};

inline float emu_to_float(float v) { return v; }
inline float emu_to_float(__half v) { return __half2float(v); }
inline float emu_to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename Use, int M, int N, int K, typename T, typename L, typename P>
void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const P* p, unsigned ldm) {
  static_assert(!std::is_same<L, col_major>::value, "the emulator implements row_major operands only");
  for (int r = 0; r < f.R; ++r)
    for (int c = 0; c < f.C; ++c) f.x[r * f.C + c] = p[r * ldm + c];
}

template <int M, int N, int K, typename T>
void fill_fragment(fragment<accumulator, M, N, K, T>& f, float v) {
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = v;
}

template <int M, int N, int K, typename TA, typename TB, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float s = c.x[i * N + j];
      for (int k = 0; k < K; ++k) s += emu_to_float(a.x[i * K + k]) * emu_to_float(b.x[k * N + j]);
      out[i * N + j] = s;
    }
  std::memcpy(d.x, out, sizeof(out));
}

template <int M, int N, int K, typename T>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout) {
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) {
      if (layout == mem_row_major) p[r * ldm + c] = f.x[r * N + c];
      else p[c * ldm + r] = f.x[r * N + c];
    }
}

inline float __float_to_tf32(float v) {  // round to nearest, 10 explicit mantissa bits
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u = (u + 0x1000u) & 0xffffe000u;
  std::memcpy(&v, &u, 4);
  return v;
}
}  // namespace wmma
}  // namespace nvcuda
