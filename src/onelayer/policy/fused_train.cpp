// Training-forward kernels of onelayer's lean path (onelayer/policy/forward.py) with their backward: RMSNorm,
// the q/k/v split of one fused projection (per-head q/k RMSNorm, rotary, v), and SwiGLU. Each row's arithmetic
// is the same whatever the thread count (rows split over torch's intra-op threads); a weight's gradient is
// summed in fixed chunks of rows, the chunks added in order. Compiled with fused_decode.cpp into one module by
// onelayer/policy/fused.py; onelayer/policy/fused_ops.py checks them against the torch ops and times them.
// rows per partial sum of a weight gradient: fixed, so the sum is the same on any thread count; the sums are kept
// in double, so how the rows are split (over threads here, over processes by DDP) moves them less
static constexpr int64_t CHUNK = 64;

// the chunks' partial sums [C, ...] added in order (the same whatever the thread count)
static Tensor sum_chunks(const Tensor& part) {
  const int64_t C = part.size(0), n = part.numel() / std::max<int64_t>(1, C);
  auto out = at::zeros(part.sizes().slice(1), part.options());
  const double* p = part.data_ptr<double>(); double* o = out.data_ptr<double>();
  for (int64_t c = 0; c < C; ++c)
    for (int64_t i = 0; i < n; ++i) o[i] += p[c * n + i];
  return out.to(at::kFloat);
}

// RMSNorm over the last dim of x [R, n] with weight w [n] (or empty): y = (x * rstd) * w. Returns y, rstd [R].
static void check_float(const Tensor& t, const char* what) {
  TORCH_CHECK(!t.defined() || !t.numel() || (t.scalar_type() == at::kFloat && t.device().is_cpu()), what, ": float32 CPU tensors only");
}

std::vector<Tensor> rms_fwd(Tensor x, Tensor w, double eps) {
  check_float(x, "rms_fwd"); check_float(w, "rms_fwd");
  x = x.contiguous();
  const int64_t n = x.size(-1), R = x.numel() / n;
  auto y = at::empty_like(x);
  auto rstd = at::empty({R}, x.options());
  const float* xp = x.data_ptr<float>(); float* yp = y.data_ptr<float>(); float* rp = rstd.data_ptr<float>();
  const float* wp = w.numel() ? w.data_ptr<float>() : nullptr;
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* a = xp + r * n; float* o = yp + r * n;
      float ss = 0.f;
#pragma omp simd reduction(+:ss)
      for (int64_t i = 0; i < n; ++i) ss += a[i] * a[i];
      const float inv = 1.f / std::sqrt(ss / (float)n + (float)eps);
      rp[r] = inv;
      if (wp) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) o[i] = (a[i] * inv) * wp[i];
      } else {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) o[i] = a[i] * inv;
      }
    }
  });
  return {y, rstd};
}

// dx, dw of rms_fwd: xhat = x rstd, g = dy w, dx = rstd (g - xhat mean(g xhat)), dw = sum_rows dy xhat
std::vector<Tensor> rms_bwd(Tensor dy, Tensor x, Tensor w, Tensor rstd, bool need_dw) {
  dy = dy.contiguous(); x = x.contiguous();
  const int64_t n = x.size(-1), R = x.numel() / n;
  auto dx = at::empty_like(x);
  const float* xp = x.data_ptr<float>(); const float* gp = dy.data_ptr<float>(); const float* rp = rstd.data_ptr<float>();
  float* dxp = dx.data_ptr<float>();
  const float* wp = w.numel() ? w.data_ptr<float>() : nullptr;
  const int64_t C = (R + CHUNK - 1) / CHUNK;
  Tensor part = need_dw && wp ? at::zeros({C, n}, x.options().dtype(at::kDouble)) : Tensor();
  double* pp = part.defined() ? part.data_ptr<double>() : nullptr;
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double* acc = pp ? pp + c * n : nullptr;
      for (int64_t r = c * CHUNK; r < std::min(R, (c + 1) * CHUNK); ++r) {
        const float* a = xp + r * n; const float* g = gp + r * n; float* o = dxp + r * n; const float inv = rp[r];
        float dot = 0.f;
        if (wp) {
#pragma omp simd reduction(+:dot)
          for (int64_t i = 0; i < n; ++i) dot += g[i] * wp[i] * a[i];
        } else {
#pragma omp simd reduction(+:dot)
          for (int64_t i = 0; i < n; ++i) dot += g[i] * a[i];
        }
        const float m = dot * inv / (float)n;  // mean(g w xhat)
        if (wp) {
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) o[i] = inv * (g[i] * wp[i] - a[i] * inv * m);
        } else {
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) o[i] = inv * (g[i] - a[i] * inv * m);
        }
        if (acc) {
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) acc[i] += g[i] * (a[i] * inv);
        }
      }
    }
  });
  Tensor dw = pp ? sum_chunks(part) : Tensor();
  return {dx, dw.defined() ? dw : at::empty({0}, x.options())};
}

