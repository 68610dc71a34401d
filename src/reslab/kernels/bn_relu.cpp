// Fused training-mode BatchNorm + (residual add) + ReLU for channels-last CPU tensors.
//
// PyTorch runs BN, the residual addition and ReLU as separate kernels, each a full pass over the
// activation in memory, and the backward the same again (threshold_backward, then BN's two
// passes). On a small CPU these passes are a third of a ResNet-20 training step. Here:
//   forward : pass 1 per-channel sums of x;  pass 2 y = relu(x * scale + shift [+ r])
//   backward: pass 1 per-channel sums of g' = g * [y > 0] and g' * (x - mean);
//             pass 2 dx = w * invstd * (g' - mean(g') - xhat * mean(g' * xhat)), and dr = g'
//             when there is a residual
// The tensors are seen as (M, C) rows, M = N*H*W, which is what channels-last memory is.
// Accumulation is in float per block of rows and in double across blocks and threads; float and
// bfloat16 tensors run 16 channels at a time in AVX-512 registers where the compiler targets it.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

// Element access: float and double as themselves, bfloat16 through its bit pattern (bf16 -> f32
// is a shift; f32 -> bf16 rounds to nearest even; activations are finite).
template <typename T> struct Elem {
  using acc = T;
  static inline acc load(const T* p) { return *p; }
  static inline void store(T* p, acc v) { *p = v; }
};

template <> struct Elem<at::BFloat16> {
  using acc = float;
  static inline float load(const at::BFloat16* p) {
    uint32_t bits = static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(p)) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
  static inline void store(at::BFloat16* p, float v) {
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof bits);
    bits += 0x7FFFu + ((bits >> 16) & 1u);
    *reinterpret_cast<uint16_t*>(p) = static_cast<uint16_t>(bits >> 16);
  }
};

// The kernels are written once against a "lanes" interface: Scalar (one channel at a time, any
// type, any machine) and, where the compiler targets AVX-512, Simd16 (16 float lanes, for float
// and bfloat16 tensors). Channels [0, C - C % 16) go through Simd16, the rest through Scalar.
template <typename T> struct Scalar {
  using A = typename Elem<T>::acc;
  using vec = A;
  static constexpr int64_t lanes = 1;
  static inline vec load(const T* p) { return Elem<T>::load(p); }
  static inline vec param(const A* p) { return *p; }
  static inline void store(T* p, vec v) { Elem<T>::store(p, v); }
  static inline vec zero() { return A(0); }
  static inline vec add(vec a, vec b) { return a + b; }
  static inline vec sub(vec a, vec b) { return a - b; }
  static inline vec mul(vec a, vec b) { return a * b; }
  static inline vec relu(vec v) { return v > A(0) ? v : A(0); }
  static inline vec where_pos(vec cond, vec v) { return cond > A(0) ? v : A(0); }  // cond > 0 ? v : 0
  static inline void accumulate(double* out, vec v) { *out += v; }
};

#if defined(__AVX512F__)
template <typename T> struct Simd16 {
  using A = float;
  using vec = __m512;
  static constexpr int64_t lanes = 16;
  static inline vec load(const float* p) { return _mm512_loadu_ps(p); }
  static inline vec load(const at::BFloat16* p) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  }
  static inline vec param(const float* p) { return _mm512_loadu_ps(p); }
  static inline void store(float* p, vec v) { _mm512_storeu_ps(p, v); }
  static inline void store(at::BFloat16* p, vec v) {
    __m512i b = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    b = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(b, 16)));
  }
  static inline vec zero() { return _mm512_setzero_ps(); }
  static inline vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
  static inline vec sub(vec a, vec b) { return _mm512_sub_ps(a, b); }
  static inline vec mul(vec a, vec b) { return _mm512_mul_ps(a, b); }
  static inline vec relu(vec v) { return _mm512_max_ps(v, _mm512_setzero_ps()); }
  static inline vec where_pos(vec cond, vec v) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(cond, _mm512_setzero_ps(), _CMP_GT_OQ), v);
  }
  static inline void accumulate(double* out, vec v) {
    alignas(64) float t[16];
    _mm512_store_ps(t, v);
    for (int j = 0; j < 16; ++j) out[j] += t[j];
  }
};
template <typename T> constexpr bool kSimd = std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16>;
#else
template <typename T> constexpr bool kSimd = false;
#endif

// Run `fn(lanes_tag, c0, c1)` over the channel ranges each lane width covers.
template <typename T, typename Fn>
void by_lanes(int64_t C, const Fn& fn) {
  int64_t cv = 0;
#if defined(__AVX512F__)
  if constexpr (kSimd<T>) {
    cv = C - C % 16;
    if (cv > 0) fn(Simd16<T>{}, int64_t(0), cv);
  }
#endif
  if (cv < C) fn(Scalar<T>{}, cv, C);
}

