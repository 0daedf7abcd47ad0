// One-token decode step of onelayer's lean decoder (onelayer/policy/decoder.py, the CPU "fold" layout) in one
// call: per block the input RMSNorm, the q/k/v projection, the per-head q/k RMSNorm, rotary, the KV-cache
// write, attention over the cache and the MLP, then the head. Norms, rotary, the cache write, attention and
// SwiGLU are loops here (rows split over torch's intra-op threads; each row's arithmetic is the same whatever
// the thread count); the matmuls go to oneDNN, torch's GEMM or `split_linear` as onelayer/policy/kernels.py
// chose per shape. Built and loaded by onelayer/policy/fused.py, which checks it against the Python step.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <cmath>
#include <vector>

using at::Tensor;

static Tensor mkl_linear(const Tensor& x, const Tensor& w, const c10::optional<Tensor>& b) {
  static const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  std::vector<c10::IValue> stack{x, w, b, c10::IValue(std::string("none")), c10::IValue(c10::List<c10::optional<c10::Scalar>>()), c10::IValue()};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

static Tensor mkl_linear_add(const Tensor& a, const Tensor& other, const Tensor& w, const c10::optional<Tensor>& b) {
  static const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "binary");
  std::vector<c10::IValue> stack{a, other, w, b, c10::IValue(std::string("add"))};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

static c10::optional<Tensor> opt(const Tensor& t) { return t.defined() && t.numel() ? c10::optional<Tensor>(t) : c10::nullopt; }

// x w^T (+ b) (+ add) with the output's columns split over torch's intra-op threads, each part one GEMM call
// on its own thread (a GEMM called inside a parallel region runs on that thread alone). For the few-row
// matmuls of decoding, where the GEMM's own threading gains little on a few cores; each output element is the
// same dot product over k as in one call. onelayer/policy/kernels.py times it against the other two per shape.
Tensor split_linear(Tensor x, Tensor w, Tensor b, Tensor add) {
  const int64_t n = w.size(0), k = w.size(1);
  auto x2 = x.reshape({-1, k});
  const int64_t m = x2.size(0);
  const bool has_b = b.defined() && b.numel(), has_add = add.defined() && add.numel();
  auto add2 = has_add ? add.reshape({m, n}) : add;
  auto y = at::empty({m, n}, x.options());
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / 16));
  const int64_t chunk = ((n + parts - 1) / parts + 15) / 16 * 16;  // whole vectors of columns per part
  const at::ThreadLocalState state;  // grad and inference mode as the caller has them
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    at::ThreadLocalStateGuard guard(state);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t lo = p * chunk, len = std::min(n, lo + chunk) - lo;
      if (len <= 0) continue;
      auto out = y.narrow(1, lo, len);
      auto wt = w.narrow(0, lo, len).t();
      if (has_add) {
        at::addmm_out(out, add2.narrow(1, lo, len), x2, wt);
        if (has_b) out.add_(b.narrow(0, lo, len));
      } else if (has_b) {
        at::addmm_out(out, b.narrow(0, lo, len), x2, wt);
      } else {
        at::mm_out(out, x2, wt);
      }
    }
  });
  auto shape = x.sizes().vec();
  shape.back() = n;
  return y.view(shape);
}

// The decode step's own GEMM on weights packed once per rollout ("packed"). A decode step multiplies few rows
// (the batch) by every weight matrix once, so each call reads its weights from far caches or memory; a
// library GEMM then also repacks them on every call. Here a weight W [N, K] is packed once into panels of
// NR output columns, [ceil(N / NR), K, NR] (zero-padded), which a register-tiled kernel (MR rows x NR
// columns of accumulators, vectors of the widest width this build has) reads front to back while the
// hardware prefetches the next panel (hinted one cache line per k). Each output element is one sum over k
// in order, whatever the rows or threads; panels are split over torch's intra-op threads.
#if defined(__AVX512F__)
constexpr int PK_VL = 16, PK_NV = 4;
#elif defined(__AVX__)
constexpr int PK_VL = 8, PK_NV = 2;
#else
constexpr int PK_VL = 4, PK_NV = 2;
#endif
constexpr int PK_MR = 6, PK_NR = PK_VL * PK_NV;
typedef float pk_v __attribute__((vector_size(PK_VL * 4)));
typedef float pk_vu __attribute__((vector_size(PK_VL * 4), aligned(4)));  // unaligned loads and stores