// SwiGLU of gu [R, 2I] (gate | up): silu(g) u in one pass (`vexp`). The backward recomputes sigmoid(g) with
// the same expression (the same value, bit for bit) rather than reading a stored copy: one stream of memory
// less each way, and one [R, I] tensor less kept per block.
static inline float sigm(float g) { return 1.f / (1.f + vexp(-g)); }

Tensor swiglu_fwd(Tensor gu) {
  check_float(gu, "swiglu_fwd");
  gu = gu.contiguous();
  const int64_t I = gu.size(-1) / 2, R = gu.numel() / (2 * I);
  auto sizes = gu.sizes().vec(); sizes.back() = I;
  auto out = at::empty(sizes, gu.options());
  const float* p = gu.data_ptr<float>(); float* o = out.data_ptr<float>();
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* g = p + r * 2 * I; const float* u = g + I; float* y = o + r * I;
#pragma omp simd
      for (int64_t i = 0; i < I; ++i) y[i] = g[i] * sigm(g[i]) * u[i];
    }
  });
  return out;
}

Tensor swiglu_bwd(Tensor dy, Tensor gu) {
  gu = gu.contiguous(); dy = dy.contiguous();
  const int64_t I = gu.size(-1) / 2, R = gu.numel() / (2 * I);
  auto d = at::empty_like(gu);
  const float* p = gu.data_ptr<float>(); const float* gp = dy.data_ptr<float>();
  float* dp = d.data_ptr<float>();
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* g = p + r * 2 * I; const float* u = g + I; const float* dyr = gp + r * I;
      float* dg = dp + r * 2 * I; float* du = dg + I;
#pragma omp simd
      for (int64_t i = 0; i < I; ++i) {
        const float s = sigm(g[i]);
        du[i] = dyr[i] * g[i] * s;
        dg[i] = dyr[i] * u[i] * s * (1.f + g[i] * (1.f - s));
      }
    }
  });
  return d;
}

// q/k/v from one projection qkv [R, (h+2kvh)d]: q and k RMS-normed per head (weights wq, wk [d], or empty:
// no norm) then rotated (cos, sin [R, d]; rotate_half convention); v copied. Returns q [R,h,d], k [R,kvh,d],
// v [R,kvh,d], rstd [R, h+kvh].
std::vector<Tensor> qkv_fwd(Tensor qkv, Tensor wq, Tensor wk, Tensor cos, Tensor sin, double eps, int64_t h, int64_t kvh, int64_t d) {
  check_float(qkv, "qkv_fwd"); check_float(wq, "qkv_fwd"); check_float(cos, "qkv_fwd"); check_float(sin, "qkv_fwd");
  TORCH_CHECK(d <= 1024 && d % 2 == 0 && qkv.dim() == 2 && qkv.size(1) == (h + 2 * kvh) * d, "qkv_fwd: unexpected shapes");
  qkv = qkv.contiguous(); cos = cos.contiguous(); sin = sin.contiguous();
  const int64_t R = qkv.size(0), W = (h + 2 * kvh) * d, half = d / 2;
  auto q = at::empty({R, h, d}, qkv.options()), k = at::empty({R, kvh, d}, qkv.options()), v = at::empty({R, kvh, d}, qkv.options());
  auto rstd = at::empty({R, h + kvh}, qkv.options());
  const bool norm = wq.numel() > 0;
  const float* src = qkv.data_ptr<float>(); const float* cp = cos.data_ptr<float>(); const float* sp = sin.data_ptr<float>();
  const float* wqp = norm ? wq.data_ptr<float>() : nullptr; const float* wkp = norm ? wk.data_ptr<float>() : nullptr;
  float* qp = q.data_ptr<float>(); float* kp = k.data_ptr<float>(); float* vp = v.data_ptr<float>(); float* rp = rstd.data_ptr<float>();
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    float t[1024];
    for (int64_t r = r0; r < r1; ++r) {
      const float* c = cp + r * d; const float* s = sp + r * d;
      for (int64_t j = 0; j < h + kvh; ++j) {
        const float* a = src + r * W + j * d;
        const float* wn = j < h ? wqp : wkp;
        float inv = 1.f;
        if (norm) {
          float ss = 0.f;
#pragma omp simd reduction(+:ss)
          for (int64_t i = 0; i < d; ++i) ss += a[i] * a[i];
          inv = 1.f / std::sqrt(ss / (float)d + (float)eps);
          for (int64_t i = 0; i < d; ++i) t[i] = (a[i] * inv) * wn[i];
        } else {
          for (int64_t i = 0; i < d; ++i) t[i] = a[i];
        }
        rp[r * (h + kvh) + j] = inv;
        float* o = j < h ? qp + (r * h + j) * d : kp + (r * kvh + j - h) * d;
        for (int64_t i = 0; i < half; ++i) o[i] = t[i] * c[i] - t[i + half] * s[i];
        for (int64_t i = half; i < d; ++i) o[i] = t[i] * c[i] + t[i - half] * s[i];
      }
      std::copy(src + r * W + (h + kvh) * d, src + r * W + W, vp + r * kvh * d);
    }
  });
  return {q, k, v, rstd};
}

