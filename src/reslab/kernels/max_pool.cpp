// 2x2, stride-2 max-pooling for channels-last CPU tensors, with a one-byte argmax.
//
// PyTorch's max_pool2d_with_indices keeps an int64 index per output (as much memory as a float64
// copy of the output), and its backward first zero-fills the whole input gradient and then
// scatters into it: three passes where one does. Here the forward writes the maximum and its
// position in the window (0..3, row-major) as uint8; the backward writes every input-gradient
// element exactly once (the gradient at the argmax, zero elsewhere). The windows do not overlap,
// so nothing accumulates. Ties and NaNs follow PyTorch's CPU kernel: a later element replaces the
// current maximum when it is greater or NaN, so the first of equal maxima and the last NaN win.
// Tensors are seen as (N, H, W, C), which is what channels-last memory is. An odd height or width
// drops its last row or column, as PyTorch's default (floor) mode does; its gradient is zero.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define RESLAB_POOL_AVX512 1
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace {

// Compared as float (double for double); a bfloat16 maximum converts back exactly (truncation
// of a value that came from bfloat16 loses nothing).
inline float value(const float* p) { return *p; }
inline double value(const double* p) { return *p; }
inline float value(const at::BFloat16* p) {
  uint32_t bits = static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(p)) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline void put(float* p, float v) { *p = v; }
inline void put(double* p, double v) { *p = v; }
inline void put(at::BFloat16* p, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  *reinterpret_cast<uint16_t*>(p) = static_cast<uint16_t>(bits >> 16);
}

#if defined(RESLAB_POOL_AVX512)
// 16 channels at once: float lanes, argmax bytes; the same rule as the scalar loop.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(at::BFloat16* p, __m512 v) {
  const __m512i bits = _mm512_srli_epi32(_mm512_castps_si512(v), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bits));
}

template <typename T>
inline int64_t max4_simd(const T* const* p, T* y, uint8_t* idx, int64_t C) {
  int64_t c = 0;
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16>) {
    for (; c + 16 <= C; c += 16) {
      __m512 best = load16(p[0] + c);
      __m128i k = _mm_setzero_si128();
      for (int j = 1; j < 4; ++j) {
        const __m512 v = load16(p[j] + c);
        const __mmask16 take = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ) |
                               _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        best = _mm512_mask_mov_ps(best, take, v);
        k = _mm_mask_mov_epi8(k, take, _mm_set1_epi8(static_cast<char>(j)));
      }
      store16(y + c, best);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(idx + c), k);
    }
  }
  return c;
}
#endif

void check_nhwc(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 4 && t.is_contiguous(),
              what, " must be a contiguous (N, H, W, C) CPU tensor");
}

template <typename T>
void forward_impl(const at::Tensor& x, at::Tensor& y, at::Tensor& idx) {
  const int64_t N = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  const int64_t OH = H / 2, OW = W / 2;
  const T* xp = x.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  uint8_t* ip = idx.data_ptr<uint8_t>();
  at::parallel_for(0, N * OH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / OH, oh = r % OH;
      for (int64_t ow = 0; ow < OW; ++ow) {
        const T* p[4];
        p[0] = xp + ((n * H + 2 * oh) * W + 2 * ow) * C;
        p[1] = p[0] + C;
        p[2] = p[0] + W * C;
        p[3] = p[2] + C;
        T* yo = yp + (r * OW + ow) * C;
        uint8_t* io = ip + (r * OW + ow) * C;
        int64_t c0 = 0;
#if defined(RESLAB_POOL_AVX512)
        c0 = max4_simd<T>(p, yo, io, C);
#endif
        for (int64_t c = c0; c < C; ++c) {
          auto best = value(p[0] + c);
          uint8_t k = 0;
          for (uint8_t j = 1; j < 4; ++j) {
            const auto v = value(p[j] + c);
            const bool take = v > best || v != v;  // v != v: NaN
            best = take ? v : best;
            k = take ? j : k;
          }
          put(yo + c, best);
          io[c] = k;
        }
      }
    }
  });
}