int64_t packed_width() { return PK_NR; }

// W [N, K] (contiguous) -> [ceil(N / NR), K, NR], columns beyond N zero
Tensor pack_weight(Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat, "pack_weight: a 2-D float32 weight");
  w = w.contiguous();
  const int64_t N = w.size(0), K = w.size(1), P = (N + PK_NR - 1) / PK_NR;
  auto out = at::empty({P, K, PK_NR}, w.options());
  const float* src = w.data_ptr<float>(); float* dst = out.data_ptr<float>();
  constexpr int64_t KB = 16;  // a block of k: reads one cache line of each weight row, writes KB panel rows
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t cols = std::min<int64_t>(PK_NR, N - p * PK_NR);
      float* d = dst + p * K * PK_NR;
      for (int64_t k0 = 0; k0 < K; k0 += KB) {
        const int64_t k1 = std::min(K, k0 + KB);
        for (int64_t j = 0; j < PK_NR; ++j) {
          const float* s = src + (p * PK_NR + j) * K;
          for (int64_t k = k0; k < k1; ++k) d[k * PK_NR + j] = j < cols ? s[k] : 0.f;
        }
      }
    }
  });
  return out;
}

// C[MR rows, nc <= NR columns] = A[MR, K] B_panel[K, NR] (+ bias) (+ add); pf: a line of the next panel per k
template <int MR>
static inline void pk_tile(const float* __restrict a, int64_t lda, const float* __restrict b, int64_t K,
                           float* __restrict c, int64_t ldc, int64_t nc, const float* bias, const float* add,
                           int64_t ldadd, const float* pf) {
  pk_v acc[MR][PK_NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < PK_NV; ++v) acc[r][v] = (pk_v){};
  for (int64_t k = 0; k < K; ++k) {
    if (pf) __builtin_prefetch(pf + k * 16, 0, 3);
    pk_v bv[PK_NV];
#pragma GCC unroll 8
    for (int v = 0; v < PK_NV; ++v) bv[v] = *(const pk_v*)(b + k * PK_NR + v * PK_VL);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const pk_v av = a[r * lda + k] - (pk_v){};  // x - (+0) folds to a plain broadcast (0 + x would not: -0)
#pragma GCC unroll 8
      for (int v = 0; v < PK_NV; ++v) acc[r][v] += av * bv[v];
    }
  }
  float tile[MR][PK_NR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < PK_NV; ++v) *(pk_vu*)(&tile[r][v * PK_VL]) = acc[r][v];
  for (int r = 0; r < MR; ++r) {
    float* out = c + r * ldc;
    const float* ad = add ? add + r * ldadd : nullptr;
#pragma omp simd
    for (int64_t j = 0; j < nc; ++j) {
      float y = tile[r][j];
      if (bias) y += bias[j];
      if (ad) y += ad[j];
      out[j] = y;
    }
  }
}

template <int MR>
static void pk_rows(int mr, const float* a, int64_t lda, const float* b, int64_t K, float* c, int64_t ldc, int64_t nc,
                    const float* bias, const float* add, int64_t ldadd, const float* pf) {
  if constexpr (MR > 0) {
    if (mr == MR) pk_tile<MR>(a, lda, b, K, c, ldc, nc, bias, add, ldadd, pf);
    else pk_rows<MR - 1>(mr, a, lda, b, K, c, ldc, nc, bias, add, ldadd, pf);
  }
}