// backward of qkv_fwd: d qkv [R, W], d wq, d wk (empty without a norm)
std::vector<Tensor> qkv_bwd(Tensor dq, Tensor dk, Tensor dv, Tensor qkv, Tensor wq, Tensor wk, Tensor cos, Tensor sin,
                            Tensor rstd, int64_t h, int64_t kvh, int64_t d) {
  dq = dq.contiguous(); dk = dk.contiguous(); dv = dv.contiguous(); qkv = qkv.contiguous();
  const int64_t R = qkv.size(0), W = (h + 2 * kvh) * d, half = d / 2;
  auto dqkv = at::empty_like(qkv);
  const bool norm = wq.numel() > 0;
  const int64_t C = (R + CHUNK - 1) / CHUNK;
  Tensor part = norm ? at::zeros({C, 2, d}, qkv.options().dtype(at::kDouble)) : Tensor();
  double* pp = norm ? part.data_ptr<double>() : nullptr;
  const float* src = qkv.data_ptr<float>(); const float* cp = cos.data_ptr<float>(); const float* sp = sin.data_ptr<float>();
  const float* wqp = norm ? wq.data_ptr<float>() : nullptr; const float* wkp = norm ? wk.data_ptr<float>() : nullptr;
  const float* gq = dq.data_ptr<float>(); const float* gk = dk.data_ptr<float>(); const float* gv = dv.data_ptr<float>();
  const float* rp = rstd.data_ptr<float>(); float* out = dqkv.data_ptr<float>();
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    float t[1024];
    for (int64_t cc = c0; cc < c1; ++cc) {
      for (int64_t r = cc * CHUNK; r < std::min(R, (cc + 1) * CHUNK); ++r) {
        const float* c = cp + r * d; const float* s = sp + r * d;
        for (int64_t j = 0; j < h + kvh; ++j) {
          const float* g = j < h ? gq + (r * h + j) * d : gk + (r * kvh + j - h) * d;
          // through the rotation: t = d(normed)
          for (int64_t i = 0; i < half; ++i) t[i] = g[i] * c[i] + g[i + half] * s[i + half];
          for (int64_t i = half; i < d; ++i) t[i] = g[i] * c[i] - g[i - half] * s[i - half];
          float* o = out + r * W + j * d;
          if (!norm) { for (int64_t i = 0; i < d; ++i) o[i] = t[i]; continue; }
          const float* a = src + r * W + j * d; const float* wn = j < h ? wqp : wkp; const float inv = rp[r * (h + kvh) + j];
          double* acc = pp + (cc * 2 + (j < h ? 0 : 1)) * d;
          float dot = 0.f;
#pragma omp simd reduction(+:dot)
          for (int64_t i = 0; i < d; ++i) dot += t[i] * wn[i] * a[i];
          const float m = dot * inv / (float)d;
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) { o[i] = inv * (t[i] * wn[i] - a[i] * inv * m); acc[i] += t[i] * (a[i] * inv); }
        }
        std::copy(gv + r * kvh * d, gv + (r + 1) * kvh * d, out + r * W + (h + kvh) * d);
      }
    }
  });
  if (!norm) return {dqkv, at::empty({0}, qkv.options()), at::empty({0}, qkv.options())};
  auto dw = sum_chunks(part);
  return {dqkv, dw[0], dw[1]};
}