// The gradient is moved, never computed with: copy its bits (2, 4 or 8 bytes per element).
template <typename Bits>
void backward_impl(const at::Tensor& g, const at::Tensor& idx, at::Tensor& dx) {
  const int64_t N = dx.size(0), H = dx.size(1), W = dx.size(2), C = dx.size(3);
  const int64_t OH = H / 2, OW = W / 2;
  const Bits* gp = reinterpret_cast<const Bits*>(g.data_ptr());
  const uint8_t* ip = idx.data_ptr<uint8_t>();
  Bits* dp = reinterpret_cast<Bits*>(dx.data_ptr());
  const size_t pixel = C * sizeof(Bits);
  at::parallel_for(0, N * OH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / OH, oh = r % OH;
      // what the windows do not cover: the last column of these two rows (odd W), and the last
      // row of the image (odd H), written by the task that owns its last window row
      if (W % 2) {
        std::memset(dp + ((n * H + 2 * oh) * W + W - 1) * C, 0, pixel);
        std::memset(dp + ((n * H + 2 * oh + 1) * W + W - 1) * C, 0, pixel);
      }
      if (H % 2 && oh == OH - 1) std::memset(dp + ((n * H + H - 1) * W) * C, 0, W * pixel);
      for (int64_t ow = 0; ow < OW; ++ow) {
        const Bits* go = gp + (r * OW + ow) * C;
        const uint8_t* io = ip + (r * OW + ow) * C;
        Bits* d[4];
        d[0] = dp + ((n * H + 2 * oh) * W + 2 * ow) * C;
        d[1] = d[0] + C;
        d[2] = d[0] + W * C;
        d[3] = d[2] + C;
        for (int j = 0; j < 4; ++j) {
          Bits* out = d[j];
          int64_t c = 0;
#if defined(RESLAB_POOL_AVX512)
          if constexpr (sizeof(Bits) == 2) {
            for (; c + 32 <= C; c += 32) {
              const __m256i k = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(io + c));
              const __mmask32 at = _mm256_cmpeq_epi8_mask(k, _mm256_set1_epi8(static_cast<char>(j)));
              _mm512_storeu_si512(out + c, _mm512_maskz_mov_epi16(at, _mm512_loadu_si512(go + c)));
            }
          } else if constexpr (sizeof(Bits) == 4) {
            for (; c + 16 <= C; c += 16) {
              const __m128i k = _mm_loadu_si128(reinterpret_cast<const __m128i*>(io + c));
              const __mmask16 at = _mm_cmpeq_epi8_mask(k, _mm_set1_epi8(static_cast<char>(j)));
              _mm512_storeu_si512(out + c, _mm512_maskz_mov_epi32(at, _mm512_loadu_si512(go + c)));
            }
          }
#endif
          for (; c < C; ++c) out[c] = io[c] == j ? go[c] : Bits(0);
        }
      }
    }
  });
}

}  // namespace

std::vector<at::Tensor> max_pool2x2_forward(const at::Tensor& x) {
  check_nhwc(x, "x");
  TORCH_CHECK(x.size(1) >= 2 && x.size(2) >= 2, "height and width must be at least 2");
  auto y = at::empty({x.size(0), x.size(1) / 2, x.size(2) / 2, x.size(3)}, x.options());
  auto idx = at::empty(y.sizes(), x.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "max_pool2x2_forward", [&] {
    forward_impl<scalar_t>(x, y, idx);
  });
  return {y, idx};
}

at::Tensor max_pool2x2_backward(const at::Tensor& g, const at::Tensor& idx, int64_t height,
                                int64_t width) {
  check_nhwc(g, "grad");
  check_nhwc(idx, "indices");
  TORCH_CHECK(idx.sizes() == g.sizes() && idx.scalar_type() == at::kByte,
              "indices must be uint8 and match grad");
  TORCH_CHECK(height / 2 == g.size(1) && width / 2 == g.size(2),
              "input size must be twice grad's (plus one for an odd side)");
  auto dx = at::empty({g.size(0), height, width, g.size(3)}, g.options());
  switch (g.element_size()) {
    case 2: backward_impl<uint16_t>(g, idx, dx); break;
    case 4: backward_impl<uint32_t>(g, idx, dx); break;
    case 8: backward_impl<uint64_t>(g, idx, dx); break;
    default: TORCH_CHECK(false, "unsupported gradient dtype ", g.scalar_type());
  }
  return dx;
}