// x [.., K] times a packed weight of N = n output columns (+ b [n]) (+ add [.., n]): [.., n]
Tensor packed_linear(Tensor x, Tensor packed, int64_t n, Tensor b, Tensor add) {
  const int64_t K = packed.size(1), P = packed.size(0);
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == PK_NR && x.size(-1) == K && n <= P * PK_NR && n > (P - 1) * PK_NR,
              "packed_linear: weight not packed for this input (pack_weight)");
  TORCH_CHECK(packed.is_contiguous() && packed.scalar_type() == at::kFloat &&
              reinterpret_cast<uintptr_t>(packed.data_ptr()) % (PK_VL * 4) == 0,
              "packed_linear: the packed weight must be pack_weight's own (contiguous, aligned) tensor");
  auto x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  auto y = at::empty({M, n}, x.options());
  const bool has_add = add.defined() && add.numel();
  auto add2 = has_add ? add.reshape({M, n}).contiguous() : add;
  const float* ap = x2.data_ptr<float>(); const float* bp = packed.data_ptr<float>(); float* cp = y.data_ptr<float>();
  const float* bias = b.defined() && b.numel() ? b.data_ptr<float>() : nullptr;
  const float* addp = has_add ? add2.data_ptr<float>() : nullptr;
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const float* panel = bp + p * K * PK_NR;
      const int64_t col = p * PK_NR, nc = std::min<int64_t>(PK_NR, n - col);
      for (int64_t m = 0; m < M; m += PK_MR) {
        // the first few row blocks hint the next panel of this thread into cache, a line per k
        const int64_t off = (m / PK_MR) * K * 16;
        const float* pf = p + 1 < p1 && off + K * 16 <= K * PK_NR ? panel + K * PK_NR + off : nullptr;
        pk_rows<PK_MR>((int)std::min<int64_t>(PK_MR, M - m), ap + m * K, K, panel, K, cp + m * n + col, n, nc,
                       bias ? bias + col : nullptr, addp ? addp + m * n + col : nullptr, n, pf);
      }
    }
  });
  auto shape = x.sizes().vec();
  shape.back() = n;
  return y.view(shape);
}

// kernel: 0 torch's GEMM, 1 oneDNN, 2 split_linear, 3 packed_linear on a packed weight (0-2 are the order of onelayer/policy/kernels.py's KERNELS)
static Tensor lin(const Tensor& x, const Tensor& w, const Tensor& b, int64_t kernel, int64_t n) {
  if (kernel == 3) return packed_linear(x, w, n, b, Tensor());
  if (kernel == 1) return mkl_linear(x, w, opt(b));
  if (kernel == 2) return split_linear(x, w, b, Tensor());
  return at::linear(x, w, opt(b));
}
// x + a w^T (+ b): the add fused into the matmul (oneDNN's post-op, or the GEMM's beta = 1)
static Tensor lin_add(const Tensor& a, const Tensor& x, const Tensor& w, const Tensor& b, int64_t kernel) {
  if (kernel == 3) return packed_linear(a, w, x.size(-1), b, x);
  if (kernel == 1) return mkl_linear_add(a, x, w, opt(b));
  if (kernel == 2) return split_linear(a, w, b, x);
  return b.defined() && b.numel() ? x + at::linear(a, w, b) : at::addmm(x, a, w.t());
}

// exp(x) in arithmetic the compiler vectorises (Cody-Waite range reduction and Cephes' degree-6 polynomial,
// within 2 ulp of expf over the float range; clamped where expf would over- or underflow). The module is
// built with -fno-math-errno -fno-trapping-math (as torch is) so that loops calling it vectorise.
static inline float vexp(float x) {
  x = x < -87.33654f ? -87.33654f : (x > 88.72283f ? 88.72283f : x);
  const float n = std::floor(x * 1.44269504f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f; p = p * r + 8.3334519073e-3f; p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f; p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.f;
  return e * __builtin_bit_cast(float, ((int32_t)n + 127) << 23);
}

// silu(g) u of gu [R, 2I] (gate | up) in one pass, rows split over threads
static Tensor swiglu_rows(const Tensor& gu) {
  const int64_t R = gu.size(0), I = gu.size(1) / 2;
  auto y = at::empty({R, I}, gu.options());
  const float* p = gu.data_ptr<float>(); float* o = y.data_ptr<float>();
  at::parallel_for(0, R, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* g = p + r * 2 * I; const float* u = g + I; float* out = o + r * I;
#pragma omp simd
      for (int64_t i = 0; i < I; ++i) out[i] = g[i] / (1.f + vexp(-g[i])) * u[i];
    }
  });
  return y;
}