// Attention on the training forward's flat token layout (forward.py): N distinct prompts of P tokens (token
// n P + i), then B rows of Tc completion tokens (token N P + b Tc + t), row b sharing prompt inv[b]. A prompt
// query sees its prompt's keys up to itself that are not padding (pmask [N, P]), and itself; a completion query
// sees its prompt's keys that are not padding and its own row's completion keys up to itself. q [R, h, d],
// k, v [R, kvh, d] (kv head c serves q heads c g .. c g + g - 1). No copies: the keys are read where they are.
struct TokenLayout {
  int64_t N, P, B, Tc;
  const bool* pm; const int64_t* inv;
  // the keys (token indices) query token r sees, in order; returns how many
  int64_t keys(int64_t r, int64_t* out) const {
    int64_t n = 0;
    if (r < N * P) {
      const int64_t p = r / P, i = r % P;
      for (int64_t j = 0; j <= i; ++j) if (j == i || pm[p * P + j]) out[n++] = p * P + j;
    } else {
      const int64_t b = (r - N * P) / Tc, t = (r - N * P) % Tc, p = inv[b];
      for (int64_t j = 0; j < P; ++j) if (pm[p * P + j]) out[n++] = p * P + j;
      for (int64_t s = 0; s <= t; ++s) out[n++] = N * P + b * Tc + s;
    }
    return n;
  }
};

static TokenLayout token_layout(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& pmask, const Tensor& inv,
                                int64_t Tc, const char* what) {
  check_float(q, what); check_float(k, what); check_float(v, what);
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes() && q.is_contiguous() && k.is_contiguous() &&
              v.is_contiguous() && q.size(0) == k.size(0) && q.size(2) == k.size(2) && q.size(1) % k.size(1) == 0 &&
              q.size(2) <= 1024, what, ": q [R, h, d], k and v [R, kvh, d], contiguous, d <= 1024");
  TORCH_CHECK(pmask.scalar_type() == at::kBool && pmask.dim() == 2 && pmask.is_contiguous() &&
              inv.scalar_type() == at::kLong && inv.dim() == 1 && inv.is_contiguous(), what, ": pmask bool [N, P], inv long [B]");
  const int64_t N = pmask.size(0), P = pmask.size(1), B = inv.size(0);
  TORCH_CHECK(P >= 1 && Tc >= 1 && q.size(0) == N * P + B * Tc, what, ": tokens are not N P + B Tc");
  const int64_t* ip = inv.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(ip[b] >= 0 && ip[b] < N, what, ": inv out of range");
  return {N, P, B, Tc, pmask.data_ptr<bool>(), ip};
}

// Dot products of one vector with many rows. With AVX-512 or AVX (fused_decode.cpp's vectors, pk_v of PK_VL
// floats) and d a multiple of PK_VL, PK_VL rows at a time: each row's lane-wise products summed over d in
// order, then the lanes of all of them reduced together (`at_hsums`): one fixed order per build, whatever the
// thread count.
#if defined(__AVX512F__)
#include <immintrin.h>
#define AT_VEC 1
// the horizontal sums of v[0..15] in one vector (halves added level by level: lanes j + j+8, j + j+4, j + j+2,
// j + j+1); lane 4l + m holds v[4m + l]'s, so row t of a block goes in at_slot(t)
static inline pk_v at_hsums(const pk_v* v) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4((__m512)v[2 * i], (__m512)v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4((__m512)v[2 * i], (__m512)v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88), _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i) {
    const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  return (pk_v)_mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x88), _mm512_shuffle_ps(c[0], c[1], 0xDD));
}
static inline int at_slot(int t) { return (t % 4) * 4 + t / 4; }
#elif defined(__AVX__)
#include <immintrin.h>
#define AT_VEC 1
// as above for 8 lanes (j + j+4, j + j+2, j + j+1); lane 4l + m holds v[2m + l]'s
static inline pk_v at_hsums(const pk_v* v) {
  __m256 a[4], b[2];
  for (int i = 0; i < 4; ++i)
    a[i] = _mm256_add_ps(_mm256_permute2f128_ps((__m256)v[2 * i], (__m256)v[2 * i + 1], 0x20),
                         _mm256_permute2f128_ps((__m256)v[2 * i], (__m256)v[2 * i + 1], 0x31));
  for (int i = 0; i < 2; ++i) {
    const __m256d x = _mm256_castps_pd(a[2 * i]), y = _mm256_castps_pd(a[2 * i + 1]);
    b[i] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(x, y)), _mm256_castpd_ps(_mm256_unpackhi_pd(x, y)));
  }
  return (pk_v)_mm256_add_ps(_mm256_shuffle_ps(b[0], b[1], 0x88), _mm256_shuffle_ps(b[0], b[1], 0xDD));
}
static inline int at_slot(int t) { return (t % 4) * 2 + t / 4; }
#else
#define AT_VEC 0
#endif