// The saved mean and 1/std: double for double tensors (gradcheck), float otherwise.
template <typename T> using Stat = std::conditional_t<std::is_same_v<T, double>, double, float>;

// y = x * scale + shift folds BN; the forward and the backward both derive scale and shift from
// the saved (rounded) statistics with these expressions, so the ReLU mask recomputed in the
// backward is the forward's.
template <typename A, typename S>
void fold(const S* w, const S* b, const S* mean, const S* invstd, int64_t C, A* scale,
          A* shift) {
  for (int64_t c = 0; c < C; ++c) {
    const double k = static_cast<double>(w[c]) * static_cast<double>(invstd[c]);
    scale[c] = static_cast<A>(k);
    shift[c] = static_cast<A>(static_cast<double>(b[c]) - static_cast<double>(mean[c]) * k);
  }
}

constexpr int64_t kBlock = 64;   // rows summed in float before going to double
constexpr int64_t kUnroll = 4;   // independent accumulators per channel group (hides add latency)

// Both drivers take `group(lanes, c)`, called once per group of channels c .. c + lanes, which
// loads that group's per-channel constants and returns the per-element function: the constants
// then stay in registers across the rows instead of being reloaded next to every element.

// Per-channel sums over the rows of an (M, C) tensor of two quantities: the function `group`
// returns, `f(i, a, b)`, adds the element at flat index i into accumulators a and b and only
// reads memory. The rows are cut into a fixed number of chunks whatever the thread count, each
// summed on its own and the chunks added in order: the same bits on any number of threads.
template <typename T, typename Group>
void reduce_rows(int64_t M, int64_t C, std::vector<double>& out_a, std::vector<double>& out_b,
                 const Group& group) {
  const int64_t nblocks = (M + kBlock - 1) / kBlock;
  const int64_t nchunks = std::min<int64_t>(nblocks, 64);
  std::vector<double> part_a(nchunks * C, 0.0), part_b(nchunks * C, 0.0);
  at::parallel_for(0, nchunks, 1, [&](int64_t k0, int64_t k1) {
    by_lanes<T>(C, [&](auto lanes_tag, int64_t cb, int64_t ce) {
      using V = decltype(lanes_tag);
      using vec = typename V::vec;
      for (int64_t chunk = k0; chunk < k1; ++chunk) {
        double* pa = part_a.data() + chunk * C;
        double* pb = part_b.data() + chunk * C;
        const int64_t rows0 = chunk * nblocks / nchunks * kBlock;
        const int64_t rows1 = std::min(M, (chunk + 1) * nblocks / nchunks * kBlock);
        for (int64_t r0 = rows0; r0 < rows1; r0 += kBlock) {
          const int64_t r1 = std::min(rows1, r0 + kBlock);
          for (int64_t c = cb; c < ce; c += V::lanes) {
            const auto f = group(V{}, c);
            vec a[kUnroll], b[kUnroll];
            for (int u = 0; u < kUnroll; ++u) a[u] = b[u] = V::zero();
            int64_t r = r0;
            for (; r + kUnroll <= r1; r += kUnroll)
              for (int u = 0; u < kUnroll; ++u) f((r + u) * C + c, a[u], b[u]);
            for (; r < r1; ++r) f(r * C + c, a[0], b[0]);
            for (int u = 1; u < kUnroll; ++u) {
              a[0] = V::add(a[0], a[u]);
              b[0] = V::add(b[0], b[u]);
            }
            V::accumulate(pa + c, a[0]);
            V::accumulate(pb + c, b[0]);
          }
        }
      }
    });
  });
  out_a.assign(C, 0.0);
  out_b.assign(C, 0.0);
  for (int64_t i = 0; i < nchunks; ++i)
    for (int64_t c = 0; c < C; ++c) {
      out_a[c] += part_a[i * C + c];
      out_b[c] += part_b[i * C + c];
    }
}

// Elementwise over an (M, C) tensor: the function `group` returns, `f(i)`, does the loads,
// arithmetic and stores for the element(s) at flat index i. Rows go in blocks of kBlock so a
// block stays in cache while the channel groups take turns on it.
template <typename T, typename Group>
void map_rows(int64_t M, int64_t C, const Group& group) {
  at::parallel_for(0, M, 256, [&](int64_t rb, int64_t re) {
    by_lanes<T>(C, [&](auto lanes_tag, int64_t cb, int64_t ce) {
      using V = decltype(lanes_tag);
      for (int64_t r0 = rb; r0 < re; r0 += kBlock) {
        const int64_t r1 = std::min(re, r0 + kBlock);
        for (int64_t c = cb; c < ce; c += V::lanes) {
          const auto f = group(V{}, c);
          for (int64_t r = r0; r < r1; ++r) f(r * C + c);
        }
      }
    });
  });
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), name,
              " must be a contiguous (M, C) view of a channels-last tensor");
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
}