// RMSNorm of the rows of a [R, H] float tensor, without a weight (it is folded into the next matmul)
static Tensor rms(const Tensor& x, double eps) {
  auto y = at::empty_like(x);
  const int64_t R = x.size(0), H = x.size(1);
  const float* xp = x.data_ptr<float>(); float* yp = y.data_ptr<float>();
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* a = xp + r * H; float* o = yp + r * H;
      float ss = 0.f;
#pragma omp simd reduction(+:ss)
      for (int64_t i = 0; i < H; ++i) ss += a[i] * a[i];
      const float inv = 1.f / std::sqrt(ss / (float)H + (float)eps);
#pragma omp simd
      for (int64_t i = 0; i < H; ++i) o[i] = a[i] * inv;
    }
  });
  return y;
}

// x [B, H]: the new tokens' embeddings; rot [B, d/2, 2]: cos and sin of each rotary pair at their positions.
// Per block: qkv [(h+2kvh)d, H] (input norm folded in; q/k rows in pair order, q pre-scaled), qkn [h+kvh, d]
// (Qwen3's q/k norm weights) or empty, o [H, hd], gu [2I, H] (post-attention norm folded in), down [H, I];
// an empty bias is none. kc/vc [Bmax, kvh, Lmax, d] caches (rows 0..B-1 in use); the new entries go to slot
// `start`. mask: bool, row b's slot t visible when mask[b, t] (rows strided, slots contiguous) or empty.
// capture >= 0: the hidden states entering that block are written to captured[rows or 0..B-1, start].
// kernels: which kernel each of the qkv, o, gate/up, down and head matmuls uses (as `lin`; 3: those weights are
// passed packed by pack_weight; never the head's). Returns the logits [B, V].
Tensor decode_step(Tensor x, Tensor rot, std::vector<Tensor> qkv_w, std::vector<Tensor> qkv_b, std::vector<Tensor> qkn,
                   std::vector<Tensor> o_w, std::vector<Tensor> o_b, std::vector<Tensor> gu_w, std::vector<Tensor> gu_b,
                   std::vector<Tensor> d_w, std::vector<Tensor> d_b, std::vector<Tensor> kc, std::vector<Tensor> vc,
                   Tensor head_w, Tensor head_b, int64_t start, Tensor mask, int64_t h, int64_t kvh, int64_t d,
                   double eps, double qeps, std::vector<int64_t> kernels, int64_t capture, Tensor captured, Tensor rows) {
  const int64_t B = x.size(0), H = x.size(1), end = start + 1, g = h / kvh, half = d / 2;
  const int64_t L = kc[0].size(2);
  const float* rp = rot.data_ptr<float>();
  const bool* mp = mask.defined() && mask.numel() ? mask.data_ptr<bool>() : nullptr;
  const int64_t mstride = mp ? mask.stride(0) : 0;
  TORCH_CHECK(!mp || mask.stride(1) == 1, "decode_step: the mask's slots must be contiguous");
  TORCH_CHECK(end <= kc[0].size(2) && d <= 1024 && end <= 4096, "decode_step: cache or head size out of range");
  auto q = at::empty({B, h, d}, x.options());
  auto att = at::empty({B, h * d}, x.options());
  for (size_t i = 0; i < qkv_w.size(); ++i) {
    if ((int64_t)i == capture) {
      if (rows.defined() && rows.numel()) captured.index_put_({rows, start}, x);
      else captured.select(1, start).narrow(0, 0, B).copy_(x);
    }
    auto qkv = lin(rms(x, eps), qkv_w[i], qkv_b[i], kernels[0], (h + 2 * kvh) * d).contiguous();  // [B, (h+2kvh)d]
    const float* src = qkv.data_ptr<float>();
    const float* wn = qkn[i].numel() ? qkn[i].data_ptr<float>() : nullptr;
    float* qp = q.data_ptr<float>();
    float* kp = kc[i].data_ptr<float>(); float* vp = vc[i].data_ptr<float>();
    const int64_t W = (h + 2 * kvh) * d;
    at::parallel_for(0, B, 8, [&](int64_t b0, int64_t b1) {
      float tmp[1024];  // one head, normed
      for (int64_t b = b0; b < b1; ++b) {
        const float* rb = rp + b * half * 2;
        for (int64_t j = 0; j < h + kvh; ++j) {
          const float* s = src + b * W + j * d;
          float inv = 1.f;
          if (wn) {
            float ss = 0.f;
#pragma omp simd reduction(+:ss)
            for (int64_t t = 0; t < d; ++t) ss += s[t] * s[t];
            inv = 1.f / std::sqrt(ss / (float)d + (float)qeps);
            for (int64_t t = 0; t < d; ++t) tmp[t] = (s[t] * inv) * wn[j * d + t];
          } else {
            for (int64_t t = 0; t < d; ++t) tmp[t] = s[t];
          }
          float* out = j < h ? qp + (b * h + j) * d : kp + ((b * kvh + (j - h)) * L + start) * d;
          for (int64_t p = 0; p < half; ++p) {
            const float a0 = tmp[2 * p], a1 = tmp[2 * p + 1], c = rb[2 * p], sn = rb[2 * p + 1];
            out[2 * p] = a0 * c - a1 * sn;
            out[2 * p + 1] = a0 * sn + a1 * c;
          }
        }
        for (int64_t j = 0; j < kvh; ++j) {
          const float* s = src + b * W + (h + kvh + j) * d;
          float* out = vp + ((b * kvh + j) * L + start) * d;
          for (int64_t t = 0; t < d; ++t) out[t] = s[t];
        }
      }
    });
    float* ap = att.data_ptr<float>();
    at::parallel_for(0, B, 8, [&](int64_t b0, int64_t b1) {
      float sc[4096];  // one head's scores over the cache
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t kv = 0; kv < kvh; ++kv) {
          const float* K = kp + (b * kvh + kv) * L * d;
          const float* V = vp + (b * kvh + kv) * L * d;
          for (int64_t gi = 0; gi < g; ++gi) {
            const int64_t head = kv * g + gi;
            const float* qv = qp + (b * h + head) * d;
            float mx = -INFINITY;
            for (int64_t t = 0; t < end; ++t) {
              float s = 0.f;
              const float* kt = K + t * d;
#pragma omp simd reduction(+:s)
              for (int64_t e = 0; e < d; ++e) s += qv[e] * kt[e];
              if (mp && !mp[b * mstride + t]) s = -INFINITY;
              sc[t] = s; mx = s > mx ? s : mx;
            }
            float sum = 0.f;
            for (int64_t t = 0; t < end; ++t) { sc[t] = std::exp(sc[t] - mx); sum += sc[t]; }
            const float invs = 1.f / sum;
            float* o = ap + b * h * d + head * d;
            for (int64_t e = 0; e < d; ++e) o[e] = 0.f;
            for (int64_t t = 0; t < end; ++t) {
              const float pt = sc[t] * invs; const float* vt = V + t * d;
#pragma omp simd
              for (int64_t e = 0; e < d; ++e) o[e] += pt * vt[e];
            }
          }
        }
      }
    });
    x = lin_add(att, x, o_w[i], o_b[i], kernels[1]);
    auto gu = lin(rms(x, eps), gu_w[i], gu_b[i], kernels[2], 2 * d_w[i].size(1)).contiguous();
    x = lin_add(swiglu_rows(gu), x, d_w[i], d_b[i], kernels[3]);
  }
  return lin(rms(x, eps), head_w, head_b, kernels[4], head_w.size(0));
}