static const float AT_ZEROS[1024] = {};  // a row of zeros: the rows beyond n in a block

// out[j] = x . rows[j][0..d) for j < n
static void dots(const float* x, const float* const* rows, int64_t n, int64_t d, float* out) {
  int64_t j0 = 0;
#if AT_VEC
  if (d % PK_VL == 0) {
    // whole blocks of PK_VL rows, and a last one padded with zero rows unless it holds only a few
    for (; j0 < n && (n - j0 >= PK_VL / 4 || (j0 == 0 && n > 1)); j0 += PK_VL) {
      const float* r[PK_VL];
      pk_v acc[PK_VL];
      for (int j = 0; j < PK_VL; ++j) { r[j] = j0 + j < n ? rows[j0 + j] : AT_ZEROS; acc[j] = (pk_v){}; }
      for (int64_t e = 0; e < d; e += PK_VL) {
        const pk_v xv = *(const pk_vu*)(x + e);
        for (int j = 0; j < PK_VL; ++j) acc[at_slot(j)] += xv * *(const pk_vu*)(r[j] + e);
      }
      float sums[PK_VL];
      *(pk_vu*)sums = at_hsums(acc);
      for (int j = 0; j < PK_VL && j0 + j < n; ++j) out[j0 + j] = sums[j];
    }
  }
#endif
  for (int64_t j = j0; j < n; ++j) {
    const float* r = rows[j];
    float s = 0.f;
#pragma omp simd reduction(+:s)
    for (int64_t e = 0; e < d; ++e) s += x[e] * r[e];
    out[j] = s;
  }
}

// weighted_rows with d = NV PK_VL: the sum kept in registers
template <int NV>
static void weighted_rows_v(const float* w, const float* const* rows, int64_t n, float* o) {
  pk_v acc[NV];
  for (int c = 0; c < NV; ++c) acc[c] = (pk_v){};
  for (int64_t j = 0; j < n; ++j) {
    const pk_v wj = w[j] - (pk_v){};  // a broadcast (as in pk_tile)
    for (int c = 0; c < NV; ++c) acc[c] += wj * *(const pk_vu*)(rows[j] + c * PK_VL);
  }
  for (int c = 0; c < NV; ++c) *(pk_vu*)(o + c * PK_VL) = acc[c];
}

// o[0..d) = sum_j w[j] rows[j] (o not read first)
static void weighted_rows(const float* w, const float* const* rows, int64_t n, int64_t d, float* o) {
  switch (d % PK_VL ? 0 : d / PK_VL) {
    case 1: return weighted_rows_v<1>(w, rows, n, o);
    case 2: return weighted_rows_v<2>(w, rows, n, o);
    case 4: return weighted_rows_v<4>(w, rows, n, o);
    case 8: return weighted_rows_v<8>(w, rows, n, o);
    default: break;
  }
  for (int64_t e = 0; e < d; ++e) o[e] = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    const float wj = w[j]; const float* r = rows[j];
#pragma omp simd
    for (int64_t e = 0; e < d; ++e) o[e] += wj * r[e];
  }
}

// out [R, h d] (the output projection's input as it is), lse [R, h]: each softmax's log normaliser
std::vector<Tensor> attn_fwd(Tensor q, Tensor k, Tensor v, Tensor pmask, Tensor inv, int64_t Tc, double scale) {
  const TokenLayout L = token_layout(q, k, v, pmask, inv, Tc, "attn_fwd");
  const int64_t R = q.size(0), h = q.size(1), d = q.size(2), kvh = k.size(1), g = h / kvh;
  auto out = at::empty({R, h * d}, q.options());
  auto lse = at::empty({R, h}, q.options());
  const float* qp = q.data_ptr<float>(); const float* kp = k.data_ptr<float>(); const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>(); float* lp = lse.data_ptr<float>();
  const float sc = (float)scale;
  at::parallel_for(0, R, 8, [&](int64_t r0, int64_t r1) {
    const int64_t most = L.P + L.Tc;
    std::vector<int64_t> keys(most); std::vector<float> s(most); std::vector<const float*> kr(most), vr(most);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = L.keys(r, keys.data());
      for (int64_t c = 0; c < kvh; ++c) {
        for (int64_t j = 0; j < n; ++j) { kr[j] = kp + (keys[j] * kvh + c) * d; vr[j] = vp + (keys[j] * kvh + c) * d; }
        for (int64_t hq = c * g; hq < (c + 1) * g; ++hq) {
          float* sp = s.data();
          dots(qp + (r * h + hq) * d, kr.data(), n, d, sp);
          float mx = -INFINITY;
          for (int64_t j = 0; j < n; ++j) { sp[j] *= sc; mx = sp[j] > mx ? sp[j] : mx; }
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) sp[j] = vexp(sp[j] - mx);
          float sum = 0.f;
          for (int64_t j = 0; j < n; ++j) sum += sp[j];
          const float invs = 1.f / sum;
          for (int64_t j = 0; j < n; ++j) sp[j] *= invs;
          weighted_rows(sp, vr.data(), n, d, op + (r * h + hq) * d);
          lp[r * h + hq] = mx + std::log(sum);
        }
      }
    }
  });
  return {out, lse};
}