// Per-channel sums and sums of squares, shifted by the first row to keep var = E[d^2] - E[d]^2
// free of cancellation when the mean is large against the spread.
template <typename T>
std::vector<at::Tensor> forward_impl(const at::Tensor& x, const at::Tensor& weight,
                                     const at::Tensor& bias, const c10::optional<at::Tensor>& res,
                                     double eps) {
  using A = typename Elem<T>::acc;
  using S = Stat<T>;
  const int64_t M = x.size(0), C = x.size(1);
  const T* xp = x.data_ptr<T>();
  std::vector<A> first(C);
  for (int64_t c = 0; c < C; ++c) first[c] = Elem<T>::load(xp + c);
  const A* k = first.data();
  std::vector<double> s1, s2;
  reduce_rows<T>(M, C, s1, s2, [=](auto v, int64_t c) {
    using V = decltype(v);
    const auto kc = V::param(k + c);
    return [=](int64_t i, auto& a, auto& b) {
      const auto d = V::sub(V::load(xp + i), kc);
      a = V::add(a, d);
      b = V::add(b, V::mul(d, d));
    };
  });
  auto opts = x.options().dtype(c10::CppTypeToScalarType<S>::value);
  at::Tensor mean = at::empty({C}, opts), invstd = at::empty({C}, opts);
  at::Tensor var = at::empty({C}, x.options().dtype(at::kDouble));  // biased, for running_var
  S* mp = mean.data_ptr<S>();
  S* ip = invstd.data_ptr<S>();
  double* vp = var.data_ptr<double>();
  for (int64_t c = 0; c < C; ++c) {
    const double dm = s1[c] / M;
    vp[c] = std::max(s2[c] / M - dm * dm, 0.0);
    mp[c] = static_cast<S>(dm + static_cast<double>(first[c]));
    ip[c] = static_cast<S>(1.0 / std::sqrt(vp[c] + eps));
  }
  std::vector<A> scale_v(C), shift_v(C);
  fold(weight.data_ptr<S>(), bias.data_ptr<S>(), mp, ip, C, scale_v.data(), shift_v.data());
  const A* scale = scale_v.data();
  const A* shift = shift_v.data();
  at::Tensor y = at::empty_like(x);
  T* yp = y.data_ptr<T>();
  const T* rp = res ? res->data_ptr<T>() : nullptr;
  // Compiled once with and once without a residual (no branch in the inner loop), as the backward.
  auto normalize = [&](auto has_residual) {
    constexpr bool R = decltype(has_residual)::value;
    map_rows<T>(M, C, [=](auto v, int64_t c) {
      using V = decltype(v);
      const auto sc = V::param(scale + c), sh = V::param(shift + c);
      return [=](int64_t i) {
        auto u = V::add(V::mul(V::load(xp + i), sc), sh);
        if constexpr (R) u = V::add(u, V::load(rp + i));
        V::store(yp + i, V::relu(u));
      };
    });
  };
  if (res) normalize(std::true_type{});
  else normalize(std::false_type{});
  return {y, mean, invstd, var};
}