// dq, dk, dv of attn_fwd from dout [R, h d]. The work is split by (prompt, kv head): each part owns the keys and
// values of one prompt and of the rows that share it, and goes through their queries in one fixed order, so
// every gradient is the same sum on any thread count.
std::vector<Tensor> attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor pmask, Tensor inv,
                             int64_t Tc, double scale) {
  const TokenLayout L = token_layout(q, k, v, pmask, inv, Tc, "attn_bwd");
  dout = dout.contiguous();
  const int64_t h = q.size(1), d = q.size(2), kvh = k.size(1), g = h / kvh;
  auto dq = at::empty_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  std::vector<std::vector<int64_t>> rows(L.N);  // each prompt's rows
  for (int64_t b = 0; b < L.B; ++b) rows[L.inv[b]].push_back(b);
  const float* qp = q.data_ptr<float>(); const float* kp = k.data_ptr<float>(); const float* vp = v.data_ptr<float>();
  const float* gp = dout.data_ptr<float>(); const float* op = out.data_ptr<float>(); const float* lp = lse.data_ptr<float>();
  float* dqp = dq.data_ptr<float>(); float* dkp = dk.data_ptr<float>(); float* dvp = dv.data_ptr<float>();
  const float sc = (float)scale;
  at::parallel_for(0, L.N * kvh, 1, [&](int64_t u0, int64_t u1) {
    const int64_t most = L.P + L.Tc;
    std::vector<int64_t> keys(most); std::vector<float> p(most), ds(most);
    std::vector<const float*> kr(most), vr(most);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t prompt = u / kvh, c = u % kvh;
      auto query = [&](int64_t r) {
        const int64_t n = L.keys(r, keys.data());
        for (int64_t j = 0; j < n; ++j) { kr[j] = kp + (keys[j] * kvh + c) * d; vr[j] = vp + (keys[j] * kvh + c) * d; }
        for (int64_t hq = c * g; hq < (c + 1) * g; ++hq) {
          const float* qv = qp + (r * h + hq) * d; const float* gv = gp + (r * h + hq) * d;
          const float* ov = op + (r * h + hq) * d;
          const float m = lp[r * h + hq];
          float D = 0.f;
#pragma omp simd reduction(+:D)
          for (int64_t e = 0; e < d; ++e) D += gv[e] * ov[e];
          float* pp = p.data(); float* dsp = ds.data();
          dots(qv, kr.data(), n, d, pp);
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) pp[j] = vexp(pp[j] * sc - m);
          dots(gv, vr.data(), n, d, dsp);  // d p
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) dsp[j] = pp[j] * (dsp[j] - D) * sc;
          weighted_rows(dsp, kr.data(), n, d, dqp + (r * h + hq) * d);
          for (int64_t j = 0; j < n; ++j) {
            const int64_t at = (keys[j] * kvh + c) * d;
            float* dkt = dkp + at; float* dvt = dvp + at; const float dsj = dsp[j], pj = pp[j];
#pragma omp simd
            for (int64_t e = 0; e < d; ++e) { dkt[e] += dsj * qv[e]; dvt[e] += pj * gv[e]; }
          }
        }
      };
      for (int64_t i = 0; i < L.P; ++i) query(prompt * L.P + i);
      for (int64_t b : rows[prompt])
        for (int64_t t = 0; t < L.Tc; ++t) query(L.N * L.P + b * L.Tc + t);
    }
  });
  return {dq, dk, dv};
}