// Backward. g' = g * [y > 0]; without a residual the mask is recomputed from x with the forward's
// own arithmetic (so y is not read); with one it comes from y, and g' is also the residual's grad.
//   dweight = sum(g' * xhat),  dbias = sum(g'),
//   dx = w * invstd * (g' - sum(g')/M - (x - mean) * invstd^2 * sum(g' * (x - mean))/M)
template <typename T>
std::vector<at::Tensor> backward_impl(const at::Tensor& g, const at::Tensor& x,
                                      const c10::optional<at::Tensor>& y, const at::Tensor& weight,
                                      const at::Tensor& bias, const at::Tensor& mean,
                                      const at::Tensor& invstd) {
  using A = typename Elem<T>::acc;
  using S = Stat<T>;
  const int64_t M = x.size(0), C = x.size(1);
  const T* gp = g.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  const T* yp = y ? y->data_ptr<T>() : nullptr;
  const S* w = weight.data_ptr<S>();
  const S* mp = mean.data_ptr<S>();
  const S* ip = invstd.data_ptr<S>();
  std::vector<A> mu_v(C), scale_v(C), shift_v(C);
  for (int64_t c = 0; c < C; ++c) mu_v[c] = static_cast<A>(mp[c]);
  fold(w, bias.data_ptr<S>(), mp, ip, C, scale_v.data(), shift_v.data());
  const A* mu = mu_v.data();
  const A* scale = scale_v.data();
  const A* shift = shift_v.data();
  at::Tensor dweight = at::empty({C}, weight.options()), dbias = at::empty({C}, weight.options());
  at::Tensor dx = at::empty_like(x);
  at::Tensor dres = y ? at::empty_like(g) : at::Tensor();
  T* dxp = dx.data_ptr<T>();
  T* drp = y ? dres.data_ptr<T>() : nullptr;
  // Both passes, compiled once with and once without a residual (no branch in the inner loops).
  auto passes = [&](auto has_residual) {
    constexpr bool R = decltype(has_residual)::value;
    // g' at flat index i, given x there and the group's scale and shift
    auto masked = [=](auto v, int64_t i, auto xv, auto sc, auto sh) {
      using V = decltype(v);
      if constexpr (R) return V::where_pos(V::load(yp + i), V::load(gp + i));
      else return V::where_pos(V::add(V::mul(xv, sc), sh), V::load(gp + i));
    };
    std::vector<double> sg, sgx;
    reduce_rows<T>(M, C, sg, sgx, [=](auto v, int64_t c) {
      using V = decltype(v);
      const auto sc = V::param(scale + c), sh = V::param(shift + c), m = V::param(mu + c);
      return [=](int64_t i, auto& a, auto& b) {
        const auto xv = V::load(xp + i);
        const auto gg = masked(v, i, xv, sc, sh);
        a = V::add(a, gg);
        b = V::add(b, V::mul(gg, V::sub(xv, m)));
      };
    });
    std::vector<A> kg_v(C), kmean_v(C), kx_v(C);
    for (int64_t c = 0; c < C; ++c) {
      const double is = static_cast<double>(ip[c]);
      dweight.data_ptr<S>()[c] = static_cast<S>(sgx[c] * is);
      dbias.data_ptr<S>()[c] = static_cast<S>(sg[c]);
      kg_v[c] = static_cast<A>(w[c] * is);
      kmean_v[c] = static_cast<A>(sg[c] / M);
      kx_v[c] = static_cast<A>(is * is * sgx[c] / M);
    }
    const A* kg = kg_v.data();
    const A* kmean = kmean_v.data();
    const A* kx = kx_v.data();
    map_rows<T>(M, C, [=](auto v, int64_t c) {
      using V = decltype(v);
      const auto sc = V::param(scale + c), sh = V::param(shift + c), m = V::param(mu + c);
      const auto k1 = V::param(kg + c), k2 = V::param(kmean + c), k3 = V::param(kx + c);
      return [=](int64_t i) {
        const auto xv = V::load(xp + i);
        const auto gg = masked(v, i, xv, sc, sh);
        if constexpr (R) V::store(drp + i, gg);
        V::store(dxp + i, V::mul(k1, V::sub(V::sub(gg, k2), V::mul(V::sub(xv, m), k3))));
      };
    });
  };
  if (y) passes(std::true_type{});
  else passes(std::false_type{});
  return {dx, dweight, dbias, dres};
}

std::vector<at::Tensor> forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                const c10::optional<at::Tensor>& res, double eps) {
  check_rows(x, "x");
  const auto param_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(weight.scalar_type() == param_type && bias.scalar_type() == param_type,
              "weight and bias must be ", param_type, " for ", x.scalar_type(), " activations");
  if (res) {
    check_rows(*res, "residual");
    TORCH_CHECK(res->sizes() == x.sizes() && res->scalar_type() == x.scalar_type(),
                "residual must match x in shape and dtype");
  }
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "bn_relu_forward", [&] {
    out = forward_impl<scalar_t>(x, weight.contiguous(), bias.contiguous(), res, eps);
  });
  return out;
}

std::vector<at::Tensor> backward(const at::Tensor& g, const at::Tensor& x,
                                 const c10::optional<at::Tensor>& y, const at::Tensor& weight,
                                 const at::Tensor& bias, const at::Tensor& mean,
                                 const at::Tensor& invstd) {
  check_rows(g, "grad");
  check_rows(x, "x");
  TORCH_CHECK(g.sizes() == x.sizes() && g.scalar_type() == x.scalar_type(),
              "grad must match x in shape and dtype");
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "bn_relu_backward", [&] {
    out = backward_impl<scalar_t>(g, x, y, weight.contiguous(), bias.contiguous(), mean, invstd);
  });
  return out;
}

}  // namespace

// max_pool.cpp, built into the same extension.
std::vector<at::Tensor> max_pool2x2_forward(const at::Tensor& x);
at::Tensor max_pool2x2_backward(const at::Tensor& g, const at::Tensor& idx, int64_t height,
                                int64_t width);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "BN (training) + optional residual + ReLU, channels-last rows");
  m.def("backward", &backward, "backward of forward()");
  m.def("max_pool2x2_forward", &max_pool2x2_forward, "2x2/2 max-pool of (N, H, W, C) -> (y, uint8 argmax)");
  m.def("max_pool2x2_backward", &max_pool2x2_backward, "backward of max_pool2x2_forward()");
}
